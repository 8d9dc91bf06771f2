"""Tenants at a glance (`mcpbill tenant list`): each one's money and how many tokens it has."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime

from sqlalchemy import Connection, case, func, select

from mcpbill_cli.ledger.credit import TenantBalance, tenant_balance
from mcpbill_cli.ledger.models import accounts, tokens

_PREFIX = "tenant:"


@dataclass(frozen=True)
class TenantSummary(TenantBalance):
    """A tenant's balance (what it has not allotted yet) beside its token counts."""

    tokens: int
    active_tokens: int


def tenant_summaries(conn: Connection, *, now: datetime) -> list[TenantSummary]:
    """Every tenant with a wallet (funded, or allotted from), by name."""
    names = conn.execute(select(accounts.c.id).where(accounts.c.kind == "tenant")
                         .order_by(accounts.c.id)).scalars()
    counts = _token_counts(conn, now)
    summaries = []
    for name in (account.removeprefix(_PREFIX) for account in names):
        bal = tenant_balance(conn, name)
        total, active = counts.get(name, (0, 0))
        summaries.append(TenantSummary(**asdict(bal), tokens=total, active_tokens=active))
    return summaries


def _token_counts(conn: Connection, now: datetime) -> dict[str, tuple[int, int]]:
    """tenant -> (tokens ever issued, tokens active now)."""
    tk = tokens.c
    active = func.sum(case(((tk.revoked_at.is_(None)) & (tk.expires_at > now), 1), else_=0))
    rows = conn.execute(select(tk.tenant, func.count(), active).group_by(tk.tenant))
    return {tenant: (int(total), int(live or 0)) for tenant, total, live in rows}

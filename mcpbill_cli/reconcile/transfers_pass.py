"""One pass over the window's transfers, grouped in SQL: control totals per token account and
deposits per tenant.

A resolution (capture, void, expire) looks its hold up by primary key, so a resolution that
contradicts its hold (a void of a captured hold: a second outcome) shows as a group. The
lookup is a subquery asked for resolutions only: as an outer join, PostgreSQL hashed every
hold of the ledger's history to meet the window's few resolutions (0.23 s of a day's 0.34 s
after ten earlier days of 100k calls; 0.08 s as probes).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from sqlalchemy import Connection, case, func, literal, literal_column, select

from mcpbill_cli.ledger.models import transfers
from mcpbill_cli.reconcile.model import Window

t = transfers.c
held = transfers.alias("held")
h = held.c
BATCH = 2000
TOKEN_PREFIX = "token:"  # noqa: S105 - an account id prefix, not a secret
TENANT_PREFIX = "tenant:"
CODES = ("charge", "hold", "capture", "void", "expire", "deposit")
# The status a hold must have once this code resolved it.
RESOLVES_TO = {"capture": "posted", "void": "voided", "expire": "expired"}


@dataclass(frozen=True)
class TransferGroup:
    code: str
    debit: str
    credit: str | None  # deposits only
    status: str | None  # holds only
    hold_status: str | None  # resolutions only: the status of the hold resolved ("missing")
    count: int
    amount: int


def transfer_groups(conn: Connection, window: Window) -> Iterator[TransferGroup]:
    """The window's transfers (by ``created_at``) of the codes reconcile checks, grouped."""
    credit = case((t.code == "deposit", t.credit_account_id)).label("credit")
    status_of_hold = select(h.status).where(h.id == t.pending_id,
                                            h.kind == "pending").scalar_subquery()
    hold_status = case((t.pending_id.is_(None), literal(None)),
                       else_=func.coalesce(status_of_hold, literal("missing")))
    keys = (t.code, t.debit_account_id, credit, t.status)
    query = (select(*keys, hold_status.label("hold_status"), func.count().label("n"),
                    func.sum(t.amount).label("amount"))
             .where(t.created_at >= window.start, t.created_at < window.end,
                    t.code.in_(CODES))
             .group_by(*keys, literal_column("hold_status"))
             .execution_options(yield_per=BATCH))
    for row in conn.execute(query):
        yield TransferGroup(code=row.code, debit=row.debit_account_id, credit=row.credit,
                            status=row.status, hold_status=row.hold_status,
                            count=int(row.n), amount=int(row.amount or 0))


@dataclass
class TransferTally:
    """What one token account's transfers in the window add up to."""

    charges: list[int] = field(default_factory=lambda: [0, 0])  # count, amount
    captures: list[int] = field(default_factory=lambda: [0, 0])
    holds: dict[str, list[int]] = field(default_factory=dict)  # status -> count, amount
    contradictions: int = 0  # resolutions that disagree with their hold

    def add(self, group: TransferGroup) -> None:
        if group.code in ("charge", "capture"):
            totals = self.charges if group.code == "charge" else self.captures
            totals[0] += group.count
            totals[1] += group.amount
        if group.code == "hold":
            hold = self.holds.setdefault(group.status or "?", [0, 0])
            hold[0] += group.count
            hold[1] += group.amount
        if group.code in RESOLVES_TO and group.hold_status != RESOLVES_TO[group.code]:
            self.contradictions += group.count


def token_jti(account: str) -> str | None:
    return account[len(TOKEN_PREFIX):] if account.startswith(TOKEN_PREFIX) else None


def tenant_name(account: str | None) -> str | None:
    if account is None or not account.startswith(TENANT_PREFIX):
        return None
    return account[len(TENANT_PREFIX):]

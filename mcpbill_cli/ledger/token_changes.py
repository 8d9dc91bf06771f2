"""Changing a live token: more credit (`token topup`) and a later expiry (`token extend`).

Both run inside the caller's transaction and lock the token's account row first, in the order
revoke and sweep take it (the token's account, then its tenant's or parent's), so a topup
racing a revoke or a charge waits for it instead of deadlocking; a refusal leaves the ledger
as it was when the caller rolls back.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select, update

from mcpbill_cli.clock import aware
from mcpbill_cli.errors import InsufficientFunds, InvalidCreditToken, NotFound, TokenRevoked
from mcpbill_cli.ledger import audit, ops
from mcpbill_cli.ledger.models import accounts, tokens
from mcpbill_cli.money import format_usd

tk = tokens.c


@dataclass(frozen=True)
class TopUp:
    jti: str
    tenant: str
    amount: int
    limit: int  # the token's limit after the topup
    remaining: int
    source: str  # the account the credit came from: tenant:<name> or token:<parent>
    transfer_id: str


def topup(conn: Connection, jti: str, amount: int, *, now: datetime) -> TopUp:
    """Move ``amount`` more credit to an active token from its tenant (a child: its parent).

    The token's limit grows by the same amount, so spent never exceeds it. The tenant's debit
    is a conditional UPDATE: two topups racing for the last funds cannot both take them.
    """
    row = _active_row(conn, jti, now)
    raised = conn.execute(update(tokens).where(tk.jti == jti, tk.revoked_at.is_(None),
                                               tk.expires_at > now)
                          .values(limit_micro=tk.limit_micro + amount)).rowcount
    if raised != 1:  # the guard in the statement itself, whatever was read before
        raise TokenRevoked(f"token {jti} was revoked meanwhile; nothing was moved", jti=jti)
    source = (ops.token_account(row.parent_jti) if row.parent_jti
              else ops.tenant_account(row.tenant))
    transfer_id = f"topup:{jti}:{uuid.uuid4().hex[:12]}"
    try:
        ops.transfer(conn, id=transfer_id, debit=source, credit=ops.token_account(jti),
                     amount=amount, code="topup", at=now, demo=row.demo, ref=jti)
    except InsufficientFunds:
        raise _short(conn, source, amount) from None
    audit.record(conn, "topup", at=now, jti=jti, tenant=row.tenant, agent=row.agent,
                 amount=amount, ref=transfer_id, demo=row.demo)
    return TopUp(jti, row.tenant, amount, row.limit_micro + amount,
                 ops.balance(conn, ops.token_account(jti)).available, source, transfer_id)


def _active_row(conn: Connection, jti: str, now: datetime) -> Any:
    """The token's row once its account is locked; refuses an unknown, revoked or expired one."""
    conn.execute(select(accounts.c.id).where(accounts.c.id == ops.token_account(jti))
                 .with_for_update()).all()
    row = conn.execute(select(tokens).where(tk.jti == jti)).one_or_none()
    if row is None:
        raise NotFound(f"no token {jti}; `mcpbill token list` shows tokens")
    if row.revoked_at is not None:
        raise TokenRevoked(f"token {jti} is revoked; issue a new one instead", jti=jti)
    if aware(row.expires_at) <= now:
        raise InvalidCreditToken(f"token {jti} has expired; issue a new one instead",
                                 reason="expired", jti=jti)
    return row


def _short(conn: Connection, source: str, amount: int) -> InsufficientFunds:
    available = ops.balance(conn, source).available
    whose = source.replace("tenant:", "tenant ").replace("token:", "parent token ")
    return InsufficientFunds(
        f"{whose} has {format_usd(available)} USDC available, less than {format_usd(amount)}; "
        "nothing was moved", available=format_usd(available), requested=format_usd(amount))

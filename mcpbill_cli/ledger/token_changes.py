"""Changing a live token: more credit (`token topup`) and a later expiry (`token extend`).

Both run inside the caller's transaction and lock the token's account row first, in the order
revoke and sweep take it (the token's account, then its tenant's or parent's), so a topup
racing a revoke or a charge waits for it instead of deadlocking; a refusal leaves the ledger
as it was when the caller rolls back.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, select, update

from mcpbill_cli.budgets import TokenTerms
from mcpbill_cli.clock import aware, rfc3339
from mcpbill_cli.errors import (
    IdempotencyConflict,
    InsufficientFunds,
    InvalidCreditToken,
    InvalidInput,
    NotFound,
    TokenRevoked,
)
from mcpbill_cli.keys import KeyInfo
from mcpbill_cli.ledger import audit, ops
from mcpbill_cli.ledger.models import accounts, tokens
from mcpbill_cli.money import format_usd
from mcpbill_cli.ratelimits import rates_from_claim
from mcpbill_cli.tokens import Claims, encode_token, expires

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
    replayed: bool = False  # an idempotency key's earlier topup, returned again


def topup(conn: Connection, jti: str, amount: int, *, now: datetime,
          idempotency_key: str | None = None, detail: dict[str, Any] | None = None) -> TopUp:
    """Move ``amount`` more credit to an active token from its tenant (a child: its parent).

    The token's limit grows by the same amount, so spent never exceeds it. The tenant's debit
    is a conditional UPDATE: two topups racing for the last funds cannot both take them. With
    ``idempotency_key`` (the token's own) the topup happens once: the transfer's id comes from
    the key, so the same key and amount again moves nothing and raises no limit, and another
    amount is IDEMPOTENCY_CONFLICT.
    """
    row = _active_row(conn, jti, now)
    source = (ops.token_account(row.parent_jti) if row.parent_jti
              else ops.tenant_account(row.tenant))
    transfer_id = (ops.keyed_id("topup", jti, idempotency_key) if idempotency_key is not None
                   else f"topup:{jti}:{uuid.uuid4().hex[:12]}")
    try:
        moved = ops.transfer(conn, id=transfer_id, debit=source,
                             credit=ops.token_account(jti), amount=amount, code="topup",
                             at=now, demo=row.demo, ref=jti)
    except InsufficientFunds:
        raise _short(conn, source, amount) from None
    except IdempotencyConflict:
        raise ops.key_conflict(conn, transfer_id, idempotency_key, did=f"topped up {jti}",
                               another="topup") from None
    if moved:
        _raise_limit(conn, jti, amount, now)
        audit.record(conn, "topup", at=now, jti=jti, tenant=row.tenant, agent=row.agent,
                     amount=amount, ref=transfer_id, demo=row.demo, detail=detail)
    limit = conn.execute(select(tk.limit_micro).where(tk.jti == jti)).scalar_one()
    return TopUp(jti, row.tenant, amount, limit,
                 ops.balance(conn, ops.token_account(jti)).available, source, transfer_id,
                 replayed=not moved)


def _raise_limit(conn: Connection, jti: str, amount: int, now: datetime) -> None:
    raised = conn.execute(update(tokens).where(tk.jti == jti, tk.revoked_at.is_(None),
                                               tk.expires_at > now)
                          .values(limit_micro=tk.limit_micro + amount)).rowcount
    if raised != 1:  # the guard in the statement itself, whatever was read before
        raise TokenRevoked(f"token {jti} was revoked meanwhile; nothing was moved", jti=jti)


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


@dataclass(frozen=True)
class Extension:
    jti: str
    token: str = field(repr=False)  # the same claims, signed again with the new exp
    expires_at: datetime
    previous_expires_at: datetime


def extend(conn: Connection, jti: str, ttl: int, *, now: datetime, signer: tuple[KeyInfo, Any],
           issuer: str, ttl_cap: int) -> Extension:
    """Move an active token's expiry to ``now + ttl``, at most ``ttl_cap`` after it was issued
    (and, for a child, not past its parent); returns the same claims signed with the new exp.

    The ledger's expiry is what sweep and `token list` go by; a JWT's ``exp`` is signed, so the
    earlier JWT still expires when it said, and the agent switches to the one returned here.
    """
    row = _active_row(conn, jti, now)
    previous, new_exp = aware(row.expires_at), expires(now, ttl)
    _check_new_expiry(conn, row, previous, new_exp, ttl_cap)
    info, private_key = signer
    if info.kid != row.kid:
        raise InvalidInput(f"token {jti} was signed by key {row.kid}, which is no longer the "
                           "active one; issue a new token instead", field="jti")
    moved = conn.execute(update(tokens).where(tk.jti == jti, tk.revoked_at.is_(None),
                                              tk.expires_at > now)
                         .values(expires_at=new_exp)).rowcount
    if moved != 1:  # the guard in the statement itself, whatever was read before
        raise TokenRevoked(f"token {jti} changed meanwhile; nothing was extended", jti=jti)
    audit.record(conn, "extend", at=now, jti=jti, tenant=row.tenant, agent=row.agent,
                 demo=row.demo, detail={"expires_at": rfc3339(new_exp),
                                        "previous_expires_at": rfc3339(previous)})
    claims = Claims(jti=jti, tenant=row.tenant, agent=row.agent,
                    scope=tuple(json.loads(row.scope)), audience=row.audience, issuer=issuer,
                    issued_at=aware(row.issued_at), not_before=aware(row.issued_at),
                    expires_at=new_exp, limit=row.limit_micro, kid=row.kid,
                    parent=row.parent_jti, terms=TokenTerms(
                        row.daily_cap_micro, row.monthly_cap_micro, row.topup_below_micro,
                        row.topup_to_micro),
                    rates=rates_from_claim(json.loads(row.rate_limits)) if row.rate_limits
                    else ())
    return Extension(jti, encode_token(claims, info.alg, private_key), new_exp, previous)


def _check_new_expiry(conn: Connection, row: Any, previous: datetime, new_exp: datetime,
                      ttl_cap: int) -> None:
    latest = aware(row.issued_at) + timedelta(seconds=ttl_cap)
    if row.parent_jti:
        parent_exp = conn.execute(select(tk.expires_at).where(tk.jti == row.parent_jti)
                                  ).scalar_one()
        latest = min(latest, aware(parent_exp))
    if new_exp > latest:
        raise InvalidInput(f"token {row.jti} can live until {rfc3339(latest)} at the latest "
                           "(ttl_cap from its issue, or its parent's expiry); ask for less",
                           field="ttl", latest=rfc3339(latest))
    if new_exp <= previous:
        raise InvalidInput(f"token {row.jti} already expires at {rfc3339(previous)}; extend "
                           "only moves the expiry later (revoke ends a token early)",
                           field="ttl")

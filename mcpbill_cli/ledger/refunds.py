"""Refunds of captured calls on the ledger: each step runs inside the caller's transaction and
returns what happened (:data:`Opening`), never raising for a refusal and never calling back
into the verifier, which signs the refund receipt between :func:`open_refund` and
:func:`record`.

The guard is one conditional UPDATE of the call's row, ``refunded = refunded + :amount WHERE
status = 'captured' AND refunded + :amount <= amount``: however refunds interleave (threads,
processes, servers sharing a PostgreSQL ledger), the refunds of one call never pass its charge.

The money goes back from where the charge went (the call's revenue account) to the token while
it is active (not revoked, not expired: its limit grows by the refund, so it may spend it
again, as after a topup), else to its tenant, and the budget windows the call was counted in
(a daily or monthly cap's) get the amount back, as a void's do. The token's account row is
locked first, in the order revoke takes it, so a refund racing a revoke waits for it and then
credits the tenant.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import Connection, select, update

from mcpbill_cli.clock import aware
from mcpbill_cli.ledger import audit, budgets, ops, outbox
from mcpbill_cli.ledger.models import accounts, calls, refunds, tokens, transfers
from mcpbill_cli.money import format_usd

c = calls.c
r = refunds.c
tk = tokens.c
t = transfers.c

_CALL = select(c.id, c.jti, c.tenant, c.agent, c.tool, c.status, c.amount, c.refunded,
               c.transfer_id, c.demo, c.budgets, c.created_at)
_STORED = select(r.id, r.call_id, r.amount, r.requested, r.refunded_after, r.credited_to,
                 r.reason, r.idempotency_key, r.receipt, r.created_at)


def new_refund_id() -> str:
    """A refund id that sorts by time, like a receipt id."""
    return f"rfnd_{time.time_ns():016x}{secrets.token_hex(6)}"


@dataclass(frozen=True)
class RefundRequest:
    call_id: str
    amount: int | None  # micro-USDC; None: everything still refundable
    reason: str | None
    idempotency_key: str | None


@dataclass(frozen=True)
class StoredRefund:
    """A refund made already (its key's): what it was asked, what it did, its receipt."""

    id: str
    call_id: str
    amount: int
    requested: int | None
    refunded_after: int
    credited_to: str
    reason: str | None
    idempotency_key: str | None
    receipt: str
    created_at: datetime

    def same_request(self, request: RefundRequest) -> bool:
        return (self.call_id, self.requested) == (request.call_id, request.amount)


@dataclass(frozen=True)
class Opened:
    """A refund moved: ``amount`` from ``debit`` to ``credited_to``, the call's ``refunded``
    is now ``refunded_after`` of ``charged``. Its row comes with the receipt (:func:`record`)."""

    id: str
    call_id: str
    jti: str
    tenant: str
    agent: str
    tool: str
    amount: int
    charged: int
    refunded_after: int
    credited_to: str
    transfer_id: str
    demo: bool

    @property
    def refundable(self) -> int:
        return self.charged - self.refunded_after


@dataclass(frozen=True)
class Earlier:
    """The tenant's idempotency key names a refund made already."""

    refund: StoredRefund


@dataclass(frozen=True)
class Refused:
    """``unknown`` (no such call), ``not_captured`` (``status``; a capture of 0 is
    ``captured``), ``exceeds`` (``refundable`` is left) or ``raced`` (a refund of everything
    left met another refund of the call: ask again)."""

    reason: Literal["unknown", "not_captured", "exceeds", "raced"]
    status: str = ""
    charged: int = 0
    refundable: int = 0


Opening = Opened | Earlier | Refused


def open_refund(conn: Connection, request: RefundRequest, *, at: datetime) -> Opening:
    """Raise the call's ``refunded`` (the guard) and move the money back; nothing is written
    when it is refused (the caller rolls back what an ``exceeds`` or a ``raced`` left)."""
    query = _CALL.where(c.id == request.call_id)
    if request.amount is None:
        # "All that is left" is read, then taken: the row lock (PostgreSQL; SQLite's writers
        # are serial already) makes concurrent refunds of the call take turns, so what was
        # read is still what is left. A given amount needs no lock: its UPDATE is guarded.
        query = query.with_for_update()
    call = conn.execute(query).first()
    if call is None:
        return Refused("unknown")
    if request.idempotency_key is not None:
        earlier = stored_by_key(conn, call.tenant, request.idempotency_key)
        if earlier is not None:
            return Earlier(earlier)
    charged = int(call.amount or 0)
    if call.status != "captured" or charged == 0:
        return Refused("not_captured", status=call.status, charged=charged)
    amount = request.amount if request.amount is not None else charged - int(call.refunded)
    if amount <= 0:
        return Refused("exceeds", status=call.status, charged=charged, refundable=0)
    refunded_after = _raise_refunded(conn, call.id, amount)
    if refunded_after is None:
        left = charged - int(conn.execute(select(c.refunded).where(c.id == call.id)).scalar_one())
        reason: Literal["exceeds", "raced"] = (
            "raced" if request.amount is None and left > 0 else "exceeds")
        return Refused(reason, status=call.status, charged=charged, refundable=max(left, 0))
    # What is refunded was not spent: the budget windows the call was counted in get it back.
    budgets.give_back(conn, call.budgets, budgets.Spender(call.tenant, call.agent, call.jti),
                      amount, counted_at=aware(call.created_at))
    credited_to = _credit_target(conn, call.jti, call.tenant, at)
    refund_id = new_refund_id()
    transfer_id = f"refund:{refund_id}"
    ops.transfer(conn, id=transfer_id, debit=_revenue_of(conn, call), credit=credited_to,
                 amount=amount, code="refund", at=at, demo=bool(call.demo), ref=call.id)
    if credited_to == ops.token_account(call.jti):
        conn.execute(update(tokens).where(tk.jti == call.jti)
                     .values(limit_micro=tk.limit_micro + amount))
    return Opened(refund_id, call.id, call.jti, call.tenant, call.agent, call.tool, amount,
                  charged, refunded_after, credited_to, transfer_id, bool(call.demo))


def record(conn: Connection, opened: Opened, request: RefundRequest, *, at: datetime,
           receipt: str) -> bool:
    """The refund's row with its signed receipt, its ``refund`` event and its
    ``refund.created`` alert (:mod:`outbox`); False when the
    tenant's idempotency key was taken meanwhile (the caller rolls back and asks again)."""
    if not ops.insert_ignore(conn, refunds, {
            "id": opened.id, "call_id": opened.call_id, "jti": opened.jti,
            "tenant": opened.tenant, "amount": opened.amount, "requested": request.amount,
            "refunded_after": opened.refunded_after, "credited_to": opened.credited_to,
            "transfer_id": opened.transfer_id, "reason": request.reason,
            "idempotency_key": request.idempotency_key, "receipt": receipt,
            "demo": opened.demo, "created_at": at}):
        return False
    audit.record(conn, "refund", at=at, jti=opened.jti, tenant=opened.tenant,
                 agent=opened.agent, tool=opened.tool, amount=opened.amount, ref=opened.id,
                 demo=opened.demo, detail=_detail(opened, request))
    outbox.emit(conn, "refund.created", {
        "refund_id": opened.id, "receipt_id": opened.call_id, "jti": opened.jti,
        "tenant": opened.tenant, "agent": opened.agent, "tool": opened.tool,
        "amount_usd": format_usd(opened.amount), "refundable_usd": format_usd(opened.refundable),
        "credited_to": opened.credited_to, "reason": request.reason}, at=at)
    return True


def stored_by_key(conn: Connection, tenant: str, key: str) -> StoredRefund | None:
    row = conn.execute(_STORED.where(r.tenant == tenant, r.idempotency_key == key)).first()
    return None if row is None else _stored(row)


def of_call(conn: Connection, call_id: str) -> list[StoredRefund]:
    """The refunds of a call, oldest first."""
    rows = conn.execute(_STORED.where(r.call_id == call_id).order_by(r.created_at, r.id))
    return [_stored(row) for row in rows]


# --- internals ---------------------------------------------------------------------------------


def _stored(row: Any) -> StoredRefund:
    return StoredRefund(row.id, row.call_id, int(row.amount),
                        None if row.requested is None else int(row.requested),
                        int(row.refunded_after), row.credited_to, row.reason,
                        row.idempotency_key, row.receipt, aware(row.created_at))


def _raise_refunded(conn: Connection, call_id: str, amount: int) -> int | None:
    """The guard: the call's refunded after ``amount`` more, or None if that passes its charge
    (or it is not captured any more)."""
    row = conn.execute(
        update(calls)
        .where(c.id == call_id, c.status == "captured", c.refunded + amount <= c.amount)
        .values(refunded=c.refunded + amount).returning(c.refunded)).first()
    return None if row is None else int(row[0])


def _credit_target(conn: Connection, jti: str, tenant: str, at: datetime) -> str:
    """``token:<jti>`` while the token is active at ``at``, else ``tenant:<tenant>``; the
    token's account row locked first (revoke's order: a revoke in flight finishes before)."""
    conn.execute(select(accounts.c.id).where(accounts.c.id == ops.token_account(jti))
                 .with_for_update()).all()
    token = conn.execute(select(tk.revoked_at, tk.expires_at).where(tk.jti == jti)).first()
    if token is not None and token.revoked_at is None and aware(token.expires_at) > at:
        return ops.token_account(jti)
    target = ops.tenant_account(tenant)
    ops.ensure_account(conn, target, kind="tenant", guarded=True, at=at)
    return target


def _revenue_of(conn: Connection, call: Any) -> str:
    """Where the call's charge went: the credit account of its posted transfer."""
    account = conn.execute(select(t.credit_account_id).where(t.id == call.transfer_id)).scalar()
    return str(account) if account is not None else ops.revenue_account(call.jti)


def _detail(opened: Opened, request: RefundRequest) -> dict[str, Any]:
    detail: dict[str, Any] = {"receipt_id": opened.call_id, "credited_to": opened.credited_to}
    if request.reason:
        detail["reason"] = request.reason
    if request.idempotency_key is not None:
        detail["idempotency_key"] = request.idempotency_key
    return detail

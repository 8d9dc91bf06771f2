"""Billed calls on the ledger: the verifier's hot path, a few statements per transaction.

Each step returns what happened (:data:`Opening`, :class:`Settled`, :class:`NotActive`)
rather than raising, and never calls back into the verifier: the verifier runs a step, signs,
runs the next step, in one transaction, top to bottom.

A call is one row of ``calls`` (its idempotency record, outcome and receipt) plus the transfers
that move its money between ``token:<jti>`` and ``revenue:<jti>``. The debit is the guard:
one ``UPDATE ... WHERE NOT closed AND available >= amount RETURNING available``, so no
interleaving of threads, processes or servers can spend past the limit or after a revocation.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import Connection, bindparam, func, select, update

from mcpbill_cli.budgets import Budget
from mcpbill_cli.clock import aware, utcnow
from mcpbill_cli.errors import LedgerUnavailable
from mcpbill_cli.ledger import alerts, audit, budgets, ops, rates
from mcpbill_cli.ledger.fastsql import Prepared
from mcpbill_cli.ledger.models import (
    accounts,
    calls,
    pricing_versions,
    transfers,
)
from mcpbill_cli.pricing import document_digest
from mcpbill_cli.ratelimits import Counter

a = accounts.c
c = calls.c
t = transfers.c
_AVAILABLE = a.credits_posted - a.debits_posted - a.debits_pending

# Compiled once per dialect and run on the driver connection (see fastsql).
_DEBIT_POSTED = Prepared(
    update(accounts)
    .where(a.id == bindparam("account"), a.closed.is_(False), _AVAILABLE >= bindparam("amount"))
    .values(debits_posted=a.debits_posted + bindparam("amount"))
    .returning(_AVAILABLE, a.credits_posted)
)
_DEBIT_PENDING = Prepared(
    update(accounts)
    .where(a.id == bindparam("account"), a.closed.is_(False), _AVAILABLE >= bindparam("amount"))
    .values(debits_pending=a.debits_pending + bindparam("amount"))
    .returning(_AVAILABLE, a.credits_posted)
)
_CREDIT_POSTED = Prepared(update(accounts).where(a.id == bindparam("account"))
                          .values(credits_posted=a.credits_posted + bindparam("amount")))
_CREDIT_PENDING = Prepared(update(accounts).where(a.id == bindparam("account"))
                           .values(credits_pending=a.credits_pending + bindparam("amount")))
_INSERT_TRANSFER = Prepared(transfers.insert(), columns=ops.TRANSFER_COLUMNS)
_STORED = select(c.id, c.idempotency_key, c.request_hash, c.jti, c.tenant, c.tool, c.status,
                 c.amount_held, c.amount, c.receipt, c.timeout_at, c.resolved_at, c.result)
_STORED_BY_KEY = Prepared(_STORED.where(c.tenant == bindparam("b_tenant"),
                                        c.idempotency_key == bindparam("b_key"),
                                        c.key_retired.is_(False)))
_STORED_BY_ID = Prepared(_STORED.where(c.id == bindparam("b_id")))
# A derived key frees itself for a new call once its window has passed: the old call keeps its
# row and its key, retired (the unique index covers live keys only).
_RETIRE_KEY = Prepared(update(calls).where(c.id == bindparam("b_id"), c.key_retired.is_(False))
                       .values(key_retired=True))
# Off the hot path (a few times per long call), through SQLAlchemy: they take lists of ids.
_EXTEND_CALLS = (update(calls).where(c.id.in_(bindparam("b_ids", expanding=True)),
                                     c.status == "held", c.timeout_at > bindparam("b_now"))
                 .values(timeout_at=bindparam("b_until")).returning(c.id))
_EXTEND_HOLDS = (update(transfers).where(
    t.id.in_(bindparam("b_holds", expanding=True)), t.kind == "pending", t.status == "pending",
    t.timeout_at > bindparam("b_now")).values(timeout_at=bindparam("b_until")))
_RESOLVE = (update(calls).where(c.id == bindparam("b_id"), c.status == "held")
            .values(status=bindparam("b_status"), resolved_at=bindparam("b_at"))
            .returning(c.jti, c.tenant, c.agent, c.tool, c.amount_held, c.demo, c.created_at,
                       c.budgets))
_RESOLVE_CALL = Prepared(_RESOLVE)
_RESOLVE_CALL_BEFORE_TIMEOUT = Prepared(_RESOLVE.where(c.timeout_at > bindparam("b_at")))
_RECORD_CAPTURE = Prepared(update(calls).where(c.id == bindparam("b_id")).values(
    amount=bindparam("b_amount"), units=bindparam("b_units"),
    transfer_id=bindparam("b_transfer"), receipt=bindparam("b_receipt"),
    result=bindparam("b_result")))
_LAPSED_HOLDS = (select(func.coalesce(func.sum(t.amount), 0))
                 .where(t.debit_account_id == bindparam("b_account"), t.kind == "pending",
                        t.status == "pending", t.timeout_at <= bindparam("b_now"))
                 .scalar_subquery())
_AVAILABLE_NOW = Prepared(select(_AVAILABLE + _LAPSED_HOLDS, a.closed).where(
    a.id == bindparam("b_account")))
_VERSION_OF_DIGEST = Prepared(select(pricing_versions.c.version)
                              .where(pricing_versions.c.digest == bindparam("b_digest")))
_PRICING_VERSION_TAKEN = Prepared(select(pricing_versions.c.version)
                                  .where(pricing_versions.c.version == bindparam("b_version")))
_NEXT_PRICING_VERSION = Prepared(select(func.coalesce(func.max(pricing_versions.c.version), 0)
                                        + 1))
_RECORD_ATTEMPTS = 5


def new_call_id() -> str:
    """A receipt id that sorts by time: new rows land at the right edge of every index on
    ``calls.id`` and ``transfers.id``, which keeps each commit's dirty pages few."""
    return f"rcpt_{time.time_ns():016x}{secrets.token_hex(6)}"


# --- what a step of a call tells the verifier ----------------------------------------------
# Every step below runs inside the caller's transaction and returns what happened; a step that
# did not go through leaves writes behind that the caller rolls back (the verifier does).


@dataclass(frozen=True)
class Opened:
    """The call's money moved and its row is written; ``remaining`` is the token's balance."""

    remaining: int


@dataclass(frozen=True)
class KeyTaken:
    """The tenant's idempotency key already belongs to a call: what it means is the caller's."""

    key: str


@dataclass(frozen=True)
class Refused:
    """The debit was refused: ``closed`` (a revoked token), ``unknown`` (no such token),
    ``funds`` (``available`` is short), ``budget`` (a cap's window is full: ``cap``) or
    ``rate`` (a rate limit is reached: ``limited`` says which).
    """

    reason: Literal["closed", "unknown", "funds", "budget", "rate"]
    available: int = 0
    cap: budgets.CapReached | None = None
    limited: rates.Limited | None = None


Opening = Opened | KeyTaken | Refused


@dataclass(frozen=True)
class Settled:
    """A held call posted for ``posted`` (the rest returned); ``row`` is the call's."""

    posted: int
    remaining: int
    row: Any


@dataclass(frozen=True)
class NotActive:
    """The hold is no longer held: ``state`` is captured, voided, expired, timed out or
    unknown; ``key`` is the call's idempotency key when it was captured."""

    state: str
    key: str | None = None


@dataclass(frozen=True)
class NewCall:
    id: str
    idempotency_key: str
    request_hash: str
    jti: str
    tenant: str
    agent: str
    tool: str
    units: int | None
    amount: int
    pricing_version: int
    price_rule: str
    demo: bool
    # The caps this call counts against (tenant, agent, token; day, month), in that order.
    budgets: tuple[Budget, ...] = ()
    # None: the caller gave the key. Else the key was derived from the call itself, and a
    # repeat within this many seconds of the call's end is the same call.
    dedupe_window: int | None = None
    # The rate limit counters the call counts in (none: no rate applies, nothing is read).
    rates: tuple[Counter, ...] = ()

    @property
    def account(self) -> str:
        return ops.token_account(self.jti)

    @property
    def revenue(self) -> str:
        return ops.revenue_account(self.jti)


@dataclass(frozen=True)
class StoredCall:
    id: str
    idempotency_key: str
    request_hash: str
    jti: str
    tenant: str
    tool: str
    status: str
    amount_held: int
    amount: int | None
    receipt: str | None
    timeout_at: datetime | None
    resolved_at: datetime | None
    result: str | None


def stored(conn: Connection, *, tenant: str | None = None, key: str | None = None,
           call_id: str | None = None) -> StoredCall | None:
    """The call under ``tenant``'s idempotency ``key``, or the call ``call_id``."""
    if key is not None:
        row = _STORED_BY_KEY.first(conn, {"b_tenant": tenant, "b_key": key})
    else:
        row = _STORED_BY_ID.first(conn, {"b_id": call_id})
    return StoredCall(*row) if row is not None else None


def with_key(conn: Connection, key: str) -> list[StoredCall]:
    """The live calls under ``key`` in every tenant (an operator's lookup, not the call path)."""
    rows = conn.execute(_STORED.where(c.idempotency_key == key, c.key_retired.is_(False))
                        .order_by(c.tenant))
    return [StoredCall(*tuple(row)) for row in rows]


def retire_key(conn: Connection, call: StoredCall) -> bool:
    """Free ``call``'s derived key for a new call (its window has passed); False if it was
    retired or changed meanwhile."""
    return _RETIRE_KEY.rowcount(conn, {"b_id": call.id}) == 1


def extend(conn: Connection, call_ids: list[str], *, until: datetime, now: datetime
           ) -> set[str]:
    """Move the timeout of held calls still live at ``now`` to ``until``; returns their ids.

    A call that was resolved, or whose hold lapsed already, is left as it is: once lapsed, a
    hold may have been voided by a sweep, and the money it held may be spent elsewhere.
    """
    live = set(conn.execute(_EXTEND_CALLS, {"b_ids": call_ids, "b_now": now,
                                            "b_until": until}).scalars())
    if live:
        conn.execute(_EXTEND_HOLDS, {"b_holds": [f"hold:{i}" for i in sorted(live)],
                                     "b_now": now, "b_until": until})
    return live


def debit_charge(conn: Connection, call: NewCall, *, at: datetime) -> Opened | Refused:
    """Post the call's price at once (its row comes with the receipt: :func:`record_charge`)."""
    limited = _count_rates(conn, call, at)
    if limited is not None:
        return limited
    debited = _debit(conn, _DEBIT_POSTED, call, at)
    if isinstance(debited, Refused):
        return debited
    _credit(conn, _CREDIT_POSTED, call)
    _transfer(conn, f"charge:{call.id}", call, "posted", "charge", at)
    return _count_budgets(conn, call, at) or Opened(debited)


def record_charge(conn: Connection, call: NewCall, *, at: datetime, receipt: str,
                  result: str | None = None) -> None | KeyTaken:
    """The charged call's row, its signed receipt, its kept ``result`` (JSON, for replays) and
    its event; KeyTaken if the key is."""
    if not _insert_call(conn, call, status="captured", amount=call.amount,
                        transfer_id=f"charge:{call.id}", receipt=receipt, timeout_at=None, at=at,
                        result=result):
        return KeyTaken(call.idempotency_key)
    audit.record(conn, "charge", at=at, jti=call.jti, tenant=call.tenant, agent=call.agent,
                 tool=call.tool, amount=call.amount, ref=call.id, demo=call.demo)
    return None


def hold(conn: Connection, call: NewCall, *, at: datetime, timeout_at: datetime) -> Opening:
    """Reserve the call's amount as a pending transfer and write its row."""
    limited = _count_rates(conn, call, at)
    if limited is not None:
        return limited
    debited = _debit(conn, _DEBIT_PENDING, call, at)
    if isinstance(debited, Refused):
        return debited
    _credit(conn, _CREDIT_PENDING, call)
    _transfer(conn, f"hold:{call.id}", call, "pending", "hold", at, timeout_at=timeout_at)
    capped = _count_budgets(conn, call, at)
    if capped is not None:
        return capped
    if not _insert_call(conn, call, status="held", amount=None, transfer_id=None, receipt=None,
                        timeout_at=timeout_at, at=at):
        return KeyTaken(call.idempotency_key)
    audit.record(conn, "hold", at=at, jti=call.jti, tenant=call.tenant, agent=call.agent,
                 tool=call.tool, amount=call.amount, ref=call.id, demo=call.demo)
    return Opened(debited)


def settle(conn: Connection, call_id: str, *, amount: int | None, at: datetime
           ) -> Settled | NotActive:
    """Post a held call before its timeout, in full or for ``amount`` (the rest returns); its
    receipt comes after (:func:`record_capture`)."""
    row = _resolve_call(conn, call_id, "captured", at, before_timeout=True)
    if isinstance(row, NotActive):
        return row
    settled = ops.post_pending(conn, id=f"capture:{call_id}", pending_id=f"hold:{call_id}",
                               amount=amount, at=at)
    _give_back(conn, row, row.amount_held - settled.amount)
    return Settled(settled.amount, settled.available, row)


def record_capture(conn: Connection, call_id: str, settled: Settled, *, units: int | None,
                   at: datetime, receipt: str, result: str | None) -> None:
    """The settled call's receipt, units and kept ``result`` (JSON, for replays), its event."""
    _RECORD_CAPTURE.rowcount(conn, {"b_id": call_id, "b_amount": settled.posted,
                                    "b_units": units, "b_transfer": f"capture:{call_id}",
                                    "b_receipt": receipt, "b_result": result})
    row = settled.row
    audit.record(conn, "capture", at=at, jti=row.jti, tenant=row.tenant, agent=row.agent,
                 tool=row.tool, amount=settled.posted, ref=call_id, demo=row.demo)


def void(conn: Connection, call_id: str, *, at: datetime, expired: bool = False
         ) -> int | NotActive:
    """Release a held call; the amount released."""
    row = _resolve_call(conn, call_id, "expired" if expired else "voided", at,
                        before_timeout=not expired)
    if isinstance(row, NotActive):
        return row
    released = ops.void_pending(conn, id=f"{'expire' if expired else 'void'}:{call_id}",
                                pending_id=f"hold:{call_id}", at=at, expired=expired)
    _give_back(conn, row, released)
    audit.record(conn, "expire" if expired else "void", at=at, jti=row.jti, tenant=row.tenant,
                 agent=row.agent, tool=row.tool, amount=released, ref=call_id, demo=row.demo)
    return released


def expire_call(conn: Connection, pending_id: str, *, now: datetime) -> bool:
    """Void a hold past its timeout (named by its pending transfer id); False if it was not."""
    return not isinstance(void(conn, pending_id.removeprefix("hold:"), at=now, expired=True),
                          NotActive)


def available(conn: Connection, jti: str, *, now: datetime) -> tuple[int, bool] | None:
    """(available, closed) of a token's account, or None when the ledger does not know it.

    Holds past their timeout count as available: they are voided lazily, by the next hold
    that needs the money or by a sweep, and a quote should not refuse what a hold would get.
    """
    row = _AVAILABLE_NOW.first(conn, {"b_account": ops.token_account(jti), "b_now": now})
    return (int(row[0]), bool(row[1])) if row is not None else None


def record_pricing_version(conn: Connection, document: dict[str, Any], *, at: datetime) -> int:
    """Keep a pricing table (``document``, its normal form) and return the version it is
    charged under: its own, unless the ledger already holds other prices under that number.

    One version, one content: a table hand-edited without a ``version`` bump is recorded under
    the next free number, so no receipt ever names a version that had other prices. The same
    content (its digest) always gets the same number, on every replica.
    """
    digest = document_digest(document)
    for _ in range(_RECORD_ATTEMPTS):
        known = _VERSION_OF_DIGEST.first(conn, {"b_digest": digest})
        if known is not None:
            return int(known[0])
        version = int(document["version"])
        if _PRICING_VERSION_TAKEN.first(conn, {"b_version": version}) is not None:
            version = int(_NEXT_PRICING_VERSION.first(conn, {})[0])
        if ops.insert_ignore(conn, pricing_versions, {
                "version": version, "document": json.dumps({**document, "version": version},
                                                           sort_keys=True),
                "recorded_at": at, "digest": digest}):
            return version
    raise LedgerUnavailable("could not record the pricing table: other writers kept taking "
                            "its version number; retry")


# --- internals ---------------------------------------------------------------------------------


def _debit(conn: Connection, statement: Prepared, call: NewCall, at: datetime
           ) -> int | Refused:
    """The token's guarded debit: what remains, or why it was refused. A debit that takes the
    token's use over 80% or 100% of what it was credited emits ``token.threshold``."""
    row = statement.first(conn, {"account": call.account, "amount": call.amount})
    if row is not None:
        available, credited = int(row[0]), int(row[1])
        if alerts.crossed(credited - available - call.amount, credited - available, credited):
            alerts.token_debited(conn, jti=call.jti, tenant=call.tenant, agent=call.agent,
                                 amount=call.amount, available=available, credited=credited,
                                 at=at)
        return available
    balance = ops.find_balance(conn, call.account)
    if balance is None:
        return Refused("unknown")
    if balance.closed:
        return Refused("closed")
    return Refused("funds", available=balance.available)


def _credit(conn: Connection, statement: Prepared, call: NewCall) -> None:
    params = {"account": call.revenue, "amount": call.amount}
    if statement.rowcount(conn, params) == 1:
        return
    # A token issued before revenue accounts were per token (its upgrade creates them), or a
    # row someone removed: the money must land somewhere that balances, never nowhere.
    ops.ensure_account(conn, call.revenue, kind="revenue", guarded=False, at=utcnow())
    statement.rowcount(conn, params)


def _transfer(conn: Connection, id: str, call: NewCall, kind: str, code: str, at: datetime,
              timeout_at: datetime | None = None) -> None:
    _INSERT_TRANSFER.rowcount(conn, {
        "id": id, "debit_account_id": call.account, "credit_account_id": call.revenue,
        "amount": call.amount, "kind": kind, "pending_id": None,
        "status": "pending" if kind == "pending" else None, "timeout_at": timeout_at,
        "code": code, "ref": call.id, "demo": call.demo, "created_at": at})


def _insert_call(conn: Connection, call: NewCall, *, status: str, amount: int | None,
                 transfer_id: str | None, receipt: str | None, timeout_at: datetime | None,
                 at: datetime, result: str | None = None) -> bool:
    return ops.insert_ignore(conn, calls, {
        "id": call.id, "idempotency_key": call.idempotency_key,
        "request_hash": call.request_hash, "jti": call.jti, "tenant": call.tenant,
        "agent": call.agent, "tool": call.tool, "units": call.units,
        "amount_held": call.amount, "amount": amount, "status": status,
        "transfer_id": transfer_id, "timeout_at": timeout_at,
        "pricing_version": call.pricing_version, "price_rule": call.price_rule,
        "receipt": receipt, "demo": call.demo, "created_at": at, "key_retired": False,
        "resolved_at": at if status == "captured" else None, "result": result,
        **_counted_in(call)})


def _counted_in(call: NewCall) -> dict[str, str]:
    """The ``budgets`` column of a call counted in windows; none named for a call without
    caps (the common case: the INSERT every schema since 0004 takes)."""
    names = budgets.names(call.budgets)
    return {"budgets": names} if names is not None else {}


def _count_rates(conn: Connection, call: NewCall, at: datetime) -> Refused | None:
    """Count the call in its rate limit counters first (a refusal then costs no debit), in
    one statement; none when no rate applies."""
    if not call.rates:
        return None
    limited = rates.count(conn, call.rates, call.amount, at)
    return None if limited is None else Refused("rate", limited=limited)


def _count_budgets(conn: Connection, call: NewCall, at: datetime) -> Refused | None:
    """Count the amount into the window of each of the call's caps; Refused past one."""
    if not call.budgets:
        return None
    reached = budgets.count(conn, call.budgets, _spender(call), call.amount, at=at)
    return Refused("budget", cap=reached) if reached is not None else None


def _give_back(conn: Connection, row: Any, amount: int) -> None:
    """Return what a hold did not spend to the windows it was counted in, at its creation."""
    budgets.give_back(conn, row.budgets, _spender(row), amount,
                      counted_at=aware(row.created_at))


def _spender(call: Any) -> budgets.Spender:
    return budgets.Spender(call.tenant, call.agent, call.jti)


def _resolve_call(conn: Connection, call_id: str, status: str, at: datetime, *,
                  before_timeout: bool) -> Any:
    """Flip a held call to ``status`` once: its row, or why it is not held any more."""
    query = _RESOLVE_CALL_BEFORE_TIMEOUT if before_timeout else _RESOLVE_CALL
    row = query.first(conn, {"b_id": call_id, "b_status": status, "b_at": at})
    if row is not None:
        return row
    current = stored(conn, call_id=call_id)
    if current is None:
        return NotActive("unknown")
    if current.status == "held":
        return NotActive("timed out")
    return NotActive(current.status, current.idempotency_key)

"""Moving money: accounts and transfers, each function one step inside the caller's transaction.

Guards live in the statements: a debit of a guarded account is an ``UPDATE ... WHERE`` the
available balance covers it, so no interleaving of threads, processes or servers can overdraw.
A transfer id is chosen by the caller; the same id with the same parameters is a no-op.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Table, and_, bindparam, insert, or_, select, update

from mcpbill_cli.errors import (
    HoldNotActive,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidInput,
    NotFound,
)
from mcpbill_cli.ledger.fastsql import Prepared
from mcpbill_cli.ledger.models import accounts, transfers
from mcpbill_cli.money import format_usd

REVENUE = "revenue"  # what calls earned before each token had a revenue account of its own
DEMO_SOURCE = "chain:demo"

a = accounts.c
t = transfers.c
_AVAILABLE = a.credits_posted - a.debits_posted - a.debits_pending

TRANSFER_COLUMNS = ("id", "debit_account_id", "credit_account_id", "amount", "kind",
                    "pending_id", "status", "timeout_at", "code", "ref", "demo", "created_at")

# Statements on the verifier's path: compiled once per dialect, run on the driver connection.
_BALANCE_QUERY = select(a.id, a.debits_posted, a.credits_posted, a.debits_pending,
                        a.credits_pending, a.closed).where(a.id == bindparam("b_account"))
_BALANCE = Prepared(_BALANCE_QUERY)
_BALANCE_FOR_UPDATE = Prepared(_BALANCE_QUERY.with_for_update())
_RESOLVE_QUERY = (
    update(transfers)
    .where(t.id == bindparam("b_id"), t.kind == "pending", t.status == "pending")
    .values(status=bindparam("b_status"))
    .returning(t.id, t.debit_account_id, t.credit_account_id, t.amount, t.demo, t.ref))
_RESOLVE = Prepared(_RESOLVE_QUERY)
_RESOLVE_BEFORE_TIMEOUT = Prepared(_RESOLVE_QUERY.where(t.timeout_at > bindparam("b_at")))
_INSERT_TRANSFER = Prepared(insert(transfers), columns=TRANSFER_COLUMNS)
_SETTLE_DEBIT = Prepared(update(accounts).where(a.id == bindparam("b_account")).values(
    debits_pending=a.debits_pending - bindparam("b_pending"),
    debits_posted=a.debits_posted + bindparam("b_posted")).returning(_AVAILABLE))
_SETTLE_CREDIT = Prepared(update(accounts).where(a.id == bindparam("b_account")).values(
    credits_pending=a.credits_pending - bindparam("b_pending"),
    credits_posted=a.credits_posted + bindparam("b_posted")))


def tenant_account(tenant: str) -> str:
    return f"tenant:{tenant}"


def token_account(jti: str) -> str:
    return f"token:{jti}"


def revenue_account(jti: str) -> str:
    """What ``jti``'s calls earn: one account per token, so no paid call writes a row that
    calls of other tokens write too (a shared revenue row would serialise a deployment)."""
    return f"revenue:{jti}"


def chain_account(caip2: str) -> str:
    return f"chain:{caip2}"


class AccountClosed(InsufficientFunds):
    """The account was closed (a revoked token): it takes no new debits."""


@dataclass(frozen=True)
class Balance:
    account: str
    debits_posted: int
    credits_posted: int
    debits_pending: int
    credits_pending: int
    closed: bool

    @property
    def available(self) -> int:
        return self.credits_posted - self.debits_posted - self.debits_pending

    @property
    def posted(self) -> int:
        return self.credits_posted - self.debits_posted


def insert_ignore(conn: Connection, table: Table, values: dict[str, Any]) -> bool:
    """INSERT unless the primary or a unique key exists; True when a row was written.

    ``values`` must name every column the row needs (Python-side defaults are not applied).
    """
    statement = _insert_ignore_statement(conn.dialect.name, table, tuple(values))
    return statement.first(conn, values) is not None


@functools.cache
def _insert_ignore_statement(dialect_name: str, table: Table, columns: tuple[str, ...]
                             ) -> Prepared:
    """Built once per table and set of columns, compiled once, run on the driver."""
    dialect_insert: Any
    if dialect_name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    key = list(table.primary_key.columns)[0]
    # RETURNING, not rowcount: drivers disagree on rowcount for INSERT ... ON CONFLICT.
    return Prepared(dialect_insert(table).on_conflict_do_nothing().returning(key),
                    columns=columns)


def ensure_account(
    conn: Connection, account: str, *, kind: str, guarded: bool, at: datetime
) -> None:
    insert_ignore(conn, accounts, {
        "id": account, "kind": kind, "guarded": guarded, "closed": False, "debits_posted": 0,
        "credits_posted": 0, "debits_pending": 0, "credits_pending": 0, "created_at": at,
    })


def find_balance(conn: Connection, account: str) -> Balance | None:
    """The account's sums, or ``None`` when there is no such account."""
    row = _BALANCE.first(conn, {"b_account": account})
    return None if row is None else Balance(*row)


def balance(conn: Connection, account: str, *, lock: bool = False) -> Balance:
    query = _BALANCE_FOR_UPDATE if lock else _BALANCE
    row = query.first(conn, {"b_account": account})
    if row is None:
        raise NotFound(f"no account {account}")
    return Balance(*row)


MAX_KEY = 128


def keyed_id(prefix: str, owner: str, key: str) -> str:
    """A transfer id for an operator's idempotency key (``wallet fund``, ``token topup``),
    scoped to its owner (a tenant, a token) and hashed, so any owner and key fit the column:
    the transfer's primary key is what makes the move happen once."""
    if not key or len(key) > MAX_KEY or not key.isprintable():
        raise InvalidInput(f"an idempotency key is 1 to {MAX_KEY} printable characters",
                           field="idempotency_key")
    digest = hashlib.sha256(f"{owner}\0{key}".encode()).hexdigest()
    return f"{prefix}:key:{digest[:40]}"


def transfer_amount(conn: Connection, transfer_id: str) -> int:
    """What a posted transfer moved (the earlier move an idempotency key names)."""
    return int(conn.execute(select(t.amount).where(t.id == transfer_id)).scalar_one())


def key_conflict(conn: Connection, transfer_id: str, key: str | None, *, did: str,
                 another: str) -> IdempotencyConflict:
    """The refusal of an idempotency key reused for another amount: what the key ``did``
    already (e.g. ``funded acme``), with the amount it moved."""
    earlier = format_usd(transfer_amount(conn, transfer_id))
    return IdempotencyConflict(
        f"idempotency key {key!r} already {did} with {earlier} USDC; use a new key for "
        f"another {another}", amount_usd=earlier)


def transfer(
    conn: Connection, *, id: str, debit: str, credit: str, amount: int, code: str,
    at: datetime, demo: bool = False, ref: str | None = None, allow_closed: bool = False,
) -> bool:
    """Post ``amount`` from ``debit`` to ``credit``. False if ``id`` already did exactly this.

    A closed ``debit`` account refuses unless ``allow_closed`` (returning a revoked remainder).
    """
    _require_positive(amount)
    row = {"id": id, "debit_account_id": debit, "credit_account_id": credit, "amount": amount,
           "kind": "posted", "code": code, "ref": ref, "demo": demo, "created_at": at}
    if not insert_ignore(conn, transfers, row):
        _same_transfer_or_conflict(conn, row)
        return False
    _move(conn, debit, a.debits_posted, amount, allow_closed=allow_closed)
    _move(conn, credit, a.credits_posted, amount)
    return True


def hold(
    conn: Connection, *, id: str, debit: str, credit: str, amount: int, timeout_at: datetime,
    code: str, at: datetime, demo: bool = False, ref: str | None = None,
) -> bool:
    """Reserve ``amount`` as a pending transfer that times out at ``timeout_at``."""
    _require_positive(amount)
    row = {"id": id, "debit_account_id": debit, "credit_account_id": credit, "amount": amount,
           "kind": "pending", "status": "pending", "timeout_at": timeout_at, "code": code,
           "ref": ref, "demo": demo, "created_at": at}
    if not insert_ignore(conn, transfers, row):
        _same_transfer_or_conflict(conn, row)
        return False
    _move(conn, debit, a.debits_pending, amount)
    _move(conn, credit, a.credits_pending, amount)
    return True


@dataclass(frozen=True)
class Posted:
    amount: int  # what was posted
    available: int  # what the debit account has available after it


def post_pending(
    conn: Connection, *, id: str, pending_id: str, amount: int | None, at: datetime,
    code: str = "capture",
) -> Posted:
    """Post a pending transfer, in full or in part (the rest returns)."""
    pending = _resolve(conn, pending_id, "posted", at)
    posted = pending.amount if amount is None else amount
    if not 0 <= posted <= pending.amount:
        raise InvalidInput(f"cannot capture {posted} of a hold of {pending.amount}")
    _record_resolution(conn, id, pending, posted, "post_pending", code, at)
    return Posted(posted, _settle(conn, pending, posted))


def void_pending(
    conn: Connection, *, id: str, pending_id: str, at: datetime, expired: bool = False
) -> int:
    """Release a pending transfer; returns the amount that was reserved."""
    pending = _resolve(conn, pending_id, "expired" if expired else "voided",
                       None if expired else at)
    _record_resolution(conn, id, pending, pending.amount, "void_pending",
                       "expire" if expired else "void", at)
    _settle(conn, pending, 0)
    return int(pending.amount)


def expired_holds(conn: Connection, *, at: datetime, debit: str | None = None,
                  limit: int = 500) -> list[str]:
    """Ids of pending transfers whose timeout has passed (optionally of one debit account)."""
    query = select(t.id).where(t.status == "pending", t.timeout_at <= at)
    if debit is not None:
        query = query.where(t.debit_account_id == debit)
    return list(conn.execute(query.limit(limit)).scalars())


def release_available(
    conn: Connection, *, id: str, debit: str, credit: str, code: str, at: datetime,
    demo: bool = False, ref: str | None = None,
) -> int:
    """Move everything available in ``debit`` (not spent, not held) to ``credit``."""
    available = balance(conn, debit, lock=True).available
    if available > 0:
        transfer(conn, id=id, debit=debit, credit=credit, amount=available, code=code, at=at,
                 demo=demo, ref=ref, allow_closed=True)
    return available


def close_account(conn: Connection, account: str) -> bool:
    """Close an account to new debits; False if it was closed already."""
    result = conn.execute(
        update(accounts).where(a.id == account, a.closed.is_(False)).values(closed=True)
    )
    return result.rowcount == 1


# --- internals ---------------------------------------------------------------------------------


def _require_positive(amount: int) -> None:
    if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
        raise InvalidInput(f"a transfer amount must be a positive integer, not {amount!r}")


def _move(conn: Connection, account: str, column: Any, amount: int, *,
          allow_closed: bool = False) -> None:
    """Add ``amount`` to one of ``account``'s sums; a debit of a guarded account must be covered."""
    query = update(accounts).where(a.id == account)
    if column is a.debits_posted or column is a.debits_pending:
        covered = _AVAILABLE >= amount
        if not allow_closed:
            covered = and_(a.closed.is_(False), covered)
        query = query.where(or_(a.guarded.is_(False), covered))
    if conn.execute(query.values({column: column + amount})).rowcount != 1:
        explain_refused_debit(conn, account, amount)


def explain_refused_debit(conn: Connection, account: str, amount: int) -> None:
    bal = balance(conn, account)  # raises NotFound for a missing account
    if bal.closed:
        raise AccountClosed(f"{account} is closed", account=account)
    raise InsufficientFunds(
        f"{account} has {bal.available} available, {amount - bal.available} short of {amount}",
        account=account, available=bal.available, requested=amount,
    )


def _same_transfer_or_conflict(conn: Connection, row: dict[str, Any]) -> None:
    existing = conn.execute(select(t.debit_account_id, t.credit_account_id, t.amount, t.kind)
                            .where(t.id == row["id"])).one()
    if tuple(existing) != (row["debit_account_id"], row["credit_account_id"], row["amount"],
                           row["kind"]):
        raise IdempotencyConflict(
            f"transfer {row['id']} already exists with other parameters", transfer=row["id"]
        )


def _resolve(conn: Connection, pending_id: str, status: str, at: datetime | None) -> Any:
    """Flip a pending transfer to ``status`` exactly once; refuse one resolved or timed out."""
    params = {"b_id": pending_id, "b_status": status, "b_at": at}
    row = (_RESOLVE if at is None else _RESOLVE_BEFORE_TIMEOUT).first(conn, params)
    if row is None:
        current = conn.execute(select(t.status, t.timeout_at).where(t.id == pending_id)).first()
        state = "unknown" if current is None else (
            "timed out" if current.status == "pending" else current.status)
        raise HoldNotActive(f"hold {pending_id} is {state}", hold=pending_id, state=state)
    return row


def _record_resolution(conn: Connection, id: str, pending: Any, amount: int, kind: str,
                       code: str, at: datetime) -> None:
    _INSERT_TRANSFER.rowcount(conn, {
        "id": id, "debit_account_id": pending.debit_account_id,
        "credit_account_id": pending.credit_account_id, "amount": amount, "kind": kind,
        "pending_id": pending.id, "status": None, "timeout_at": None, "code": code,
        "ref": pending.ref, "demo": pending.demo, "created_at": at})


def _settle(conn: Connection, pending: Any, posted: int) -> int:
    """Turn a reservation into ``posted`` (0 for a void) on both sides; the rest is released.
    Returns what the debit account has available after."""
    amounts = {"b_pending": pending.amount, "b_posted": posted}
    available = _SETTLE_DEBIT.first(conn, {"b_account": pending.debit_account_id, **amounts})
    _SETTLE_CREDIT.rowcount(conn, {"b_account": pending.credit_account_id, **amounts})
    return int(available[0])

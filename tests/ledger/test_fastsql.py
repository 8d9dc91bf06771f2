"""Prepared statements run on the driver must read and write exactly what Connection.execute
does, on both backends: the same stored values, defaults, rows, types and errors."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import Engine, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError

from mcpbill_cli.ledger import ops
from mcpbill_cli.ledger.engine import reading, writing
from mcpbill_cli.ledger.fastsql import Prepared
from mcpbill_cli.ledger.models import accounts, transfers

a = accounts.c
t = transfers.c
AT = datetime(2026, 11, 27, 12, 30, 15, 123456, tzinfo=UTC)
ACCOUNT_COLUMNS = ("id", "kind", "guarded", "debits_posted", "credits_posted", "debits_pending",
                   "credits_pending", "created_at")  # "closed" is left to its default


def _account(id: str) -> dict[str, object]:
    return {"id": id, "kind": "tenant", "guarded": True, "debits_posted": 0,
            "credits_posted": 500, "debits_pending": 0, "credits_pending": 0, "created_at": AT}


def test_insert_applies_column_defaults_and_stores_what_core_stores(engine: Engine) -> None:
    with writing(engine) as conn:
        Prepared(insert(accounts), columns=ACCOUNT_COLUMNS).rowcount(conn, _account("fast"))
        conn.execute(insert(accounts), _account("core"))
    with reading(engine) as conn:
        rows = {r.id: r for r in conn.execute(select(accounts))}
        raw = {r[0]: r[1:] for r in conn.exec_driver_sql(
            "SELECT id, closed, created_at FROM accounts")}
    assert rows["fast"].closed is False  # the column default, not NULL
    assert tuple(rows["fast"])[1:] == tuple(rows["core"])[1:]
    assert raw["fast"] == raw["core"]  # byte for byte the same stored values


def test_returning_rows_are_named_and_typed(engine: Engine) -> None:
    statement = Prepared(
        update(accounts).where(a.id == bindparam("b_id"), a.kind == "tenant")
        .values(debits_pending=a.debits_pending + bindparam("b_amount"))
        .returning(a.id, a.credits_posted - a.debits_pending, a.closed, a.created_at))
    with writing(engine) as conn:
        ops.insert_ignore(conn, accounts, {**_account("acme"), "closed": False})
        row = statement.first(conn, {"b_id": "acme", "b_amount": 120})
        missing = statement.first(conn, {"b_id": "nobody", "b_amount": 1})
    assert missing is None
    assert row.id == "acme"
    assert row[1] == 380
    assert row.closed is False
    assert isinstance(row.created_at, datetime)
    assert row.created_at.replace(tzinfo=UTC) == AT


def test_select_all_and_rowcount(engine: Engine) -> None:
    names = Prepared(select(a.id).where(a.kind == bindparam("b_kind")).order_by(a.id))
    touch = Prepared(update(accounts).where(a.kind == "tenant").values(credits_posted=1))
    with writing(engine) as conn:
        for id in ("b", "a", "c"):
            ops.insert_ignore(conn, accounts, {**_account(id), "closed": False})
        assert [r.id for r in names.all(conn, {"b_kind": "tenant"})] == ["a", "b", "c"]
        assert names.all(conn, {"b_kind": "chain"}) == []
        assert touch.rowcount(conn, {}) == 3


def test_datetime_parameters_compare_like_core(engine: Engine) -> None:
    """A timestamp bound on the driver must compare with stored ones as Core's would."""
    open_holds = Prepared(select(t.id).where(t.status == "pending",
                                             t.timeout_at > bindparam("b_at")))
    with writing(engine) as conn:
        ops.insert_ignore(conn, accounts, {**_account("payer"), "closed": False})
        ops.ensure_account(conn, ops.REVENUE, kind="revenue", guarded=False, at=AT)
        ops.hold(conn, id="h1", debit="payer", credit=ops.REVENUE, amount=5,
                 timeout_at=AT + timedelta(seconds=30), code="hold", at=AT)
    with reading(engine) as conn:
        for at in (AT, AT + timedelta(seconds=29, microseconds=999999),
                   AT + timedelta(seconds=30), AT + timedelta(seconds=31)):
            core = conn.execute(select(t.id).where(t.status == "pending", t.timeout_at > at))
            assert [r.id for r in open_holds.all(conn, {"b_at": at})] == [r.id for r in core]


def test_driver_errors_surface_as_sqlalchemy_errors_and_roll_back(engine: Engine) -> None:
    overdraw = Prepared(update(accounts).where(a.id == "acme")
                        .values(debits_posted=a.debits_posted + bindparam("b_amount")))
    with writing(engine) as conn:
        ops.insert_ignore(conn, accounts, {**_account("acme"), "closed": False})
    with pytest.raises(IntegrityError), writing(engine) as conn:
        overdraw.rowcount(conn, {"b_amount": 400})  # allowed: 500 credited
        overdraw.rowcount(conn, {"b_amount": 200})  # the CHECK constraint refuses
    with reading(engine) as conn:
        assert ops.balance(conn, "acme").debits_posted == 0  # the first UPDATE rolled back


def test_autobegins_like_connection_execute(engine: Engine) -> None:
    with engine.connect() as conn:
        Prepared(insert(accounts), columns=ACCOUNT_COLUMNS).rowcount(conn, _account("late"))
        assert conn.in_transaction()
        conn.rollback()
    with reading(engine) as conn:
        assert conn.execute(select(a.id).where(a.id == "late")).first() is None


def test_timestamps_and_flags_bound_in_turn_store_what_core_stores(engine: Engine) -> None:
    """Statements share a remembering processor per type: every value, whatever came before
    it (the same instant in another zone is another value to SQLite's processor), is stored
    as Core stores it."""
    later = AT + timedelta(microseconds=1)
    instants = [AT, later, AT, AT.astimezone(timezone(timedelta(hours=2))), later, later, AT]
    insert_account = Prepared(insert(accounts), columns=ACCOUNT_COLUMNS)
    touch = Prepared(update(accounts).where(a.id == bindparam("b_id"))
                     .values(guarded=bindparam("b_guarded")))
    with writing(engine) as conn:
        for i, at in enumerate(instants):
            guarded = i % 3 == 0
            fast = {**_account(f"fast{i}"), "created_at": at, "guarded": guarded}
            insert_account.rowcount(conn, fast)
            touch.rowcount(conn, {"b_id": f"fast{i}", "b_guarded": not guarded})
            conn.execute(insert(accounts), {**fast, "id": f"core{i}", "guarded": not guarded})
    with reading(engine) as conn:
        raw = {r[0]: r[1:] for r in conn.exec_driver_sql(
            "SELECT id, guarded, created_at FROM accounts")}
    for i in range(len(instants)):
        assert raw[f"fast{i}"] == raw[f"core{i}"], i


def test_a_statement_without_literals_still_converts_its_values(engine: Engine) -> None:
    """Values are passed on as given only when nothing needs converting: a timestamp bound by
    a statement with no literals of its own is stored as Core stores it."""
    stamp = Prepared(update(accounts).where(a.id == bindparam("b_id"))
                     .values(created_at=bindparam("b_at")))
    moved = AT + timedelta(days=1, microseconds=7)
    with writing(engine) as conn:
        for id in ("fast", "core"):
            ops.insert_ignore(conn, accounts, {**_account(id), "closed": False})
        assert stamp.rowcount(conn, {"b_id": "fast", "b_at": moved}) == 1
        conn.execute(update(accounts).where(a.id == "core").values(created_at=moved))
    with reading(engine) as conn:
        raw = dict(conn.exec_driver_sql("SELECT id, created_at FROM accounts").all())
    assert raw["fast"] == raw["core"]

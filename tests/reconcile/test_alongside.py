"""Queries run alongside the reconcile's own see its snapshot, not what was committed since."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import Connection, Engine, func, insert, select

from mcpbill_cli.ledger.engine import make_engine, reading
from mcpbill_cli.ledger.models import events, metadata
from mcpbill_cli.reconcile.alongside import alongside, start_beside
from mcpbill_cli.reconcile.tuning import Planning, begin, prepare

from .support import Ledger


def count_events(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(events)).scalar_one())


def commit_an_event(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(insert(events).values(at=func.now(), kind="later", demo=False))


def test_work_alongside_sees_the_snapshot(ledger: Ledger) -> None:
    with reading(ledger.engine) as conn:
        begin(conn, 2)
        before = count_events(conn)
        commit_an_event(ledger.engine)
        assert alongside(ledger.engine, conn, count_events, prepare(Planning.STREAMED))() == before
        assert count_events(conn) == before
    with reading(ledger.engine) as conn:
        assert count_events(conn) == before + 1


def test_work_beside_takes_the_snapshot_with_the_main_connection(ledger: Ledger) -> None:
    """Started before the main connection reads, the work beside it sees what it sees, on a
    connection and a thread of its own (SQLite too), and the writers go on at once."""
    with ledger.engine.connect() as other:
        before = count_events(other)
    with reading(ledger.engine) as conn:
        begin(conn, 2)
        go, ran_in = threading.Event(), []

        def wait_then_count(helper: Connection) -> int:
            ran_in.append(threading.get_ident())
            go.wait(10)
            return count_events(helper)

        [started] = start_beside(ledger.engine, conn,
                                 [(wait_then_count, prepare(Planning.STREAMED))])
        commit_an_event(ledger.engine)
        go.set()
        assert started() == before
        assert count_events(conn) == before
        assert ran_in != [threading.get_ident()]
    with reading(ledger.engine) as conn:
        assert count_events(conn) == before + 1


def test_a_read_only_sqlite_ledger_works_beside_at_its_place(ledger: Ledger) -> None:
    """No write lock to hold the writers off: the work runs on the main connection."""
    if ledger.engine.dialect.name != "sqlite":
        pytest.skip("a SQLite file opened read-only")
    engine = make_engine(f"sqlite:///file:{ledger.engine.url.database}?mode=ro&uri=true")
    try:
        with reading(engine) as conn:
            before, ran_in = count_events(conn), []

            def count_here(helper: Connection) -> int:
                ran_in.append(threading.get_ident())
                return count_events(helper)

            [started] = start_beside(engine, conn, [(count_here, prepare(Planning.STREAMED))])
            commit_an_event(ledger.engine)
            assert started() == before
            assert ran_in == [threading.get_ident()]
    finally:
        engine.dispose()


def test_an_in_memory_sqlite_ledger_works_beside_at_its_place() -> None:
    """Each connection to ``sqlite://`` has a database of its own: the main one's is used."""
    engine = make_engine("sqlite://")
    try:
        metadata.create_all(engine)
        commit_an_event(engine)
        with reading(engine) as conn:
            [started] = start_beside(engine, conn, [(count_events, prepare(Planning.STREAMED))])
            assert started() == 1
    finally:
        engine.dispose()

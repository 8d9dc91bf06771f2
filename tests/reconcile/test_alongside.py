"""Queries run alongside the reconcile's own see its snapshot, not what was committed since."""

from __future__ import annotations

from sqlalchemy import Connection, Engine, func, insert, select

from mcpbill_cli.ledger.engine import reading
from mcpbill_cli.ledger.models import events
from mcpbill_cli.reconcile.alongside import alongside
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

"""Engines for the ledger: the connections a verifier keeps open between paid calls
(``engine.Shelf``), and what becomes of them when a transaction fails or the server is lost."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.pool import QueuePool

from mcpbill_cli.errors import LedgerUnavailable
from mcpbill_cli.ledger import audit
from mcpbill_cli.ledger.engine import Shelf, reading
from mcpbill_cli.ledger.models import events

AT = datetime(2026, 12, 6, 5, 0, tzinfo=UTC)


def _events(engine: Engine) -> int:
    with reading(engine) as conn:
        return int(conn.execute(select(func.count()).select_from(events)).scalar_one())


def test_a_shelved_connection_runs_the_next_transaction_and_a_failed_one_is_let_go(
        engine: Engine) -> None:
    pool = engine.pool
    assert isinstance(pool, QueuePool)
    shelf = Shelf(engine)
    for _ in range(3):
        with shelf.writing() as conn:
            audit.record(conn, "test", at=AT)
        assert pool.checkedout() == 1  # the same one, kept open
    with pytest.raises(ValueError, match="the tool failed"), shelf.writing() as conn:
        audit.record(conn, "test", at=AT)
        raise ValueError("the tool failed")
    assert pool.checkedout() == 0  # back in the pool, rolled back
    assert _events(engine) == 3
    with shelf.writing() as conn:
        audit.record(conn, "test", at=AT)
    shelf.close()
    assert pool.checkedout() == 0 and _events(engine) == 4


def test_a_lost_server_connection_fails_one_transaction_and_the_next_reconnects(
        pg_engine: Engine) -> None:
    """Every shelved connection is let go at the first one found lost: a server restart
    fails one call, as it does without the shelf, not one per connection kept."""
    shelf = Shelf(pg_engine)
    with shelf.writing() as first, shelf.writing() as second:  # two kept at once
        pids = [conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
                for conn in (first, second)]
    with pg_engine.connect() as admin:
        for pid in pids:
            admin.execute(text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": pid})
    with pytest.raises(LedgerUnavailable), shelf.writing() as conn:
        conn.execute(text("SELECT 1"))
    for _ in range(3):
        with shelf.writing() as conn:
            audit.record(conn, "test", at=AT)
    assert _events(pg_engine) == 3
    shelf.close()


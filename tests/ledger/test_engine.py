"""Engines for the ledger: the connections a verifier keeps open between paid calls
(``engine.Shelf``), and what becomes of them when a transaction fails or the server is lost;
write transactions that must not wait for SQLite's lock (``engine.at_once``)."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.pool import QueuePool

from mcpbill_cli.errors import LedgerUnavailable
from mcpbill_cli.ledger import audit
from mcpbill_cli.ledger.engine import BUSY_TIMEOUT_MS, LedgerBusy, Shelf, at_once, reading, writing
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



@pytest.mark.parametrize("shelved", [False, True])
def test_at_once_a_write_finding_the_lock_taken_is_refused_at_once_and_writes_nothing(
        engine: Engine, shelved: bool) -> None:
    """On SQLite, a write begun under ``at_once`` while another writer holds the lock raises
    LedgerBusy before anything is written, without waiting. Once one has begun, the next ones
    of the block wait for the lock as usual (so LedgerBusy never comes after a write), and
    outside the block nothing changes. PostgreSQL has no such lock: ``at_once`` is a no-op."""
    shelf = Shelf(engine)
    begin = shelf.writing if shelved else (lambda: writing(engine))
    sqlite = engine.dialect.name == "sqlite"
    with writing(engine) as other:  # another writer, holding SQLite's lock
        if sqlite:
            started = time.monotonic()
            with pytest.raises(LedgerBusy), at_once(), begin() as conn:
                audit.record(conn, "test", at=AT)
            assert time.monotonic() - started < 1  # against a 30 s busy timeout
        audit.record(other, "other", at=AT)
    assert _events(engine) == 1  # the other writer's event, nothing of the refused one

    released = threading.Event()

    def hold_the_lock_a_moment() -> None:
        with writing(engine) as conn:
            audit.record(conn, "other", at=AT)
            released.wait(10)
            time.sleep(0.3)

    with at_once():
        with begin() as conn:  # the lock is free: begun at once
            audit.record(conn, "test", at=AT)
        holder = threading.Thread(target=hold_the_lock_a_moment)
        holder.start()
        time.sleep(0.2)  # the other writer has the lock
        released.set()
        with begin() as conn:  # the second of the block waits for it
            audit.record(conn, "test", at=AT)
        holder.join()
    assert _events(engine) == 4
    if sqlite:
        with writing(engine) as conn:  # the lock's wait is back, for every connection
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one() == BUSY_TIMEOUT_MS
    shelf.close()

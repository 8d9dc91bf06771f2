"""Queries that run alongside the reconcile's own, in the same snapshot.

On PostgreSQL a query runs in one server process; the reconcile's big queries (the window's
calls, its transfers, the ledger-wide invariants) do not depend on each other, so each can
run on a connection of its own, in a thread, while the main connection works: the server
runs them in parallel. The helper transactions import the main transaction's snapshot
(``pg_export_snapshot``), so every query still sees the same committed state.

SQLite sorts with several threads already (``PRAGMA threads``) and cannot share a snapshot
between connections: there the work runs on the main connection when its result is asked.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from sqlalchemy import Connection, Engine, text

from mcpbill_cli.ledger.engine import reading

T = TypeVar("T")
SNAPSHOT_ID = re.compile(r"[0-9A-F]+-[0-9A-F]+(-[0-9]+)?")


def alongside(engine: Engine, conn: Connection, work: Callable[[Connection], T],
              prepare: Callable[[Connection], None]) -> Callable[[], T]:
    """Start ``work`` beside ``conn`` (PostgreSQL: on a connection of its own, set up by
    ``prepare``, in ``conn``'s snapshot); call the result to wait for what it returns."""
    if conn.dialect.name != "postgresql":
        return lambda: work(conn)
    snapshot = str(conn.execute(text("SELECT pg_export_snapshot()")).scalar_one())
    if not SNAPSHOT_ID.fullmatch(snapshot):  # it is spliced into SQL below
        raise ValueError(f"unexpected snapshot id {snapshot!r}")
    pool = ThreadPoolExecutor(1)
    future = pool.submit(_in_snapshot, engine, snapshot, work, prepare)
    pool.shutdown(wait=False)
    return future.result


def _in_snapshot(engine: Engine, snapshot: str, work: Callable[[Connection], T],
                 prepare: Callable[[Connection], None]) -> T:
    with reading(engine) as conn:
        conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"))
        conn.execute(text(f"SET TRANSACTION SNAPSHOT '{snapshot}'"))
        prepare(conn)
        return work(conn)

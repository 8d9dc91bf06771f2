"""Queries that run alongside the reconcile's own, in the same snapshot.

The reconcile's big queries (the window's calls, its transfers, the ledger-wide invariants) do
not depend on each other, so each can run on a connection of its own, in a thread, while the
main connection works: the database works them in parallel, every query still seeing the same
committed state.

- **PostgreSQL**: a query runs in one server process. The helper transactions import the main
  transaction's snapshot (``pg_export_snapshot``), whenever they start.
- **SQLite** cannot hand a snapshot from one connection to another: a WAL reader's snapshot is
  the log as its first read finds it. So the helpers and the main connection all make their
  first read while one write transaction (``BEGIN IMMEDIATE``, nothing written) holds every
  writer off: no commit can fall between them. The writers wait for a few milliseconds (their
  busy timeout covers it). This only holds when the main connection has read nothing yet:
  :func:`start_beside` is called first. Its driver runs a query with the GIL released, so the
  helpers' threads work on other cores. A ledger that cannot take the write lock (opened
  read-only), or held in memory (each connection has a database of its own), runs the work on
  the main connection, when its result is asked.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TypeVar

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import OperationalError

from mcpbill_cli.ledger.engine import reading, sqlite_file

T = TypeVar("T")
SNAPSHOT_ID = re.compile(r"[0-9A-F]+-[0-9A-F]+(-[0-9]+)?")
Work = tuple[Callable[[Connection], T], Callable[[Connection], None]]  # work, prepare (PG)


def start_beside(engine: Engine, conn: Connection, works: Sequence[Work[T]]
                 ) -> list[Callable[[], T]]:
    """Start each ``(work, prepare)`` beside ``conn``, on a connection of its own in
    ``conn``'s snapshot (PostgreSQL: set up by ``prepare``); call each result to wait for
    what its work returns. On SQLite, call this before anything reads on ``conn``."""
    if conn.dialect.name == "postgresql":
        return [alongside(engine, conn, work, prepare) for work, prepare in works]
    if sqlite_file(engine.url.render_as_string()) is None:  # in memory: a database per connection
        return [partial(work, conn) for work, _ in works]
    return _together(engine, conn, [work for work, _ in works]) if works else []


def alongside(engine: Engine, conn: Connection, work: Callable[[Connection], T],
              prepare: Callable[[Connection], None]) -> Callable[[], T]:
    """Start ``work`` beside ``conn`` (PostgreSQL: on a connection of its own, set up by
    ``prepare``, in ``conn``'s snapshot; SQLite: on ``conn``, when its result is asked);
    call the result to wait for what it returns."""
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


def _together(engine: Engine, conn: Connection, works: list[Callable[[Connection], T]]
              ) -> list[Callable[[], T]]:
    """SQLite: ``conn`` and one connection per work take their snapshots under one write
    lock; the works go on in threads once it is released."""
    readies = [threading.Event() for _ in works]
    with engine.connect() as lock:
        try:
            transaction = lock.begin()  # BEGIN IMMEDIATE: no writer commits until it ends
            # A read-only connection begins too, holding nothing: a write (of no row) tells.
            lock.exec_driver_sql("UPDATE ledger_snapshots SET at = at WHERE 0")
        except OperationalError:  # no lock to be had: each runs here, at its place
            return [partial(work, conn) for work in works]
        pool = ThreadPoolExecutor(len(works))
        futures = [pool.submit(_in_same_snapshot, engine, work, ready)
                   for work, ready in zip(works, readies, strict=True)]
        pool.shutdown(wait=False)
        try:
            _first_read(conn)
            for ready in readies:
                ready.wait()
        finally:
            transaction.rollback()
    return [future.result for future in futures]


def _in_same_snapshot(engine: Engine, work: Callable[[Connection], T],
                      ready: threading.Event) -> T:
    try:
        with reading(engine) as conn:
            _first_read(conn)
            ready.set()
            return work(conn)
    finally:
        ready.set()  # also when it failed before its first read: the error is its result


def _first_read(conn: Connection) -> None:
    """Start ``conn``'s read transaction: its snapshot is the database as of now."""
    conn.exec_driver_sql("SELECT count(*) FROM sqlite_master").scalar_one()

"""How the reconcile's queries are planned, apart from what they check.

A check says what its queries need (:class:`Planning`); the runner applies it: to a connection
of the check's own (:func:`prepare`), or around the check on the main one (:func:`planned`).
Only PostgreSQL is told anything; SQLite sorts with threads (``PRAGMA threads``), set once.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, text

PG_WORK_MEM = "64MB"  # per hash or sort of the reconcile's queries, on the server
SQLITE_SORT_THREADS = 4


class Planning(enum.Enum):
    """What a check's queries need from PostgreSQL's planner.

    ``STREAMED``: aggregates streamed in full (not planned for their first rows), with room to
    hash their groups in memory. ``HASHED``: also grouped by hashing, never by sorting: the
    planner cannot tell how few groups the window scans make (it guesses one per call) and
    would sort a million rows to group them (a hash that outgrows work_mem spills to disk, so
    memory stays bounded). ``SERIAL``: also in one server process: the ledger-wide invariants'
    parallel workers would ship every call row (receipts and all) to one process to hash-join
    them, no faster at 1M calls (2.4-3.2 s either way) for twice the CPU, which the queries
    beside need.
    """

    STREAMED = "streamed"
    HASHED = "hashed"
    SERIAL = "serial"


def begin(conn: Connection, jobs: int) -> None:
    """The reconcile's read transaction: every query sees the same committed state (SQLite's
    read transaction already does: WAL snapshots). SQLite sorts its GROUP BYs with up to
    ``jobs`` threads (its sorter's memory stays bounded: it spills)."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql(f"PRAGMA threads = {max(1, min(jobs, SQLITE_SORT_THREADS))}")
    if conn.dialect.name == "postgresql":
        conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"))
        streamed(conn)


def streamed(conn: Connection) -> None:
    """PostgreSQL: plan the streamed aggregates for the whole result (not the first rows),
    with room to hash their groups in memory."""
    conn.execute(text("SET LOCAL cursor_tuple_fraction = 1"))
    conn.execute(text(f"SET LOCAL work_mem = '{PG_WORK_MEM}'"))
    conn.execute(text("SET LOCAL jit = off"))  # compiling the scans costs more than it saves


# Beyond STREAMED, which every connection of the reconcile has: (setting, value) pairs.
_EXTRA = {Planning.STREAMED: (), Planning.HASHED: (("enable_sort", "off"),),
          Planning.SERIAL: (("max_parallel_workers_per_gather", "0"),)}


def prepare(planning: Planning) -> Callable[[Connection], None]:
    """Set up a connection of a check's own (PostgreSQL) for ``planning``."""
    def set_up(conn: Connection) -> None:
        streamed(conn)
        for name, value in _EXTRA[planning]:
            conn.execute(text(f"SET LOCAL {name} = {value}"))

    return set_up


@contextmanager
def planned(conn: Connection, planning: Planning) -> Iterator[None]:
    """``planning`` on the main connection for the time of one check, then back."""
    extra = _EXTRA[planning] if conn.dialect.name == "postgresql" else ()
    for name, value in extra:
        conn.execute(text(f"SET LOCAL {name} = {value}"))
    yield
    for name, _ in extra:
        conn.execute(text(f"SET LOCAL {name} TO DEFAULT"))

"""Refusals of input that names no verified token, counted instead of written one by one.

A malformed, forged, expired or misdirected token is anybody's to send, as fast as they like:
writing one audit event for each would let a flood of garbage take the ledger's write capacity
from paid calls. The verifier counts them in memory (:class:`Counter`, per UTC minute, code,
reason and source, with one sample token hash) and its background writer adds them to
``refusal_counts`` every second. Refusals of valid tokens stay events of their own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from mcpbill_cli.ledger.models import refusal_counts

MAX_SOURCE = 100

Key = tuple[datetime, str, str, str]  # minute, code, reason, source


@dataclass
class Tally:
    count: int
    sample: str | None


class Counter:
    """Refusals counted in memory until the next flush; thread-safe."""

    def __init__(self) -> None:
        self._counts: dict[Key, Tally] = {}
        self._oldest: datetime | None = None  # the earliest minute in _counts
        self._lock = threading.Lock()

    def add(self, at: datetime, code: str, reason: str, source: str,
            sample: Callable[[], str | None]) -> bool:
        """Count one refusal; whether counts of a minute before ``at``'s are waiting to be
        written. ``sample`` is called for the first refusal of a key only, the one whose
        sample is kept: the rest of a flood of garbage is not hashed."""
        minute = at.replace(second=0, microsecond=0)
        key = (minute, code, reason, source[:MAX_SOURCE])
        with self._lock:
            tally = self._counts.get(key)
            if tally is not None:
                tally.count += 1
            else:
                self._counts[key] = Tally(1, sample())
                self._oldest = min(minute, self._oldest or minute)
            return self._oldest is not None and self._oldest < minute

    def give_back(self, taken: Mapping[Key, Tally]) -> None:
        """Counts taken but not written (the ledger was down): counted again."""
        with self._lock:
            for key, tally in taken.items():
                mine = self._counts.setdefault(key, Tally(0, tally.sample))
                mine.count += tally.count
                self._oldest = min(key[0], self._oldest or key[0])

    def take(self) -> dict[Key, Tally]:
        """Everything counted so far, and start again from nothing."""
        with self._lock:
            taken, self._counts, self._oldest = self._counts, {}, None
        return taken


def add(conn: Connection, counts: Mapping[Key, Tally]) -> None:
    """Add ``counts`` to the rows of their minute (one upsert per key, in key order, so two
    writers flushing at once take the rows' locks in one order and never deadlock)."""
    insert: Any = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    for (minute, code, reason, source), tally in sorted(counts.items()):
        statement = insert(refusal_counts).values(
            minute=minute, code=code, reason=reason, source=source, count=tally.count,
            sample=tally.sample)
        conn.execute(statement.on_conflict_do_update(
            index_elements=["minute", "code", "reason", "source"],
            set_={"count": refusal_counts.c.count + statement.excluded.count}))


def counted(conn: Connection, start: datetime, end: datetime) -> list[tuple[str, int]]:
    """(code, count) of the refusals counted in minutes from ``start`` to before ``end``."""
    c = refusal_counts.c
    rows = conn.execute(select(c.code, c.count).where(c.minute >= start, c.minute < end))
    return [(code, int(count)) for code, count in rows]

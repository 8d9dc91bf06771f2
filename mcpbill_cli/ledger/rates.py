"""Rate limit counters in the ledger (loop protection, :mod:`mcpbill_cli.ratelimits`).

A call takes its counters (a token's, an agent's; one per window) in one statement, inside
the transaction that holds its money::

    INSERT INTO rate_counters VALUES (...), (...)
    ON CONFLICT (scope, key, window_seconds, window_start) DO UPDATE
       SET calls = calls + 1, spend = spend + excluded.spend
     WHERE calls + 1 <= excluded.call_limit AND spend + excluded.spend <= excluded.spend_limit
    RETURNING scope, key, window_seconds

A row the WHERE refuses is not returned: fewer rows back than counters sent means a limit is
reached, and the caller rolls the whole call back, so a refused call counts nowhere. Replicas
sharing a PostgreSQL ledger count in the same rows, so a limit holds across them. Only tokens
and agents with a rate have rows; :func:`sweep` deletes windows that are over.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import Connection, and_, bindparam, delete, select

from mcpbill_cli.ledger.fastsql import Prepared
from mcpbill_cli.ledger.models import rate_counters
from mcpbill_cli.ratelimits import Counter

r = rate_counters.c
KEEP_SECONDS = 120  # a window that started longer ago than this is over (the longest is 60 s)
_ROW = Prepared(select(r.calls, r.spend).where(
    r.scope == bindparam("b_scope"), r.key == bindparam("b_key"),
    r.window_seconds == bindparam("b_window"), r.window_start == bindparam("b_start")))
_SWEEP = delete(rate_counters).where(r.window_start < bindparam("b_before"))


@dataclass(frozen=True)
class Limited:
    """``counter`` is full: its ``kind`` (calls or spend) limit is reached until its window
    ends, ``retry_after_ms`` from now."""

    counter: Counter
    kind: Literal["calls", "spend"]
    retry_after_ms: int


def window_start(counter: Counter, at: datetime) -> int:
    """The first second (epoch) of the fixed window ``at`` falls in."""
    return int(at.timestamp()) // counter.window * counter.window


def count(conn: Connection, counters: Sequence[Counter], amount: int, at: datetime
          ) -> Limited | None:
    """Count one call of ``amount`` micro-USDC in every counter, or none of them and say which
    is full (the caller rolls back what the statement did count)."""
    params: dict[str, Any] = {}
    for i, counter in enumerate(counters):
        params.update({f"b_scope{i}": counter.scope, f"b_key{i}": counter.key,
                       f"b_window{i}": counter.window,
                       f"b_start{i}": window_start(counter, at), f"b_calls{i}": 1,
                       f"b_spend{i}": amount, f"b_call_limit{i}": counter.calls,
                       f"b_spend_limit{i}": counter.spend})
    counted = _upsert(conn.dialect.name, len(counters)).all(conn, params)
    if len(counted) == len(counters):
        return None
    done = {(row.scope, row.key, row.window_seconds) for row in counted}
    full = next(c for c in counters if (c.scope, c.key, c.window) not in done)
    return _limited(full, _row(conn, full, at), at)


def full(conn: Connection, counters: Sequence[Counter], amount: int, at: datetime
         ) -> Limited | None:
    """The first of ``counters`` that a call of ``amount`` would not fit in now, read and
    counted nowhere (a preflight). As :func:`count` decides: a window's first call always
    fits."""
    for counter in counters:
        row = _row(conn, counter, at)
        if row is not None and (row.calls + 1 > counter.calls
                                or row.spend + amount > counter.spend):
            return _limited(counter, row, at)
    return None


def _limited(counter: Counter, row: Any, at: datetime) -> Limited:
    """Why ``counter``, whose window's ``row`` it is (None: no row), refused a call."""
    over_calls = row is None or row.calls + 1 > counter.calls
    wait = (window_start(counter, at) + counter.window - at.timestamp()) * 1000
    return Limited(counter, "calls" if over_calls else "spend", max(math.ceil(wait), 1))


def used(conn: Connection, counter: Counter, at: datetime) -> tuple[int, int]:
    """The calls and spend ``counter`` has counted in the window of ``at``."""
    row = _row(conn, counter, at)
    return (0, 0) if row is None else (row.calls, row.spend)


def _row(conn: Connection, counter: Counter, at: datetime) -> Any:
    """The counter's row for the window of ``at`` (calls, spend), or None."""
    return _ROW.first(conn, {"b_scope": counter.scope, "b_key": counter.key,
                             "b_window": counter.window, "b_start": window_start(counter, at)})


def sweep(conn: Connection, *, now: datetime) -> int:
    """Delete the counters of windows that are over; returns how many."""
    before = int(now.timestamp()) - KEEP_SECONDS
    return int(conn.execute(_SWEEP, {"b_before": before}).rowcount)


@functools.cache
def _upsert(dialect_name: str, rows: int) -> Prepared:
    """The counting statement for ``rows`` counters, built and compiled once per dialect."""
    dialect_insert: Any
    if dialect_name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    names = ("scope", "key", "window", "start", "calls", "spend", "call_limit", "spend_limit")
    columns = ("scope", "key", "window_seconds", "window_start", "calls", "spend",
               "call_limit", "spend_limit")
    pairs = list(zip(names, columns, strict=True))
    values: list[dict[str, Any]] = [
        {column: bindparam(f"b_{name}{i}") for name, column in pairs} for i in range(rows)]
    insert = dialect_insert(rate_counters).values(values)
    new = insert.excluded
    statement = insert.on_conflict_do_update(
        index_elements=[r.scope, r.key, r.window_seconds, r.window_start],
        set_={"calls": r.calls + new.calls, "spend": r.spend + new.spend,
              "call_limit": new.call_limit, "spend_limit": new.spend_limit},
        where=and_(r.calls + new.calls <= new.call_limit,
                   r.spend + new.spend <= new.spend_limit),
    ).returning(r.scope, r.key, r.window_seconds)
    return Prepared(statement)

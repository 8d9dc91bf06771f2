"""Core statements compiled once per dialect and run on the DBAPI connection.

The verifier's hot path runs a dozen small statements per call. Through ``Connection.execute``
each pays SQLAlchemy's per-execution machinery (execution context, events, result wrapping),
about ten times what the driver itself takes. A :class:`Prepared` statement keeps the SQL in
SQLAlchemy Core (one definition, both dialects, the same bind and result processing) but runs
it on the driver connection under the caller's transaction. Driver errors come out as the same
``sqlalchemy.exc`` types ``Connection.execute`` raises, so callers cannot tell the difference.
"""

from __future__ import annotations

import weakref
from collections import namedtuple
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from sqlalchemy import Boolean, Connection, DateTime
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import ClauseElement

Processor = Callable[[Any], Any]
# Column types whose values are immutable and whose processors every statement of a dialect
# shares (see _bind_processor): the types themselves, not subclasses that may process otherwise.
_SHARED_TYPES = (DateTime, Boolean)
_SHARED: weakref.WeakKeyDictionary[Dialect, dict[tuple[type, Any], Processor]] = (
    weakref.WeakKeyDictionary())
_CURSOR = "mcpbill_cursor"  # the key of the kept cursor in a pooled connection's info


@dataclass(frozen=True)
class _Plan:
    sql: str
    arguments: Callable[[Mapping[str, Any]], Any] | None  # positional paramstyles: in order
    constants: dict[str, Any]  # the statement's own literals (``kind = 'pending'``)
    binds: dict[str, Processor]  # bind processors, by parameter name
    row: Callable[..., Any] | None  # the row type of a statement that returns rows
    results: tuple[tuple[int, Processor], ...]  # result processors, by column position
    converts: bool  # whether parameters need constants added or values converted


class Prepared:
    """One Core statement, run with :meth:`first`, :meth:`all` or :meth:`rowcount`.

    ``columns`` names the columns an INSERT writes (every one must be passed on each run:
    Python-side column defaults are not applied here).
    """

    __slots__ = ("_columns", "_last", "_plans", "statement")

    def __init__(self, statement: ClauseElement, *, columns: Sequence[str] | None = None
                 ) -> None:
        self.statement = statement
        self._columns = list(columns) if columns is not None else None
        # By engine dialect: a test run or a long-lived process may make many engines.
        self._plans: weakref.WeakKeyDictionary[Dialect, _Plan] = weakref.WeakKeyDictionary()
        # The last dialect's plan, looked up by identity: a process runs one engine (a few
        # microseconds per statement, on a dozen statements per paid call).
        self._last: tuple[Dialect, _Plan] | None = None

    def first(self, conn: Connection, params: Mapping[str, Any]) -> Any:
        """The first row (a named tuple), or None."""
        plan, cursor = self._run(conn, params)
        row = cursor.fetchone()
        if row is None or plan.row is None:
            return row
        return _converted(plan, row) if plan.results else plan.row(*row)

    def all(self, conn: Connection, params: Mapping[str, Any]) -> list[Any]:
        plan, cursor = self._run(conn, params)
        rows: list[Any] = cursor.fetchall()
        if plan.row is None:
            return rows
        return [_converted(plan, row) for row in rows]

    def rowcount(self, conn: Connection, params: Mapping[str, Any]) -> int:
        """How many rows an UPDATE or DELETE changed."""
        return int(self._run(conn, params)[1].rowcount)

    def _run(self, conn: Connection, params: Mapping[str, Any]) -> tuple[_Plan, Any]:
        """Run the statement on ``conn``'s driver connection; its plan and the cursor.

        Written out in one function: a paid call runs a dozen statements, and each helper
        called per statement costs about a microsecond of it."""
        dialect = conn.dialect
        last = self._last
        if last is not None and last[0] is dialect:
            plan = last[1]
        else:
            plan = self._plans.get(dialect) or self._plan(dialect)
            self._last = (dialect, plan)
        if not conn.in_transaction():
            conn.begin()  # as Connection.execute would (autobegin)
        values = _values(plan, params) if plan.converts else params
        arguments = values if plan.arguments is None else plan.arguments(values)
        # The cursor kept with the pooled DBAPI connection (see _cursor).
        pooled = conn.connection
        cursor = pooled.info.get(_CURSOR)
        if cursor is None:
            cursor = _cursor(pooled)
        try:
            cursor.execute(plan.sql, arguments)
        except dialect.loaded_dbapi.Error as exc:
            raise DBAPIError.instance(plan.sql, arguments, exc, dialect.loaded_dbapi.Error,
                                      dialect=dialect) from exc
        return plan, cursor

    def _plan(self, dialect: Dialect) -> _Plan:
        compiled: Any = self.statement.compile(dialect=dialect, column_keys=self._columns)
        used = set(compiled.bind_names.values())
        constants, binds = {}, {}
        for name, bind in compiled.binds.items():
            if name not in used:
                continue
            if not bind.required:
                constants[name] = bind.effective_value
            process = _bind_processor(bind.type, dialect)
            if process is not None:
                binds[name] = process
        for column in [*compiled.insert_prefetch, *compiled.update_prefetch]:
            if column.default is None or not column.default.is_scalar:
                raise NotImplementedError(f"{column} has a default Prepared cannot apply")
            constants[column.key] = column.default.arg  # a column the caller may leave out
        arguments = _positional(compiled.positiontup) if compiled.positional else None
        row_type: Callable[..., Any] | None = None
        results: tuple[tuple[int, Processor], ...] = ()
        if compiled.returning or getattr(self.statement, "is_select", False):
            columns = list(self.statement.exported_columns)  # type: ignore[attr-defined]
            keys = [c.key or f"c{i}" for i, c in enumerate(columns)]
            row_type = _row_type(keys)
            results = tuple(
                (i, process) for i, c in enumerate(columns)
                if (process := c.type.dialect_impl(dialect).result_processor(dialect, None))
                is not None)
        plan = _Plan(compiled.string, arguments, constants, binds, row_type, results,
                     bool(constants or binds))
        self._plans[dialect] = plan
        return plan


def _values(plan: _Plan, params: Mapping[str, Any]) -> Mapping[str, Any]:
    """``params`` with the statement's own literals and each value as the driver takes it.
    Only called for a plan that ``converts``: most of a paid call's statements bind only ids
    and amounts, and their parameters go to the driver as the caller passed them."""
    values = {**plan.constants, **params}
    for name, process in plan.binds.items():
        values[name] = process(values[name])
    return values


def _cursor(pooled: Any) -> Any:
    """A new cursor kept with the pooled DBAPI connection ``pooled``, for its statements to come.

    Every statement here fetches its rows before the next one runs, so one cursor serves them
    all; a new psycopg cursor per statement (its adapters map copied each time) was about
    12 us of a paid call's five statements each, measured. SQLAlchemy clears the
    connection's ``info`` when it replaces an invalidated connection, and the cursor with it.
    """
    # The DBAPI connection is the driver's own for the sync drivers a ledger runs on
    # (sqlite3, psycopg): a plain attribute, where driver_connection is two properties.
    cursor = pooled.info[_CURSOR] = pooled.dbapi_connection.cursor()
    return cursor


def _bind_processor(type_: Any, dialect: Dialect) -> Processor | None:
    """How ``dialect`` binds a value of ``type_``; for timestamps and booleans, one processor
    shared by every statement, that remembers its last two answers (:func:`_remembering`).

    A paid call binds its ``now`` and its ``demo`` flag to a dozen parameters of its
    statements; SQLite's timestamp processor formats a datetime field by field each time, and
    the boolean one checks and coerces: 17 processor calls per paid call, 13 of them on an
    object the shared processor has just seen.
    """
    process: Processor | None = type_.dialect_impl(dialect).bind_processor(dialect)
    if process is None or type(type_) not in _SHARED_TYPES:
        return process
    shared = _SHARED.setdefault(dialect, {})
    return shared.setdefault((type(type_), getattr(type_, "timezone", None)),
                             _remembering(process))


def _remembering(process: Processor) -> Processor:
    """``process`` that answers either of the last two objects it was given (``is``: only for
    immutable values) as it did then. Each pair is one tuple, so a thread always reads a value
    with its own answer."""
    never = (object(), None)
    last: tuple[tuple[Any, Any], tuple[Any, Any]] = (never, never)

    def remembered(value: Any) -> Any:
        nonlocal last
        newer, older = last
        if value is newer[0]:
            return newer[1]
        if value is older[0]:
            return older[1]
        answer = process(value)
        last = ((value, answer), newer)
        return answer

    return remembered


def _positional(names: list[str]) -> Callable[[Mapping[str, Any]], tuple[Any, ...]]:
    if len(names) > 1:
        return itemgetter(*names)
    return lambda values: tuple(values[name] for name in names)


def _row_type(keys: list[str]) -> Callable[..., Any]:
    return namedtuple("Row", keys, rename=True)  # type: ignore[misc]  # noqa: PYI024


def _converted(plan: _Plan, row: Any) -> Any:
    """``row`` as ``plan``'s row type, each column through its result processor."""
    values = list(row)
    for i, process in plan.results:
        values[i] = process(values[i])
    assert plan.row is not None  # noqa: S101 - only statements that return rows get here
    return plan.row(*values)

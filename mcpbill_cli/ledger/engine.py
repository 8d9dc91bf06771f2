"""Engines for the ledger: SQLite (WAL, ``BEGIN IMMEDIATE`` for writes) or PostgreSQL (psycopg 3).

Every write transaction on SQLite takes the write lock up front, so a conditional UPDATE never
meets "database is locked" half way through. Read-only work uses :func:`reading`.

Durable before receipted: an engine is durable unless asked otherwise, so a commit is on disk
when it returns and a receipt signed inside it cannot outlive a power loss. Only a demo-mode
verifier trades that for speed.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, select, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, NoSuchModuleError, OperationalError, ProgrammingError
from sqlalchemy.pool import PoolProxiedConnection, QueuePool

from mcpbill_cli.config import redact_url
from mcpbill_cli.errors import (
    InvalidInput,
    LedgerFull,
    LedgerUnavailable,
    NotInitialized,
    SchemaOutdated,
)
from mcpbill_cli.ledger.models import SCHEMA_REVISION

_READONLY = "mcpbill_readonly"
BUSY_TIMEOUT_MS = 30_000  # how long a SQLite write transaction waits for the write lock
# Set by at_once(): the next write transaction begun in this context does not wait for the lock.
_AT_ONCE: ContextVar[bool] = ContextVar("mcpbill_ledger_at_once", default=False)
# Less room than this left beside a SQLite file, and its "disk I/O error" is a full disk.
_NO_ROOM = 1 << 20


def make_engine(url: str, *, pool_size: int = 10, wal_autocheckpoint: int | None = None,
                durable: bool = True, pre_ping: bool = True) -> Engine:
    """An engine for ``url``; SQLite files get WAL, a busy timeout and immediate write locks.

    ``durable`` (the default) syncs every commit to disk before it returns: SQLite runs
    ``synchronous=FULL``, PostgreSQL ``synchronous_commit=on`` whatever the server or role
    default. ``durable=False`` (a demo verifier) runs ``NORMAL`` and ``off``: a power loss may
    take back the last commits. ``wal_autocheckpoint`` sets how many pages of log SQLite lets
    grow before a commit checkpoints it itself (SQLite's default: 1000); see
    :mod:`mcpbill_cli.ledger.checkpoint`. ``pre_ping`` (PostgreSQL) tests a pooled connection
    before each use: a round trip per transaction, which a verifier saves (a connection the
    server dropped fails that one call with LEDGER_UNAVAILABLE, and the pool starts afresh).
    """
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - SQLAlchemy raises several types for a bad URL
        # Its message may quote a piece of the password, so it is not passed on.
        raise InvalidInput(
            f"not a database URL: {redact_url(url)}; expected dialect+driver://user:password@host"
            "/database, with @ : / in a password written %40 %3A %2F") from None
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url, parsed.database, wal_autocheckpoint, durable)
    if parsed.drivername == "postgresql":  # a bare postgresql:// means psycopg 3 here
        parsed = parsed.set(drivername="postgresql+psycopg")
    try:
        return create_engine(parsed, pool_size=pool_size, max_overflow=pool_size,
                             pool_pre_ping=pre_ping,
                             connect_args=_pg_connect_args(parsed, durable))
    except (NoSuchModuleError, ModuleNotFoundError) as exc:
        raise LedgerUnavailable(
            f"no driver for {redact_url(url)}: {exc}; install mcpbill[postgres] for PostgreSQL",
            url=redact_url(url),
        ) from None


def sqlite_file(url: str) -> Path | None:
    """The file a SQLite URL names; ``None`` for other databases and in-memory SQLite."""
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - make_engine reports a bad URL with its reason
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database).expanduser()


def start_sqlite_file(url: str) -> None:
    """Make the file of a SQLite ``url`` that does not exist yet, empty and mode 0600, before
    SQLite opens it: SQLite gives its -wal and -shm files the database's mode, and the ledger
    holds every tenant's money and may hold webhook secrets (else it would be 0644, by the
    umask). Nothing for other databases or a file that exists; a directory that does not
    exist is left to SQLite to report, as before."""
    path = sqlite_file(url)
    if path is None:
        return
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except (FileExistsError, FileNotFoundError, NotADirectoryError):
        pass


def _pg_connect_args(parsed: URL, durable: bool) -> dict[str, str]:
    """Startup ``options`` that set ``synchronous_commit``, after any the URL carries.

    Set when the connection opens, it costs no round trip; a later ``-c`` wins over an earlier
    one, so the URL's own ``synchronous_commit`` (or the role's, or the server's) gives way.
    """
    if parsed.get_backend_name() != "postgresql":
        return {}
    given = parsed.query.get("options", ())
    options = [given] if isinstance(given, str) else list(given)
    options.append(f"-csynchronous_commit={'on' if durable else 'off'}")
    return {"options": " ".join(options)}


def _sqlite_engine(url: str, database: str | None, wal_autocheckpoint: int | None,
                   durable: bool) -> Engine:
    if database and database != ":memory:":
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        # in WAL mode FULL syncs the log at every commit; NORMAL only at checkpoints
        cursor.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        if wal_autocheckpoint is not None:
            cursor.execute(f"PRAGMA wal_autocheckpoint={int(wal_autocheckpoint)}")
        cursor.close()

    engine.dialect.do_begin = _begin_sqlite  # type: ignore[method-assign,assignment]
    sqlite3.register_adapter(type(None), _null)
    return engine


def _null(value: None) -> None:
    """sqlite3's adapter for ``None``: NULL, as without one, found at once.

    Without an adapter, sqlite3 binds a ``None`` only after looking for ``__adapt__`` on its
    protocol and ``__conform__`` on ``None``, two failed lookups that each build an
    AttributeError: about 1,800 instructions per NULL parameter (callgrind), and a paid call
    binds 17 of them (a hold's and a capture's rows and events), about 30k of its 2.3M.
    Registered process-wide (sqlite3 keeps adapters per type, not per connection); it
    changes nothing but the lookup for any other sqlite3 user in the process.
    """
    return value


def _begin_sqlite(connection: PoolProxiedConnection) -> None:
    """This engine's dialect's ``do_begin``: ``BEGIN IMMEDIATE``, or a deferred ``BEGIN`` for
    :func:`reading` (it marks the pooled ``connection``'s ``info``).

    The dialect's own hook rather than a ``begin`` event listener: with any connection event
    on the engine, every ``Connection`` joins the engine's event dispatch, about 55 of the 140
    Python calls of a write transaction (cProfile), two transactions per paid call. An error
    here is the driver's; SQLAlchemy wraps it as it wraps any error of ``do_begin``.
    """
    # The driver's own connection (sqlite3's), a plain attribute: driver_connection is a chain
    # of three properties, and two transactions per paid call begin here.
    driver: Any = connection.dbapi_connection
    if connection.info.get(_READONLY):
        driver.execute("BEGIN")
    elif _AT_ONCE.get():
        _begin_at_once(driver)
    else:
        driver.execute("BEGIN IMMEDIATE")


class LedgerBusy(Exception):  # noqa: N818 - a state, not a failure: the work runs elsewhere
    """A write transaction begun under :func:`at_once` found another writer holding the
    SQLite ledger's lock. Nothing was written by the work it ran in: run that work again where
    it may wait for the lock."""


def _begin_at_once(driver: sqlite3.Connection) -> None:
    """``BEGIN IMMEDIATE`` with no wait: LedgerBusy if the lock is taken. Once it is had, the
    rest of the work waits as usual, so LedgerBusy only ever comes before its first write."""
    driver.execute("PRAGMA busy_timeout=0")
    try:
        driver.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY:
            raise
        raise LedgerBusy("another writer holds the ledger's write lock") from None
    finally:
        driver.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    _AT_ONCE.set(False)


@contextmanager
def at_once() -> Iterator[None]:
    """Within this block, the first write transaction on a SQLite ledger does not wait for the
    write lock: it raises :class:`LedgerBusy` instead, before anything is written. Work run on
    an event loop's own thread uses it to hand itself to a worker thread rather than stall the
    loop behind another writer (see ``Verifier._step`` in :mod:`mcpbill_cli.verifier`).
    PostgreSQL ledgers are not affected."""
    token = _AT_ONCE.set(True)
    try:
        yield
    finally:
        _AT_ONCE.reset(token)


@contextmanager
def reading(engine: Engine) -> Iterator[Connection]:
    """A read-only transaction: on SQLite a deferred BEGIN, so readers never wait for the lock."""
    with _unavailable_as_error(engine), engine.connect() as conn:
        info = conn.connection.info  # the pooled connection's: what _begin_sqlite reads
        info[_READONLY] = True
        try:
            with conn.begin():
                yield conn
        finally:
            info.pop(_READONLY, None)


@contextmanager
def writing(engine: Engine) -> Iterator[Connection]:
    """A write transaction: committed on success, rolled back on any exception.

    ``engine.begin()`` written out, in one generator: every paid call runs two of these, and
    each nested context manager layer costs a few microseconds of the call."""
    try:
        with engine.connect() as conn, conn.begin():
            yield conn
    except OperationalError as exc:
        raise unavailable(engine, exc) from None


class Shelf:
    """Open connections kept between the write transactions of one engine: at most ``keep``.

    A paid call's transaction through :func:`writing` checks a connection out of SQLAlchemy's
    pool and back in: a ``Connection`` made, the pool's queue both ways, its rollback on
    return. That was about 50 us of CPU of a demo-mode charge on SQLite (10%, measured against
    the same charges on one connection held throughout). A shelved connection skips all of it:
    it stays checked out while idle and runs the next transaction as it is.

    Only for a pool that hands out a connection to one holder at a time (``QueuePool``: every
    file or server ledger :func:`make_engine` opens). A transaction that fails closes its
    connection rather than shelving it, and a lost connection (``OperationalError``) closes
    every shelved one too, so the pool replaces them as it would have without the shelf.
    """

    def __init__(self, engine: Engine, *, keep: int = 4) -> None:
        self.engine = engine
        self.keep = keep if isinstance(engine.pool, QueuePool) else 0
        self._idle: list[Connection] = []  # list.append and .pop are atomic

    def writing(self) -> _Shelved:
        """:func:`writing` on a shelved connection (or a new one, shelved after)."""
        return _Shelved(self)

    def _shelve(self, conn: Connection) -> None:
        if len(self._idle) < self.keep and not conn.invalidated:
            self._idle.append(conn)
        else:
            conn.close()

    def _take(self) -> Connection:
        try:
            return self._idle.pop()
        except IndexError:
            pass
        try:
            return self.engine.connect()
        except OperationalError as exc:
            raise unavailable(self.engine, exc) from None

    def close(self) -> None:
        """Give every shelved connection back to the pool."""
        while True:
            try:
                conn = self._idle.pop()
            except IndexError:
                return
            conn.close()


class _Shelved:
    """One write transaction of :meth:`Shelf.writing`: committed on success, rolled back on
    any exception; the connection is shelved after a commit and closed after a failure (with
    every shelved one when the server is lost: ``OperationalError``, LEDGER_UNAVAILABLE).

    A context manager of its own rather than a ``@contextmanager`` generator: every paid call
    runs two of these, and the generator's machinery (its object, ``next``, the helper) was
    about a quarter of what SQLAlchemy adds to a transaction on SQLite. An empty transaction
    took 11.3 us of CPU (median of 10 rounds; 10.3-13.0) through the generator, 10.1 us
    (9.3-12.4) through this, against 5.7 us for ``BEGIN IMMEDIATE``/``COMMIT`` on the driver."""

    __slots__ = ("_conn", "_shelf", "_transaction")

    def __init__(self, shelf: Shelf) -> None:
        self._shelf = shelf

    def __enter__(self) -> Connection:
        conn = self._conn = self._shelf._take()
        try:
            self._transaction = conn.begin().__enter__()
        except BaseException as exc:
            self._drop(exc)
            raise
        return conn

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: Any) -> None:
        try:
            self._transaction.__exit__(kind, error, trace)  # commit, or roll back
        except BaseException as exc:
            self._drop(exc)
            raise
        if error is not None:
            self._drop(error)  # and ``error`` goes on, unless the server is lost
            return
        self._shelf._shelve(self._conn)

    def _drop(self, error: BaseException) -> None:
        """Close the connection of a failed transaction; LEDGER_UNAVAILABLE for a lost server."""
        self._conn.close()
        if isinstance(error, OperationalError):
            self._shelf.close()
            raise unavailable(self._shelf.engine, error) from None


@contextmanager
def _unavailable_as_error(engine: Engine) -> Iterator[None]:
    try:
        yield
    except OperationalError as exc:
        raise unavailable(engine, exc) from None


def unavailable(engine: Engine, exc: DBAPIError) -> LedgerUnavailable:
    url = redact_url(engine.url.render_as_string(hide_password=False))
    reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
    if _disk_full(exc.orig, engine.url.database):
        return LedgerFull(
            f"the ledger at {url} is full ({reason}): nothing of this transaction was "
            "written; free disk space (or raise the database's size limit) and retry",
            url=url)
    failure = LedgerUnavailable(
        f"cannot reach the ledger at {url}: {reason}; check MCPBILL_DB_URL or --db-url",
        url=url,
    )
    # The server closed this connection (a restart, an idle timeout) and the pool has let
    # go of its others: the same transaction on a new connection may well go through.
    failure.dropped = bool(getattr(exc, "connection_invalidated", False))
    return failure


def _disk_full(error: BaseException | None, database: str | None) -> bool:
    """SQLite's SQLITE_FULL (a full disk, or ``max_page_count`` reached), PostgreSQL's
    ``disk_full`` (SQLSTATE 53100), or SQLite's disk I/O error on a filesystem with no room.

    On a full filesystem SQLite often fails first at growing its shared-memory (``-shm``)
    file, and reports only SQLITE_IOERR: the ENOSPC under it is not passed on by the
    driver, so the room left beside the ``database`` file decides.
    """
    if isinstance(error, sqlite3.Error):
        code = getattr(error, "sqlite_errorcode", 0)
        if code == sqlite3.SQLITE_FULL:
            return True
        return code & 0xFF == sqlite3.SQLITE_IOERR and _no_room_beside(database)
    return getattr(error, "sqlstate", None) == "53100"


def _no_room_beside(database: str | None) -> bool:
    """Whether the filesystem holding the SQLite file ``database`` is (all but) full."""
    if not database or database == ":memory:":
        return False
    try:
        disk = os.statvfs(Path(database).expanduser().parent)
    except OSError:
        return False
    return disk.f_bavail * disk.f_frsize < _NO_ROOM


def current_revision(engine: Engine) -> str | None:
    """The ledger's Alembic revision, or ``None`` for an empty database. Never migrates."""
    from sqlalchemy import Column, MetaData, String, Table

    version = Table("alembic_version", MetaData(), Column("version_num", String(32)))
    try:
        with engine.connect() as conn:
            return conn.execute(select(version.c.version_num)).scalar_one_or_none()
    except (OperationalError, ProgrammingError) as exc:
        if _is_missing_table(exc):
            return None
        raise unavailable(engine, exc) from None


def _is_missing_table(exc: DBAPIError) -> bool:
    """A table not there (an empty ledger), never a database not there (PostgreSQL says
    "does not exist" of both; its SQLSTATE tells them apart)."""
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if sqlstate is not None:
        return bool(sqlstate == UNDEFINED_TABLE)
    return "no such table" in str(exc.orig).lower()


UNDEFINED_TABLE = "42P01"  # PostgreSQL's SQLSTATE for a relation that does not exist


def check_schema(engine: Engine) -> None:
    """Refuse a ledger that is empty or at another schema; name the command that fixes it."""
    revision = current_revision(engine)
    if revision is None:
        raise NotInitialized(
            "the ledger has no tables yet: run `mcpbill init` (or `mcpbill db upgrade`)"
        )
    if revision != SCHEMA_REVISION:
        raise SchemaOutdated(
            f"the ledger is at schema {revision} but this mcpbill needs {SCHEMA_REVISION}: "
            "run `mcpbill db upgrade`",
            current=revision,
            required=SCHEMA_REVISION,
        )


def ping(engine: Engine) -> None:
    with reading(engine) as conn:
        conn.execute(text("SELECT 1"))

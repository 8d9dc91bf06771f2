"""Durable before receipted: a live-mode verifier's commits are on disk before it hands out a
receipt, whatever the database's own default; a demo verifier may skip the sync.

The settings are read back from the connections the calls used (SQLite ``PRAGMA synchronous``:
2 = FULL, 1 = NORMAL; PostgreSQL ``synchronous_commit``). Where ``strace`` can watch the thread
or backend that commits, the syncs themselves are counted.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.pool import QueuePool

from mcpbill_cli.keys import KeyRing, KeySource
from mcpbill_cli.ledger.credit import IssuedToken
from mcpbill_cli.ledger.engine import make_engine
from mcpbill_cli.ledger.schema import upgrade
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.verifier import Verifier

from .billing_support import PRICING_DOC, USDC, FakeClock, fund, mint

SYNCED = {"sqlite": "2", "postgresql": "on"}  # FULL: the log is synced at every commit
LAZY = {"sqlite": "1", "postgresql": "off"}  # NORMAL: synced at checkpoints only
SETTING = {"sqlite": "PRAGMA synchronous", "postgresql": "SHOW synchronous_commit"}


@pytest.fixture
def token(engine: Engine, keys_dir: Path, clock: FakeClock) -> IssuedToken:
    fund(engine, "acme", 100 * USDC, now=clock())
    return mint(engine, KeyRing.load(keys_dir), now=clock(), limit=10 * USDC)


@pytest.fixture
def lazy_url(engine: Engine) -> str:
    """The test's ledger, on a URL whose connections commit lazily unless told otherwise.

    SQLite has no such URL option; on PostgreSQL ``-csynchronous_commit=off`` joins the
    ``options`` the URL already carries, as a role or server default of ``off`` would.
    """
    url = make_url(engine.url.render_as_string(hide_password=False))
    if url.get_backend_name() != "postgresql":
        return url.render_as_string(hide_password=False)
    options = f"{url.query.get('options', '')} -csynchronous_commit=off".strip()
    return url.update_query_dict({"options": options}).render_as_string(hide_password=False)


@pytest.fixture
def build(keys_dir: Path, clock: FakeClock) -> Iterator[Callable[..., Verifier]]:
    """``build(url, demo=...)``: a verifier built from a database URL, as a server builds one."""
    built: list[Verifier] = []

    def make(url: str, *, demo: bool) -> Verifier:
        verifier = Verifier(db_url=url, demo=demo, keys=KeySource(directory=keys_dir),
                            pricing=PricingTable.from_document(PRICING_DOC), clock=clock)
        built.append(verifier)
        return verifier

    yield make
    for verifier in built:
        verifier.close()


def _unshelve(verifier: Verifier) -> None:
    """Give the connections the verifier keeps open between paid calls back to its pool, so
    that every connection it charged through is idle there."""
    assert verifier._shelf is not None
    verifier._shelf.close()


def _pooled_settings(engine: Engine) -> list[str]:
    """The commit setting of every connection now idle in ``engine``'s pool, all held at once
    so that none is counted twice and none is opened for the occasion."""
    pool = engine.pool
    assert isinstance(pool, QueuePool)
    held = [engine.raw_connection() for _ in range(pool.checkedin())]
    try:
        return [_setting(connection, engine.dialect.name) for connection in held]
    finally:
        for connection in held:
            connection.close()


def _setting(connection: object, dialect: str) -> str:
    return _query(connection, SETTING[dialect])


def _query(connection: object, sql: str) -> str:
    """One value, through the driver (an SQLAlchemy transaction on SQLite takes the write lock)."""
    cursor = connection.cursor()  # type: ignore[attr-defined]
    cursor.execute(sql)
    value = str(cursor.fetchone()[0])
    cursor.close()
    return value


def _charge(verifier: Verifier, token: IssuedToken) -> str:
    """A new charge, under a key of its own (a repeat would replay, writing nothing)."""
    return verifier.charge(token.token, "search", idempotency_key=uuid.uuid4().hex).receipt_id


def _charge_from_threads(verifier: Verifier, token: IssuedToken) -> None:
    """Charges from four threads at once, until the pool holds several connections."""
    assert verifier.engine is not None
    pool = verifier.engine.pool
    assert isinstance(pool, QueuePool)
    for _ in range(10):  # the bound only stops a machine that never runs two threads at once
        start = threading.Barrier(4)

        def worker(_: int, start: threading.Barrier = start) -> list[str]:
            start.wait()
            return [_charge(verifier, token) for _ in range(10)]

        with ThreadPoolExecutor(4) as threads:
            receipts = {receipt for batch in threads.map(worker, range(4)) for receipt in batch}
        assert len(receipts) == 40
        _unshelve(verifier)
        if pool.checkedin() > 1:
            return


def test_a_live_verifier_syncs_on_every_connection_it_charges_through(
        lazy_url: str, build: Callable[..., Verifier], token: IssuedToken) -> None:
    verifier = build(lazy_url, demo=False)
    assert verifier.engine is not None
    _charge_from_threads(verifier, token)

    settings = _pooled_settings(verifier.engine)
    assert len(settings) > 1, settings
    assert settings == [SYNCED[verifier.engine.dialect.name]] * len(settings)


def test_a_demo_verifier_trades_the_sync_for_speed(
        engine: Engine, build: Callable[..., Verifier], token: IssuedToken) -> None:
    verifier = build(engine.url.render_as_string(hide_password=False), demo=True)
    assert verifier.engine is not None
    _charge_from_threads(verifier, token)

    settings = _pooled_settings(verifier.engine)
    assert len(settings) > 1, settings
    assert settings == [LAZY[verifier.engine.dialect.name]] * len(settings)


def test_cli_engines_are_durable_whatever_the_url_defaults_to(lazy_url: str) -> None:
    dialect = make_url(lazy_url).get_backend_name()
    if dialect == "postgresql":  # the URL alone does turn the sync off
        bare = create_engine(lazy_url.replace("postgresql://", "postgresql+psycopg://", 1))
        assert _first_connection_setting(bare) == LAZY[dialect]
    assert _first_connection_setting(make_engine(lazy_url)) == SYNCED[dialect]


def _first_connection_setting(engine: Engine) -> str:
    connection = engine.raw_connection()
    try:
        return _setting(connection, engine.dialect.name)
    finally:
        connection.close()
        engine.dispose()


# --- the syncs themselves, counted with strace -------------------------------------------------


def test_on_sqlite_a_live_charge_syncs_the_log_before_it_returns_and_a_demo_one_does_not(
        tmp_path: Path, keys_dir: Path, build: Callable[..., Verifier], clock: FakeClock) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    cli = make_engine(url)
    upgrade(cli)
    fund(cli, "acme", 100 * USDC, now=clock())
    token = mint(cli, KeyRing.load(keys_dir), now=clock(), limit=10 * USDC)
    cli.dispose()
    caller = [threading.get_native_id()]  # the checkpoint thread's syncs are not the call's
    live, demo = build(url, demo=False), build(url, demo=True)
    for verifier in (live, demo):
        # in either mode, the first commit after a full checkpoint restarts the log and syncs
        # its new header: with the thread stopped, only the warm-up charge restarts it
        assert verifier._checkpointer is not None
        verifier._checkpointer.close()

    assert _syncs_while_charging(live, token, tmp_path, lambda _: caller), \
        "the charge returned before any sync of the log"
    assert _syncs_while_charging(demo, token, tmp_path, lambda _: caller) == []


def test_on_postgresql_a_live_charge_waits_for_the_wal_flush_and_a_demo_one_does_not(
        tmp_path: Path, pg_engine: Engine, keys_dir: Path, build: Callable[..., Verifier],
        clock: FakeClock) -> None:
    fund(pg_engine, "acme", 100 * USDC, now=clock())
    token = mint(pg_engine, KeyRing.load(keys_dir), now=clock(), limit=10 * USDC)
    url = pg_engine.url.render_as_string(hide_password=False)

    # Ten charges: another session's flush may cover one commit, not all ten. A backend that
    # has to write out full WAL buffers syncs the segment it finishes and the one it creates,
    # in either mode: rare, and a few syncs, not one per commit.
    live = _syncs_while_charging(build(url, demo=False), token, tmp_path, _backends, charges=10)
    demo = _syncs_while_charging(build(url, demo=True), token, tmp_path, _backends, charges=10)
    assert live, "no backend flushed the WAL during ten live charges"
    assert len(demo) <= 3, demo


def _syncs_while_charging(verifier: Verifier, token: IssuedToken, tmp_path: Path,
                          watched: Callable[[Engine], list[int]], charges: int = 1) -> list[str]:
    """The syncs the ``watched`` threads or processes make during ``charges`` charges, after
    one charge that opens the connection outside the count."""
    assert verifier.engine is not None
    _charge(verifier, token)
    _unshelve(verifier)  # its one connection is idle in the pool again, where it is watched
    with _syncs(tmp_path / f"strace-{verifier.demo}.log", *watched(verifier.engine)) as syncs:
        receipts = {_charge(verifier, token) for _ in range(charges)}
    assert len(receipts) == charges
    return syncs


def _backends(engine: Engine) -> list[int]:
    """The server processes behind ``engine``'s idle connections, if they run on this machine."""
    if engine.url.host not in (None, "", "127.0.0.1", "localhost", "::1"):
        pytest.skip(f"PostgreSQL runs on {engine.url.host}: its syncs cannot be watched from here")
    pool = engine.pool
    assert isinstance(pool, QueuePool)
    held = [engine.raw_connection() for _ in range(pool.checkedin())]
    try:
        pids = [int(_query(connection, "SELECT pg_backend_pid()")) for connection in held]
    finally:
        for connection in held:
            connection.close()
    for pid in pids:
        command = Path(f"/proc/{pid}/cmdline")
        if not command.is_file() or b"postgres" not in command.read_bytes():
            pytest.skip("PostgreSQL runs in another container: its syncs cannot be watched")
    return pids


@contextmanager
def _syncs(log: Path, *pids: int) -> Iterator[list[str]]:
    """The fsync and fdatasync calls that threads or processes ``pids`` make inside the block
    (the list is filled when the block exits)."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed (Debian: apt-get install strace)")
    command = ["strace", "-e", "trace=fsync,fdatasync", "-o", str(log)]
    command += [arg for pid in pids for arg in ("-p", str(pid))]
    found: list[str] = []
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True) as strace:
        assert strace.stderr is not None
        for _ in pids:  # strace reports each attach before it watches anything
            line = strace.stderr.readline()
            if "attached" not in line:
                strace.send_signal(signal.SIGINT)  # it may be watching the others already
                strace.wait()
                pytest.skip(f"strace cannot watch {pids}: {line.strip()}")
        try:
            yield found
        finally:
            strace.send_signal(signal.SIGINT)  # detaches; the log is complete once it exits
            strace.wait()
    found += [line for line in log.read_text().splitlines() if "sync(" in line]

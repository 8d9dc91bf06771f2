"""A verifier on a SQLite file checkpoints the write-ahead log from its own thread, so tool
calls' commits never stop to checkpoint; short-lived CLI engines keep SQLite's default
threshold, and PostgreSQL has nothing to checkpoint."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import pytest
from sqlalchemy import Engine

from mcpbill_cli.keys import KeyRing, KeySource
from mcpbill_cli.ledger.checkpoint import BACKSTOP_PAGES, background_checkpointer
from mcpbill_cli.ledger.credit import IssuedToken
from mcpbill_cli.ledger.engine import make_engine
from mcpbill_cli.ledger.schema import upgrade
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.verifier import Verifier

from .billing_support import PRICE, USDC, FakeClock, fund, mint
from .test_async import state

SQLITE_DEFAULT_PAGES = 1000
CHARGES = 90


@pytest.fixture
def sqlite_funded(tmp_path: Path, clock: FakeClock) -> Iterator[Engine]:
    """A funded ledger in a SQLite file: what this file tests exists on SQLite only."""
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    upgrade(engine)
    fund(engine, "acme", 100 * USDC, now=clock())
    yield engine
    engine.dispose()


@pytest.fixture
def sqlite_token(sqlite_funded: Engine, ring: KeyRing,
                 clock: FakeClock) -> Callable[..., IssuedToken]:
    return lambda **options: mint(sqlite_funded, ring, now=clock(), **options)


def _autocheckpoint(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar_one())


def _log_frames(path: str) -> int:
    """Frames now in the log: what no checkpoint has reset yet (this one copies, never resets)."""
    with closing(sqlite3.connect(path)) as conn:
        return int(conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1])


@pytest.fixture
def file_verifier(sqlite_funded: Engine, keys: KeySource, pricing: PricingTable,
                  clock: FakeClock) -> Iterator[Verifier]:
    """A verifier built from the ledger file's URL, as a server builds one."""
    verifier = Verifier(keys=keys, pricing=pricing, db_url=str(sqlite_funded.url), clock=clock)
    yield verifier
    verifier.close()


def test_commits_leave_the_log_to_the_checkpoint_thread(
        sqlite_funded: Engine, file_verifier: Verifier,
        sqlite_token: Callable[..., IssuedToken], clock: FakeClock) -> None:
    token = sqlite_token(limit=USDC)
    checkpointer = file_verifier._checkpointer
    assert checkpointer is not None and checkpointer.running
    assert _autocheckpoint(file_verifier.engine) == BACKSTOP_PAGES  # type: ignore[arg-type]
    checkpointer.close()  # from here on, only commits could checkpoint

    # A charge writes about 16 pages (no shared audit head or revenue row since schema 0005):
    # 90 of them make well over SQLite's default 1,000 pages of log.
    for n in range(CHARGES):
        file_verifier.charge(token.token, "search", idempotency_key=f"k-{n}")
    frames = _log_frames(checkpointer.path)
    assert SQLITE_DEFAULT_PAGES < frames < BACKSTOP_PAGES, frames
    assert state(sqlite_funded, token, clock) == (CHARGES * PRICE, 0, USDC - CHARGES * PRICE)


def test_the_thread_checkpoints_what_calls_wrote_and_stops_on_close(
        sqlite_funded: Engine, file_verifier: Verifier,
        sqlite_token: Callable[..., IssuedToken], clock: FakeClock) -> None:
    token = sqlite_token(limit=USDC)
    checkpointer = file_verifier._checkpointer
    assert checkpointer is not None
    for n in range(5):
        file_verifier.charge(token.token, "search", idempotency_key=f"k-{n}")

    for _ in range(3000):  # polls the thread's own report; the bound only stops a hang
        last = checkpointer.last
        if last is not None and last.logged and last.copied == last.logged:
            break
        time.sleep(0.01)
    else:
        pytest.fail("the checkpoint thread never copied the log")
    file_verifier.close()
    assert not checkpointer.running
    file_verifier.close()  # twice is fine
    assert state(sqlite_funded, token, clock)[0] == 5 * PRICE


def test_cli_engines_keep_sqlite_defaults_and_postgres_has_no_checkpointer(
        tmp_path: Path, pg_engine: Engine) -> None:
    cli = make_engine(f"sqlite:///{tmp_path / 'cli.db'}")
    assert _autocheckpoint(cli) == SQLITE_DEFAULT_PAGES
    assert background_checkpointer(make_engine("sqlite://")) is None  # in memory: no file
    assert background_checkpointer(pg_engine) is None
    cli.dispose()

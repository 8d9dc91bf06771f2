"""A ledger on a real filesystem filled to its last byte by another file, under SQLite and
PostgreSQL: paid calls are refused LEDGER_FULL, nothing is half-written, no tool runs without
a hold, and once the filler is deleted the same verifier takes calls again, without a restart.

What the servers really do, as seen here (SQLite 3.40, PostgreSQL 15):

- SQLite, while a verifier holds the ledger open: a commit that needs room fails with
  SQLITE_FULL ("database or disk is full") and is rolled back. A process that opens the ledger
  on a full disk once every connection has closed (its WAL and ``-shm`` files are gone then)
  fails at growing the ``-shm`` file: only "disk I/O error" (SQLITE_IOERR_SHMSIZE); with the
  filesystem out of room that is LEDGER_FULL too. Either way the pooled connections work again
  as soon as there is room: none is left broken.
- PostgreSQL, with its data directory on the full disk and ``pg_wal`` on another: a statement
  that extends a table or index fails "could not extend file ...: No space left on device"
  (SQLSTATE 53100, disk_full) and its transaction is rolled back; the server stays up. (With
  ``pg_wal`` itself full the server PANICs instead, and stops if crash recovery cannot write
  either: see the README's Faults and recovery.)
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from mcpbill_cli.clock import utcnow
from mcpbill_cli.errors import LedgerFull
from mcpbill_cli.keys import KeyRing, KeySource, init_keyring
from mcpbill_cli.ledger.engine import make_engine, reading
from mcpbill_cli.ledger.models import calls
from mcpbill_cli.ledger.schema import upgrade
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.verifier import Hold, Verifier
from tests.verifier.billing_support import PRICE, PRICING_DOC, USDC, fund, mint
from tests.verifier.invariants import assert_ledger_invariants

from .conftest import Run, deposits_until_refused
from .scratch_postgres import ScratchPostgres, os_user_ids, unstarted_cluster
from .small_disk import SmallDisk, small_disk, small_disk_in_temp

LIMIT = 50 * USDC  # the token's
MAX_CALLS = 2000  # a full disk refuses long before this many calls


class Ledger:
    """A migrated, funded ledger at ``url``, a token on it, and a live verifier built from
    the URL as a server builds one (on SQLite with its own WAL checkpointer)."""

    def __init__(self, url: str, keys_dir: Path) -> None:
        self.engine = make_engine(url)
        upgrade(self.engine)
        init_keyring(keys_dir, "EdDSA", now=utcnow(), force=False).save()
        fund(self.engine, "acme", 100 * USDC, now=utcnow())
        self.token = mint(self.engine, KeyRing.load(keys_dir), now=utcnow(), limit=LIMIT).token
        self.verifier = Verifier(keys=KeySource(directory=keys_dir),
                                 pricing=PricingTable.from_document(PRICING_DOC), db_url=url)
        self.receipts: list[str] = []
        self.holds: list[Hold] = []  # every hold the tool ran under

    def one_call(self, n: int) -> None:
        """Call ``n``: a charge, or (odd ``n``) a hold, the tool, and a capture."""
        key = f"call-{n}"
        if n % 2 == 0:
            self.receipts.append(self.verifier.charge(self.token, "search", args={"n": n},
                                                      idempotency_key=key).receipt_id)
            return
        with self.verifier.call(self.token, "search", args={"n": n},
                                idempotency_key=key) as call:
            self.holds.append(call.hold)
        assert call.receipt is not None
        self.receipts.append(call.receipt.receipt_id)

    def calls_until_refused(self) -> LedgerFull:
        for n in range(1, MAX_CALLS):
            try:
                self.one_call(n)
            except LedgerFull as exc:
                return exc
        raise AssertionError(f"{MAX_CALLS} calls fitted on a full disk")

    def assert_nothing_half_written(self) -> None:
        """Every receipt is a captured call, every other call row is a hold the tool ran
        under and is not billed, the invariants hold, and the token has spent exactly that."""
        with reading(self.engine) as conn:
            assert_ledger_invariants(conn)
            rows = dict(conn.execute(select(calls.c.id, calls.c.status)).all())
        captured = {id_ for id_, status in rows.items() if status == "captured"}
        assert captured == set(self.receipts)
        ran = {hold.id for hold in self.holds}
        assert set(rows) - captured <= ran  # a tool ran only under a hold the ledger holds
        held = sum(1 for status in rows.values() if status == "held")
        remaining = self.verifier.preflight(self.token, "search").remaining
        assert remaining == LIMIT - (len(captured) + held) * PRICE

    def void_refused_captures(self) -> None:
        """The calls whose capture was refused failed: their holds are given back."""
        with reading(self.engine) as conn:
            held = set(conn.execute(select(calls.c.id).where(calls.c.status == "held"))
                       .scalars())
        for hold in self.holds:
            if hold.id in held:
                self.verifier.void(hold)

    def close(self) -> None:
        self.verifier.close()
        self.engine.dispose()


def refused_whole_then_resumed(ledger: Ledger, disk: SmallDisk) -> LedgerFull:
    """Fill the disk under a running verifier, call until refused, free it: the same
    verifier's next calls go through. Returns the refusal."""
    ledger.one_call(0)
    disk.fill()
    refused = ledger.calls_until_refused()
    assert refused.code == "LEDGER_FULL" and "free disk space" in refused.message
    ledger.assert_nothing_half_written()

    disk.free()
    for n in range(MAX_CALLS, MAX_CALLS + 4):  # charges and calls, no restart
        ledger.one_call(n)
    ledger.void_refused_captures()
    ledger.assert_nothing_half_written()
    with reading(ledger.engine) as conn:
        still_held = conn.execute(select(func.count()).where(calls.c.status == "held"))
        assert still_held.scalar_one() == 0
    return refused


def test_a_sqlite_ledger_on_a_full_filesystem_refuses_whole_and_resumes(
        tmp_path: Path) -> None:
    with small_disk_in_temp("16m") as disk:
        ledger = Ledger(f"sqlite:///{disk.mount / 'ledger.db'}", tmp_path / "keys")
        try:
            refused = refused_whole_then_resumed(ledger, disk)
        finally:
            ledger.close()
    assert "database or disk is full" in refused.message


def test_a_command_opening_a_sqlite_ledger_on_a_full_filesystem_exits_8_ledger_full(
        mcpbill: Run) -> None:
    """No process has the ledger open, so SQLite must make its ``-shm`` file again and
    cannot: "disk I/O error", with no room left on the filesystem, is LEDGER_FULL."""
    with small_disk_in_temp("4m") as disk:
        env = {"MCPBILL_DB_URL": f"sqlite:///{disk.mount / 'ledger.db'}"}
        assert mcpbill("init", "--mode", "demo", env=env).returncode == 0
        assert mcpbill("wallet", "fund", "--demo", "5", "--tenant", "acme",
                       env=env).returncode == 0
        assert sorted(os.listdir(disk.mount)) == ["ledger.db"]  # closed: no WAL, no -shm
        disk.fill()
        refused = mcpbill("wallet", "fund", "--demo", "1", "--tenant", "acme", "--json",
                          env=env)
        assert refused.returncode == 8, refused.stdout + refused.stderr
        error = json.loads(refused.stdout)["errors"][0]
        assert error["code"] == "LEDGER_FULL", error
        assert "disk I/O error" in error["message"] and "free disk space" in error["message"]

        disk.free()
        balance = mcpbill("wallet", "balance", "--tenant", "acme", "--json", env=env)
        assert json.loads(balance.stdout)["data"]["available_usd"] == "5.00", balance.stderr
        again = mcpbill("wallet", "fund", "--demo", "1", "--tenant", "acme", env=env)
        assert again.returncode == 0, again.stderr


@pytest.fixture
def cluster_on_small_disk(pg_server: None) -> Iterator[tuple[ScratchPostgres, SmallDisk]]:
    """A throwaway cluster whose data directory is a 64 MiB tmpfs (pg_wal beside it, on the
    ordinary disk), destroyed afterwards."""
    cluster = unstarted_cluster()
    cluster.data.mkdir()
    try:
        with small_disk(cluster.data, "64m", owner=os_user_ids()) as disk:
            try:
                cluster.init("--waldir", str(cluster.root / "wal"))
                cluster.start()
                yield cluster, disk
            finally:
                cluster.destroy()  # stops it; the mount point itself stays till unmounted
    finally:
        shutil.rmtree(cluster.root, ignore_errors=True)


def test_a_postgresql_ledger_on_a_full_filesystem_refuses_whole_and_resumes(
        cluster_on_small_disk: tuple[ScratchPostgres, SmallDisk], tmp_path: Path,
        mcpbill: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    cluster, disk = cluster_on_small_disk
    ledger = Ledger(cluster.url, tmp_path / "keys")
    started = utcnow()
    try:
        refused = refused_whole_then_resumed(ledger, disk)
    finally:
        ledger.close()
    assert "No space left on device" in refused.message
    monkeypatch.setenv("MCPBILL_DB_URL", cluster.url)
    a_deposit_on_the_full_disk_exits_8_and_goes_in_with_room(disk)

    checked = mcpbill("reconcile", "--from", started.isoformat(), "--json",
                      env={"MCPBILL_DB_URL": cluster.url})
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert json.loads(checked.stdout)["status"] == "ok"


def a_deposit_on_the_full_disk_exits_8_and_goes_in_with_room(disk: SmallDisk) -> None:
    """``wallet fund`` (in this process) until the full disk refuses one: exit 8, one JSON
    document with LEDGER_FULL; with room again the refused deposit goes in under its key."""
    from typer.testing import CliRunner

    from mcpbill_cli.cli import app

    runner = CliRunner()

    def invoke(*args: str) -> Any:
        return runner.invoke(app, list(args), catch_exceptions=False)

    disk.fill()
    try:
        funded, refused = deposits_until_refused(invoke)
    finally:
        disk.free()
    assert refused.exit_code == 8, refused.output
    assert json.loads(refused.stdout)["errors"][0]["code"] == "LEDGER_FULL", refused.output
    again = invoke("wallet", "fund", "--demo", "1", "--tenant", "acme", "--json",
                   "--idempotency-key", f"fill-{funded}")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["data"]["replayed"] is False

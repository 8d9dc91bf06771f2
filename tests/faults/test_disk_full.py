"""A full disk: the ledger refuses calls whole with LEDGER_FULL and takes them again once there
is room; the CLI's file writes leave the old file whole.

The ledger's disk here is a SQLite ``max_page_count`` set on every connection the pool hands
out (test_full_filesystem.py fills real filesystems under SQLite and PostgreSQL). The CLI's
files are written to a small tmpfs filled to the last byte; where this machine cannot mount
one, that test is skipped, but never under ``CI=true``.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, select, text
from sqlalchemy.pool import Pool

from mcpbill_cli.clock import utcnow
from mcpbill_cli.errors import BillingError, LedgerFull, LedgerUnavailable
from mcpbill_cli.keys import KeyRing, KeySource, init_keyring
from mcpbill_cli.ledger.engine import make_engine, reading
from mcpbill_cli.ledger.models import calls
from mcpbill_cli.ledger.schema import upgrade
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.verifier import Verifier
from tests.faults.conftest import Run, deposits_until_refused
from tests.faults.small_disk import SmallDisk, small_disk_in_temp
from tests.verifier.billing_support import PRICE, PRICING_DOC, USDC, fund, mint
from tests.verifier.invariants import assert_ledger_invariants

NO_LIMIT = 1_073_741_823  # SQLite's largest max_page_count
MAX_CALLS = 2000  # a full ledger refuses long before this many calls


@pytest.fixture
def capped(tmp_path: Path) -> Iterator[tuple[Engine, dict[str, int]]]:
    """A migrated SQLite ledger whose size limit (pages) the test sets in ``limit["pages"]``;
    every connection checked out of the pool gets the limit in force."""
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    limit = {"pages": NO_LIMIT}

    @event.listens_for(engine, "checkout")
    def _cap(dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
        dbapi_conn.execute(f"PRAGMA max_page_count={limit['pages']}")

    upgrade(engine)
    yield engine, limit
    engine.dispose()


def test_a_full_ledger_refuses_calls_whole_with_ledger_full_and_resumes_with_room(
        capped: tuple[Engine, dict[str, int]], tmp_path: Path) -> None:
    engine, limit = capped
    keys_dir = tmp_path / "keys"
    init_keyring(keys_dir, "EdDSA", now=utcnow(), force=False).save()
    fund(engine, "acme", 100 * USDC, now=utcnow())
    token = mint(engine, KeyRing.load(keys_dir), now=utcnow(), limit=50 * USDC).token
    verifier = Verifier(keys=KeySource(directory=keys_dir),
                        pricing=PricingTable.from_document(PRICING_DOC), engine=engine)
    verifier.charge(token, "search", args={"n": -1})
    with engine.connect() as conn:
        limit["pages"] = int(conn.execute(text("PRAGMA page_count")).scalar_one())
    engine.dispose()  # every connection from now on has the disk as it is: full

    receipts, refused = [], None
    for n in range(MAX_CALLS):
        try:
            receipts.append(verifier.charge(token, "search", args={"n": n},
                                            idempotency_key=f"full-{n}"))
        except BillingError as exc:
            refused = (n, exc)
            break
    assert refused is not None, f"{MAX_CALLS} calls fitted in a full ledger"
    n, error = refused
    assert isinstance(error, LedgerFull) and isinstance(error, LedgerUnavailable)
    assert error.code == "LEDGER_FULL"
    assert "full" in error.message and "free disk space" in error.message
    ran: list[str] = []  # holds the tool ran under
    with pytest.raises(LedgerFull), verifier.call(token, "search", args={"tool": "runs"}) as call:
        ran.append(call.hold.id)

    def nothing_half_written() -> None:
        with reading(engine) as conn:
            assert_ledger_invariants(conn)
            status = dict(conn.execute(select(calls.c.status, func.count())
                                       .group_by(calls.c.status)).all())
            held = set(conn.execute(select(calls.c.id).where(calls.c.status == "held"))
                       .scalars())
        assert status["captured"] == len(receipts) + 1  # the refused charge left no row
        assert held <= set(ran)  # a tool ran only under a hold the ledger holds, unbilled
        spent = status["captured"] * PRICE + len(held) * PRICE
        assert verifier.preflight(token, "search").remaining == 50 * USDC - spent

    nothing_half_written()
    limit["pages"] = NO_LIMIT  # room again: no restart, the next call gets it
    receipts.append(verifier.charge(token, "search", args={"n": n},
                                    idempotency_key=f"full-{n}"))
    if ran:  # the capture was refused: the call failed, and its hold is released
        verifier.void(call.hold)
    ran.clear()
    nothing_half_written()
    verifier.close()


def test_the_cli_on_a_full_ledger_exits_8_with_ledger_full_and_changes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same refusal through a CLI command: ``wallet fund`` on a ledger that cannot grow
    (the limit is set on the connections of every pool in this process: the CLI's own)."""
    from typer.testing import CliRunner

    from mcpbill_cli.cli import app

    monkeypatch.setenv("MCPBILL_DB_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    runner = CliRunner()

    def mcpbill(*args: str) -> Any:
        return runner.invoke(app, list(args), catch_exceptions=False)

    assert mcpbill("init", "--mode", "demo").exit_code == 0
    assert mcpbill("wallet", "fund", "--demo", "5", "--tenant", "acme").exit_code == 0

    def full(dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
        pages = dbapi_conn.execute("PRAGMA page_count").fetchone()[0]
        dbapi_conn.execute(f"PRAGMA max_page_count={pages}")

    event.listen(Pool, "checkout", full)
    try:  # until the pages the ledger has are used up
        funded, refused = deposits_until_refused(mcpbill)
    finally:
        event.remove(Pool, "checkout", full)
    assert refused.exit_code == 8, refused.output
    errors = json.loads(refused.stdout)["errors"]
    assert errors[0]["code"] == "LEDGER_FULL", errors
    assert "free disk space" in errors[0]["message"]
    assert funded > 0  # it filled up as the ledger grew, not at once
    assert _available(mcpbill("wallet", "balance", "--tenant", "acme", "--json")) == (
        f"{5 + funded}.00")  # the refused deposit moved nothing
    again = mcpbill("wallet", "fund", "--demo", "1", "--tenant", "acme", "--json",
                    "--idempotency-key", f"fill-{funded}")  # room again: the refused one goes in
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["data"]["available_usd"] == f"{6 + funded}.00"


def _available(result: Any) -> str:
    assert result.exit_code == 0, result.output
    return str(json.loads(result.stdout)["data"]["available_usd"])


@pytest.fixture
def small_disk() -> Iterator[SmallDisk]:
    with small_disk_in_temp("1m") as disk:
        yield disk


def test_cli_writes_on_a_full_disk_leave_the_old_files_whole(
        small_disk: SmallDisk, tmp_path: Path, mcpbill: Run) -> None:
    """The pricing file, the key ring and an export, on a disk with no room left: each
    command exits 3 (FILE_UNAVAILABLE) naming the file, and every file is as it was."""
    env = {"MCPBILL_HOME": str(small_disk.mount / "home"),
           "MCPBILL_DB_URL": f"sqlite:///{tmp_path / 'ledger.db'}"}
    assert mcpbill("init", "--mode", "demo", env=env).returncode == 0
    assert mcpbill("wallet", "fund", "--demo", "5", "--tenant", "acme", env=env).returncode == 0
    export = small_disk.mount / "events.jsonl"
    assert mcpbill("events", "export", "--out", str(export), env=env).returncode == 0
    before = small_disk.files()
    small_disk.fill()

    for command, named in ((("pricing", "set", "search", "0.02"), "pricing.toml"),
                           (("keys", "rotate"), "keys"),
                           (("events", "export", "--out", str(export)), "events.jsonl")):
        refused = mcpbill(*command, "--json", env=env)
        assert refused.returncode == 3, (command, refused.stdout, refused.stderr)
        error = json.loads(refused.stdout)["errors"][0]
        assert error["code"] == "FILE_UNAVAILABLE", error
        assert named in error["message"] and "No space left on device" in error["message"]
        assert small_disk.files() == before, command  # nothing half-written, nothing left

    small_disk.free()
    assert mcpbill("pricing", "set", "search", "0.02", env=env).returncode == 0


def test_a_pricing_edit_that_meets_enospc_at_the_sync_keeps_the_old_file(
        isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same as on a full tmpfs, for machines that cannot mount one: the disk fills up
    between the write and its sync (ENOSPC from fsync)."""
    from typer.testing import CliRunner

    from mcpbill_cli import fsutil
    from mcpbill_cli.cli import app

    monkeypatch.setenv("MCPBILL_DB_URL", f"sqlite:///{tmp_path / 'ledger.db'}")
    runner = CliRunner()
    assert runner.invoke(app, ["init", "--mode", "demo"]).exit_code == 0
    pricing = isolated_home / "pricing.toml"
    before = pricing.read_bytes()

    def no_space(_fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fsutil.os, "fsync", no_space)
    refused = runner.invoke(app, ["pricing", "set", "search", "0.02", "--json"])
    monkeypatch.undo()
    assert refused.exit_code == 3, refused.output
    error = json.loads(refused.stdout)["errors"][0]
    assert error["code"] == "FILE_UNAVAILABLE"
    assert "pricing.toml" in error["message"] and "No space left on device" in error["message"]
    assert pricing.read_bytes() == before
    assert [p.name for p in isolated_home.iterdir() if p.name.startswith(".pricing")] == []

"""Destructive commands ask on a terminal and need --yes in scripts; `init --force` retires the
old keys instead of deleting them, so receipts they signed still verify."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mcpbill_cli import Verifier
from mcpbill_cli.keys import KeyRing
from tests.cli.conftest import Invoke, error_json, ok_json, tree_snapshot
from tests.cli.test_bad_input import ledger_snapshot

MCPBILL = str(Path(sys.executable).parent / "mcpbill")


def on_a_terminal(*args: str, answer: str) -> tuple[int, str]:
    """Run mcpbill with a pseudo-terminal as stdin, stdout and stderr; answer its prompt."""
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([MCPBILL, *args], stdin=terminal, stdout=terminal, stderr=terminal,
                            close_fds=True)
    os.close(terminal)
    seen = _read_until(controller, b"Go ahead?")
    os.write(controller, answer.encode() + b"\n")
    code = proc.wait(timeout=60)
    seen += _read_until(controller, None)
    os.close(controller)
    return code, seen.decode(errors="replace")


def _read_until(fd: int, needle: bytes | None, timeout: float = 60) -> bytes:
    seen, deadline = b"", time.monotonic() + timeout
    while needle is None or needle not in seen:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    return seen


def in_a_script(*args: str) -> subprocess.CompletedProcess[str]:
    """Run mcpbill as a script does: stdin from /dev/null, output to pipes."""
    return subprocess.run([MCPBILL, *args], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, check=False, timeout=60)


@pytest.fixture
def issued(ledger_cli: Invoke) -> Invoke:
    """Two tokens of tenant acme, from a funded wallet."""
    ok_json(ledger_cli("wallet", "fund", "--tenant", "acme", "--demo", "4", "--json"))
    for _ in range(2):
        ok_json(ledger_cli("token", "issue", "--tenant", "acme", "--limit", "1", "--json"))
    return ledger_cli


DESTRUCTIVE = [("init", "--force"), ("revoke", "--tenant", "acme"),
               ("revoke", "--tenant", "acme", "--agent", "agent"),
               ("keys", "retire", "{old_kid}", "--force")]


def _with_old_key(cli: Invoke, args: tuple[str, ...]) -> list[str]:
    """``args`` with {old_kid}: a key rotated out while tokens it signed are alive."""
    if "{old_kid}" not in args:
        return list(args)
    old_kid = ok_json(cli("keys", "rotate", "--json"))["previous"]["kid"]
    return [a.format(old_kid=old_kid) for a in args]


@pytest.mark.parametrize("args", DESTRUCTIVE)
def test_without_a_terminal_or_yes_nothing_is_destroyed(
        issued: Invoke, isolated_home: Path, db_url: str, args: tuple[str, ...]) -> None:
    argv = _with_old_key(issued, args)
    files, ledger = tree_snapshot(isolated_home), ledger_snapshot(db_url)
    as_json = issued(*argv, "--json")
    assert as_json.exit_code == 25, as_json.output
    assert "--yes" in error_json(as_json, "CONFIRMATION_REQUIRED")["message"]
    as_text = in_a_script(*argv)
    assert as_text.returncode == 25, as_text.stderr
    assert "--yes" in as_text.stderr and "Aborted" not in as_text.stderr + as_text.stdout
    assert tree_snapshot(isolated_home) == files and ledger_snapshot(db_url) == ledger


@pytest.mark.parametrize("args", DESTRUCTIVE)
def test_yes_goes_ahead_in_a_script(issued: Invoke, args: tuple[str, ...]) -> None:
    argv = _with_old_key(issued, args)
    done = in_a_script(*argv, "--yes", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["status"] == "ok"


def test_a_terminal_is_asked_and_no_changes_nothing(issued: Invoke, isolated_home: Path,
                                                   db_url: str) -> None:
    files, ledger = tree_snapshot(isolated_home), ledger_snapshot(db_url)
    for args in (("init", "--force"), ("revoke", "--tenant", "acme")):
        code, seen = on_a_terminal(*args, answer="n")
        assert code == 25, seen
        assert "Go ahead? [y/N]" in seen and "not confirmed" in seen
    assert tree_snapshot(isolated_home) == files and ledger_snapshot(db_url) == ledger


def test_a_terminal_that_says_yes_gets_it_done(issued: Invoke, isolated_home: Path) -> None:
    old_kid = KeyRing.load(isolated_home / "keys").active().kid
    code, seen = on_a_terminal("revoke", "--tenant", "acme", answer="y")
    assert code == 0, seen
    assert "Revoke 2 active token(s) of tenant acme" in seen
    assert ok_json(issued("token", "list", "--status", "active", "--json")) == []
    code, seen = on_a_terminal("init", "--force", answer="y")
    assert code == 0, seen
    keys = KeyRing.load(isolated_home / "keys").keys
    assert keys[old_kid].status == "retired" and len(keys) == 2


def test_old_receipts_verify_after_init_force(issued: Invoke, isolated_home: Path) -> None:
    token = ok_json(issued("token", "issue", "--tenant", "acme", "--limit", "1", "--json"))
    verifier = Verifier.from_settings()
    try:
        receipt = verifier.charge(token["token"], "search", idempotency_key="before-init-force")
    finally:
        verifier.close()
    ok_json(issued("init", "--force", "--yes", "--json"))
    assert (isolated_home / "keys" / f"{token['kid']}.pem").exists()
    today = time.strftime("%Y-%m-%d", time.gmtime())
    report = issued("reconcile", "--from", today, "--verify-receipts", "--jobs", "1", "--json")
    assert report.exit_code == 0, report.output
    assert ok_json(report)["errors"] == 0
    assert issued("receipt", "show", receipt.receipt_id, "--json").exit_code == 0
    checked = ok_json(issued("receipt", "verify", receipt.jws, "--json"))
    assert checked["valid"] is True and checked["receipt_id"] == receipt.receipt_id
    assert issued("token", "inspect", token["token"]).exit_code == 6  # its key is retired

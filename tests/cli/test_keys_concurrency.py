"""`keys rotate`, `keys retire`, `token issue` and `init` run at once, as separate processes on
one home: no key is lost from the ring, and every token issued verifies until it expires."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mcpbill_cli.keys import KeyRing
from mcpbill_cli.tokens import decode_token
from tests.cli.conftest import Invoke, ok_json

LEEWAY = timedelta(seconds=30)  # the default: verifiers accept a token this long past its exp

# `python -m mcpbill_cli ARGS...` that waits for a common start time, its imports done first,
# so that the commands really overlap instead of being spread out by interpreter start-up.
RUN_AT = textwrap.dedent("""
    import runpy, sys, time
    import mcpbill_cli.cli, mcpbill_cli.ledger.credit, mcpbill_cli.ledger.engine
    start = float(sys.argv[1])
    sys.argv = ["mcpbill", *sys.argv[2:]]
    time.sleep(max(0.0, start - time.time()))
    runpy.run_module("mcpbill_cli", run_name="__main__")
""")


def run_at_once(*commands: tuple[str, ...]) -> list[subprocess.CompletedProcess[str]]:
    """Run each command as its own mcpbill process, all starting together; wait for all."""
    start = time.time() + 1 + 0.25 * len(commands)  # every interpreter is up by then
    processes = [subprocess.Popen([sys.executable, "-c", RUN_AT, str(start), *command],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for command in commands]
    results = []
    for command, process in zip(commands, processes, strict=True):
        stdout, stderr = process.communicate(timeout=180)
        results.append(subprocess.CompletedProcess(command, process.returncode, stdout, stderr))
    return results


def data_of(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, (result.args, result.stdout, result.stderr)
    return json.loads(result.stdout)["data"]


def key_files(keys_dir: Path) -> list[str]:
    return sorted(p.stem for p in keys_dir.iterdir() if p.suffix in (".pem", ".secret"))


def assert_verifies_until_it_expires(ring: KeyRing, issued: dict[str, Any]) -> None:
    """The token verifies with the ring at its last moment, so at every moment before."""
    last = datetime.fromisoformat(issued["expires_at"]) + LEEWAY - timedelta(seconds=1)
    claims = decode_token(issued["token"], ring.verification_keys(last), audience="mcpbill",
                          issuer="mcpbill", now=last)
    assert claims.jti == issued["jti"]


@pytest.mark.slow
def test_concurrent_rotations_and_token_issues_lose_no_key_and_no_token(
        ledger_cli: Invoke, isolated_home: Path) -> None:
    """Each rotation loaded, changed and saved the ring unlocked: of 6 at once a few survived,
    and tokens issued meanwhile were signed by keys no longer in the ring. Now each rotation
    rotates out the key the one before it made, and every token verifies until it expires."""
    ok_json(ledger_cli("wallet", "fund", "--demo", "10", "--json"))
    first = ok_json(ledger_cli("keys", "list", "--json"))[0]["kid"]
    results = run_at_once(*[("keys", "rotate", "--json")] * 6,
                          *[("token", "issue", "--limit", "0.1", "--json")] * 12)
    rotations = [data_of(r) for r in results if r.args[0] == "keys"]
    tokens = [data_of(r) for r in results if r.args[0] == "token"]

    ring = KeyRing.load(isolated_home / "keys")
    made = [rotation["active"]["kid"] for rotation in rotations]
    assert sorted(ring.keys) == sorted([first, *made]) == key_files(isolated_home / "keys")
    rotated_out = sorted(rotation["previous"]["kid"] for rotation in rotations)
    assert rotated_out == sorted(set(ring.keys) - {ring.active().kid})  # each once, in a chain
    for issued in tokens:
        assert_verifies_until_it_expires(ring, issued)


@pytest.mark.slow
def test_a_retire_beside_rotations_keeps_their_keys_and_they_keep_it(
        ledger_cli: Invoke, isolated_home: Path) -> None:
    old = [ok_json(ledger_cli("keys", "rotate", "--json"))["previous"]["kid"] for _ in range(2)]
    results = run_at_once(*[("keys", "retire", kid, "--json") for kid in old],
                          *[("keys", "rotate", "--json")] * 4)
    made = [data_of(r)["active"]["kid"] for r in results if r.args[1] == "rotate"]
    assert [data_of(r)["status"] for r in results if r.args[1] == "retire"] == ["retired"] * 2

    ring = KeyRing.load(isolated_home / "keys")
    assert set(made) < set(ring.keys) and len(ring.keys) == 3 + len(made)
    assert sorted(ring.keys) == key_files(isolated_home / "keys")
    assert [ring.keys[kid].status for kid in old] == ["retired"] * 2


@pytest.mark.slow
@pytest.mark.parametrize("exist_ok", [False, True], ids=["init", "init --exist-ok"])
def test_concurrent_inits_of_a_new_home_make_one_key(
        db_url: str, isolated_home: Path, monkeypatch: pytest.MonkeyPatch,
        exist_ok: bool) -> None:
    """Two of four inits at once exited 0 naming different keys; the ring held one of them,
    so tokens signed by the other never verified. Now one init makes the home and the others
    do what an init run after it does: refuse (ALREADY_EXISTS), or with --exist-ok name its
    key."""
    monkeypatch.setenv("MCPBILL_DB_URL", db_url)
    command = ("init", "--json", *(["--exist-ok"] if exist_ok else []))
    results = run_at_once(*[command] * 4)
    made = [data_of(r) for r in results if r.returncode == 0 and json.loads(r.stdout)[
        "data"]["created"]]
    assert len(made) == 1, [r.stdout for r in results]
    kid = made[0]["kid"]
    for result in results:
        if exist_ok:
            assert data_of(result)["kid"] == kid
        elif result.returncode != 0:
            assert result.returncode == 7, result.stdout
            [error] = json.loads(result.stdout)["errors"]
            assert error["code"] == "ALREADY_EXISTS"
            assert "is already initialized; nothing was changed" in error["message"]
    assert list(KeyRing.load(isolated_home / "keys").keys) == [kid]
    assert key_files(isolated_home / "keys") == [kid]

"""Standard streams as scripts leave them: closed (``>&-``), on a full disk (``>/dev/full``).

What a command did stands whatever happens to its output: a result stdout cannot take is
FILE_UNAVAILABLE, with what was done and how to undo it on stderr; talk stderr cannot take is
dropped. Never a traceback, never Python's exit status 120. Each run goes through bash, as a
script's redirections do, with stdout block-buffered as in a shell (no PYTHONUNBUFFERED)."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shlex
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest

from mcpbill_cli.cli.output import EXIT_CODES
from tests.cli.conftest import tree_snapshot

MCPBILL = str(Path(sys.executable).with_name("mcpbill"))
FILE_UNAVAILABLE = EXIT_CODES["FILE_UNAVAILABLE"]
STDOUT_FAILURES = [">/dev/full", ">&-"]


@pytest.fixture
def env(isolated_home: Path) -> dict[str, str]:
    """A demo home with 5 USDC for the default tenant; a shell's environment."""
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    for args in (["init", "--mode", "demo"], ["wallet", "fund", "--demo", "5"]):
        subprocess.run([MCPBILL, *args], env=environ, capture_output=True, check=True,
                       timeout=60)
    return environ


def sh(environ: dict[str, str], *args: str, redirect: str) -> subprocess.CompletedProcess[str]:
    """``mcpbill ARGS REDIRECT`` run by bash; what it left on the other streams, captured."""
    line = f"{shlex.join([MCPBILL, *args])} {redirect}"
    return subprocess.run(["bash", "-c", line], capture_output=True, text=True, env=environ,
                          check=False, timeout=60)


def data(environ: dict[str, str], *args: str) -> Any:
    proc = subprocess.run([MCPBILL, *args, "--json"], capture_output=True, text=True,
                          env=environ, check=True, timeout=60)
    return json.loads(proc.stdout)["data"]


def new_tokens(environ: dict[str, str], before: set[str]) -> list[dict[str, Any]]:
    return [t for t in data(environ, "token", "list") if t["jti"] not in before]


@pytest.mark.parametrize("as_json", [False, True])
@pytest.mark.parametrize("unbuffered", [False, True])
@pytest.mark.parametrize("redirect", STDOUT_FAILURES)
def test_a_token_stdout_cannot_take_is_file_unavailable_and_named(
        env: dict[str, str], redirect: str, unbuffered: bool, as_json: bool) -> None:
    """The token is allotted and cannot be printed again: exit 3, and stderr names it and how to
    give its credit back (it was INTERNAL_ERROR, or an AttributeError with stdout closed)."""
    environ = {**env, "PYTHONUNBUFFERED": "1"} if unbuffered else env
    before = {t["jti"] for t in data(env, "token", "list")}
    proc = sh(environ, "token", "issue", "--limit", "0.1", *(["--json"] if as_json else []),
              redirect=redirect)
    [issued] = new_tokens(env, before)
    assert proc.returncode == FILE_UNAVAILABLE, proc.stderr
    [said] = proc.stderr.splitlines()
    assert said.startswith("error FILE_UNAVAILABLE: cannot write to stdout: "), said
    assert (f"token {issued['jti']} was issued but not printed; `mcpbill revoke "
            f"{issued['jti']}` returns its 0.10 USDC to the tenant") in said
    assert "eyJ" not in proc.stderr  # the credential itself is never on stderr
    assert issued["status"] == "active"
    data(env, "revoke", issued["jti"])
    assert data(env, "wallet", "balance")["available_usd"] == "5.00"


@pytest.mark.parametrize("redirect", ["2>/dev/full", "2>&-"])
def test_a_token_is_printed_whatever_becomes_of_the_talk(env: dict[str, str],
                                                         redirect: str) -> None:
    """`T=$(mcpbill token issue ... 2>/dev/full)` got exit 1 and no token, the token allotted."""
    before = {t["jti"] for t in data(env, "token", "list")}
    proc = sh(env, "token", "issue", "--limit", "0.1", redirect=redirect)
    [issued] = new_tokens(env, before)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout.count(".") == 2 and proc.stdout.startswith("eyJ"), proc.stdout
    inspected = subprocess.run([MCPBILL, "token", "inspect", "-", "--json"], input=proc.stdout,
                               capture_output=True, text=True, env=env, check=True, timeout=60)
    assert json.loads(inspected.stdout)["data"]["jti"] == issued["jti"]


@pytest.mark.parametrize("redirect", ["2>/dev/full", "2>&-"])
def test_a_fund_whose_talk_is_lost_is_done_once_and_says_so(env: dict[str, str],
                                                           redirect: str) -> None:
    """`wallet fund --demo 1 2>&-` funded and exited 1: a script that retried funded twice."""
    proc = sh(env, "wallet", "fund", "--demo", "1", redirect=redirect)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert data(env, "wallet", "balance")["funded_usd"] == "6.00"


def test_the_token_comes_before_the_talk(env: dict[str, str]) -> None:
    """The result is written first: talk that blocks or fails comes after what must be got."""
    proc = sh(env, "token", "issue", "--limit", "0.1", "--rate", "5/s", redirect="2>&1")
    assert proc.returncode == 0, proc.stdout
    token, *talk = proc.stdout.splitlines()
    assert token.startswith("eyJ") and talk[0].startswith("issued tok_"), proc.stdout
    assert talk[1] == "rate limits: 5/s calls"


@pytest.mark.parametrize("redirect", STDOUT_FAILURES)
@pytest.mark.parametrize("args", [("token", "list"), ("token", "list", "--json"),
                                  ("tenant", "list", "--output", "csv"), ("--help",),
                                  ("events", "export"), ("reconcile", "--json")],
                         ids=" ".join)
def test_output_stdout_cannot_take_is_file_unavailable(env: dict[str, str], redirect: str,
                                                       args: tuple[str, ...]) -> None:
    """`token list --json >&-` printed a traceback (AttributeError on None); `>/dev/full` ended
    in INTERNAL_ERROR or Python's own exit status 120."""
    proc = sh(env, *args, redirect=redirect)
    assert proc.returncode == FILE_UNAVAILABLE, proc.stderr
    assert proc.stderr.splitlines()[-1].startswith(
        "error FILE_UNAVAILABLE: cannot write to stdout: "), proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr


@pytest.mark.parametrize("redirect", STDOUT_FAILURES)
def test_a_failure_stdout_cannot_take_keeps_its_code_and_is_told_on_stderr(
        env: dict[str, str], redirect: str) -> None:
    proc = sh(env, "token", "show", "tok_missing", "--json", redirect=redirect)
    assert proc.returncode == EXIT_CODES["NOT_FOUND"], proc.stderr
    [said] = proc.stderr.splitlines()
    assert said.startswith("error NOT_FOUND: no token tok_missing"), said


def test_a_usage_error_stdout_cannot_take_is_told_on_stderr(env: dict[str, str]) -> None:
    proc = sh(env, "token", "list", "--bogus", "--json", redirect=">&-")
    assert proc.returncode == EXIT_CODES["USAGE_ERROR"], proc.stderr
    assert "No such option: --bogus" in proc.stderr and "Traceback" not in proc.stderr


def test_no_stream_at_all_still_exits_with_the_code(env: dict[str, str]) -> None:
    before = {t["jti"] for t in data(env, "token", "list")}
    proc = sh(env, "token", "issue", "--limit", "0.1", redirect=">&- 2>&-")
    assert proc.returncode == FILE_UNAVAILABLE
    assert len(new_tokens(env, before)) == 1


@pytest.mark.parametrize("redirect", STDOUT_FAILURES)
def test_a_webhook_secret_stdout_cannot_take_says_how_to_remove_the_endpoint(
        env: dict[str, str], redirect: str) -> None:
    """The endpoint was added with a secret nobody had: exit 0 with stdout closed,
    INTERNAL_ERROR on a full disk, and no word of how to undo it."""
    proc = sh(env, "webhooks", "add", "https://ops.example.com/hooks", redirect=redirect)
    [endpoint] = data(env, "webhooks", "list")
    assert proc.returncode == FILE_UNAVAILABLE, proc.stderr
    [said] = proc.stderr.splitlines()
    assert said.startswith("error FILE_UNAVAILABLE: cannot write to stdout: "), said
    assert (f"webhook endpoint {endpoint['id']} was added but its signing secret, never shown "
            f"again, was not printed; `mcpbill webhooks remove {endpoint['id']}` removes it"
            ) in said
    assert "whsec_" not in proc.stderr
    data(env, "webhooks", "remove", endpoint["id"])
    assert data(env, "webhooks", "list") == []


def test_a_webhook_secret_into_a_closed_pipe_is_named_on_stderr(env: dict[str, str]) -> None:
    """A reader gone before the secret: the run ends as a closed pipe does (status 0), and
    stderr names the endpoint to remove."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    proc = subprocess.run([MCPBILL, "webhooks", "add", "https://ops.example.com/hooks"],
                          stdout=write_end, stderr=subprocess.PIPE, text=True, env=env,
                          check=False, timeout=60)
    os.close(write_end)
    [endpoint] = data(env, "webhooks", "list")
    assert proc.returncode == 0, proc.stderr
    assert (f"stdout was closed: webhook endpoint {endpoint['id']} was added but its signing "
            "secret") in proc.stderr
    assert "whsec_" not in proc.stderr


@pytest.mark.parametrize(("args", "code"), [
    (("revoke", "--tenant", "default"), "CONFIRMATION_REQUIRED"),
    (("init", "--force"), "CONFIRMATION_REQUIRED"),
    (("wallet", "create"), "NO_TERMINAL"),
    (("token", "inspect"), "USAGE_ERROR"),
], ids=lambda value: " ".join(value) if isinstance(value, tuple) else value)
def test_a_closed_stdin_is_no_terminal_as_dev_null_is(env: dict[str, str], isolated_home: Path,
                                                      args: tuple[str, ...], code: str) -> None:
    """`revoke --tenant default <&-` was INTERNAL_ERROR (None has no isatty) where README says
    25 and `</dev/null` gave it; nothing may change either way."""
    data(env, "token", "issue", "--limit", "1")
    before = tree_snapshot(isolated_home), data(env, "token", "list")
    closed = sh(env, *args, "--json", redirect="<&-")
    null = sh(env, *args, "--json", redirect="</dev/null")
    assert closed.returncode == EXIT_CODES[code], closed
    assert (closed.returncode, closed.stdout) == (null.returncode, null.stdout)
    assert [e["code"] for e in json.loads(closed.stdout)["errors"]] == [code]
    assert (tree_snapshot(isolated_home), data(env, "token", "list")) == before
    assert not (isolated_home / "keys" / "wallet.json").exists()


def test_the_questions_take_a_missing_stdin_for_no_terminal(monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """Outside the entry point (which stands /dev/null in), stdin may still be None."""
    from mcpbill_cli.cli.confirm import confirm
    from mcpbill_cli.cli.prompts import secret
    from mcpbill_cli.errors import ConfirmationRequired, NoTerminal

    monkeypatch.setattr(sys, "stdin", None)
    with pytest.raises(ConfirmationRequired, match="pass --yes"):
        confirm("Drop the ledger", yes=False)
    with pytest.raises(NoTerminal, match="MCPBILL_KEYSTORE_PASSWORD"):
        secret("MCPBILL_KEYSTORE_PASSWORD", "keystore password")


@pytest.mark.parametrize(("encoding", "cafe"), [
    ({"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}, b"caf\\xe9"),
    ({"PYTHONIOENCODING": "latin-1"}, "café".encode("latin-1")),
], ids=["C locale", "latin-1"])
@pytest.mark.parametrize("output", ["table", "csv"])
def test_a_name_the_terminal_cannot_show_is_escaped(env: dict[str, str],
                                                    encoding: dict[str, str], cafe: bytes,
                                                    output: str) -> None:
    """`LC_ALL=C mcpbill tenant list` with a tenant named café was INTERNAL_ERROR
    (UnicodeEncodeError), nothing listed."""
    for tenant in ("café", "東京"):
        data(env, "wallet", "fund", "--demo", "1", "--tenant", tenant)
    environ = {name: value for name, value in env.items()
               if not name.startswith(("LC_", "LANG", "PYTHONIOENCODING", "PYTHONUTF8"))}
    proc = subprocess.run([MCPBILL, "tenant", "list", "--output", output],
                          env={**environ, **encoding}, capture_output=True, check=False,
                          timeout=60)
    assert (proc.returncode, proc.stderr) == (0, b""), proc.stderr
    separator = b"\t" if output == "table" else b","
    tenants = [line.split(separator)[0] for line in proc.stdout.splitlines()[1:]]
    assert sorted(tenants) == sorted([b"default", cafe, b"\\u6771\\u4eac"])


def at_the_password_prompt(environ: dict[str, str], keys: bytes, *args: str
                           ) -> tuple[int, str, str]:
    """``mcpbill ARGS`` with stdin and stderr on a terminal of its own (its controlling terminal,
    where getpass asks) and stdout a pipe; ``keys`` are typed at the first password prompt.
    Its exit status, its stdout and what the terminal showed."""
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(["setsid", "-w", "-c", MCPBILL, *args], stdin=secondary,
                            stdout=subprocess.PIPE, stderr=secondary, env=environ, text=True,
                            close_fds=True)
    os.close(secondary)
    try:
        screen = read_screen(primary, until=b"password: ")
        os.write(primary, keys)
        stdout, _ = proc.communicate(timeout=60)
        return proc.returncode, stdout, (screen + read_screen(primary)).decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(primary)


def read_screen(fd: int, until: bytes | None = None, timeout: float = 60) -> bytes:
    screen, deadline = b"", time.monotonic() + timeout
    while until is None or until not in screen:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise TimeoutError(f"the terminal showed {screen!r}")
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        screen += chunk
    return screen


@pytest.mark.parametrize(("keys", "how"), [(b"\x03", "Ctrl-C"), (b"\x04", "Ctrl-D")])
def test_stopping_at_the_password_prompt_is_interrupted_in_one_document(
        env: dict[str, str], isolated_home: Path, keys: bytes, how: str) -> None:
    """`wallet create --json`: Ctrl-C or Ctrl-D at the prompt exited 1 with nothing on stdout."""
    status, stdout, screen = at_the_password_prompt(env, keys, "wallet", "create", "--json")
    assert status == 130, screen  # as a shell's, for a run stopped by Ctrl-C
    [error] = json.loads(stdout)["errors"]
    assert error == {"code": "INTERRUPTED", "variable": "MCPBILL_KEYSTORE_PASSWORD",
                     "message": f"stopped at the keystore password prompt ({how}): set "
                                "MCPBILL_KEYSTORE_PASSWORD to give it without a prompt"}
    assert "Aborted" not in screen and "Traceback" not in screen
    assert not (isolated_home / "keys" / "wallet.json").exists()


def test_ctrl_c_at_the_password_prompt_is_told_on_the_terminal(env: dict[str, str]) -> None:
    status, stdout, screen = at_the_password_prompt(env, b"\x03", "wallet", "create")
    assert (status, stdout) == (130, ""), screen
    shown = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", screen).split())  # no styles, no wrapping
    assert ("error INTERRUPTED: stopped at the keystore password prompt (Ctrl-C): set "
            "MCPBILL_KEYSTORE_PASSWORD to give it without a prompt") in shown
    assert "Aborted" not in shown


def test_ctrl_c_while_the_talk_waits_leaves_the_token_printed(env: dict[str, str]) -> None:
    """The tester's sigint_after_commit.py: stderr a pipe whose reader is slow (full), so the
    talk after the commit waits; Ctrl-C then. The token came after the talk, so it was
    allotted and never printed, and the run exited 130 without a word."""
    before = {t["jti"] for t in data(env, "token", "list")}
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    with suppress(BlockingIOError):
        while True:
            os.write(write_end, b"x" * 4096)
    os.set_blocking(write_end, True)
    with subprocess.Popen([MCPBILL, "token", "issue", "--limit", "0.25"], env=env, text=True,
                          stdout=subprocess.PIPE, stderr=write_end) as proc:
        os.close(write_end)
        assert proc.stdout is not None
        select.select([proc.stdout], [], [], 10)  # the token, then the talk waits
        proc.send_signal(signal.SIGINT)
        with os.fdopen(read_end, "rb") as stderr:
            said = stderr.read().lstrip(b"x").decode()
        token = proc.stdout.read().strip()
        assert proc.wait(timeout=60) == 130, said
    [issued] = new_tokens(env, before)
    inspected = subprocess.run([MCPBILL, "token", "inspect", "-", "--json"], input=token,
                               capture_output=True, text=True, env=env, check=True, timeout=60)
    assert json.loads(inspected.stdout)["data"]["jti"] == issued["jti"]
    assert "error INTERRUPTED: interrupted (Ctrl-C)" in said

"""Output as terminals and pipes meet it: `mcpbill` run as a process, through a pipe and in a
pseudo-terminal of 80 and 120 columns."""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.cli.conftest import Invoke

MCPBILL = str(Path(sys.executable).with_name("mcpbill"))
BOX = re.compile("[─━│┃┏┓┗┛┡┩╇┳┻╋┼]")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture
def env(isolated_home: Path) -> dict[str, str]:
    """A demo home with funds and three tokens; the environment a terminal would give."""
    environ = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR")}
    for args in (["init", "--mode", "demo"], ["wallet", "fund", "--demo", "100"],
                 *[["token", "issue", "--limit", "1", "--agent", f"agent-{n}"] for n in range(3)]):
        run(environ, *args)
    return environ


def run(environ: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([MCPBILL, *args], capture_output=True, text=True, env=environ,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    return proc


def data(environ: dict[str, str], *args: str) -> Any:
    return json.loads(run(environ, *args, "--json").stdout)["data"]


def in_pty(environ: dict[str, str], columns: int, *args: str) -> tuple[int, str]:
    """Run mcpbill on a pseudo-terminal ``columns`` wide: its exit status and what it showed."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: stdout and stderr are the terminal
        os.execve(MCPBILL, [MCPBILL, *args], environ)  # noqa: S606 - the program under test
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    chunks: list[bytes] = []
    drain(fd, chunks)
    os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), ANSI.sub("", b"".join(chunks).decode())


def test_a_listing_in_a_pipe_is_tab_separated_lines_with_whole_ids(env: dict[str, str]) -> None:
    jtis = [t["jti"] for t in data(env, "token", "list")]
    shown = run(env, "token", "list").stdout
    assert not BOX.search(shown), shown
    rows = [line.split("\t") for line in shown.splitlines()]
    assert rows[0] == ["jti", "tenant", "agent", "status", "limit", "spent", "remaining",
                       "expires"]
    assert sorted(row[0] for row in rows[1:]) == sorted(jtis)
    kid = data(env, "keys", "list")[0]["kid"]
    assert [line.split("\t")[0] for line in run(env, "keys", "list").stdout.splitlines()] == [
        "kid", kid]


def csv_text(value: Any) -> str:
    """A JSON value as `--output csv` writes it."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, dict | list) else str(value)


@pytest.mark.parametrize(("command", "records"), [
    (("token", "list"), lambda d: d),
    (("keys", "list"), lambda d: d),
    (("wallet", "balance"), lambda d: [d]),
    (("tenant", "list"), lambda d: d),
    (("pricing", "show"), lambda d: d["tools"]),
])
def test_csv_has_a_header_and_the_json_fields(env: dict[str, str], command: tuple[str, ...],
                                              records: Any) -> None:
    expected = records(data(env, *command))
    proc = subprocess.run([MCPBILL, *command, "--output", "csv"], capture_output=True, env=env,
                          check=True)
    text = proc.stdout.decode()
    assert text.endswith("\r\n")  # RFC 4180 line ends
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    fields = list(dict.fromkeys(name for record in expected for name in record))
    assert rows == [{k: csv_text(record.get(k)) for k in fields} for record in expected]


def test_output_json_is_the_json_envelope(env: dict[str, str]) -> None:
    by_option = json.loads(run(env, "token", "list", "-o", "json").stdout)
    assert by_option == json.loads(run(env, "token", "list", "--json").stdout)
    assert by_option["status"] == "ok" and len(by_option["data"]) == 3


@pytest.mark.parametrize("columns", [80, 120])
def test_a_terminal_shows_every_id_whole(env: dict[str, str], columns: int) -> None:
    jtis = [t["jti"] for t in data(env, "token", "list")]
    status, shown = in_pty(env, columns, "token", "list")
    assert status == 0, shown
    lines = shown.splitlines()
    assert all(any(jti in line for line in lines) for jti in jtis), shown
    assert max(len(line) for line in lines) <= columns, shown
    assert bool(BOX.search(shown)) == (columns == 120), shown  # too narrow: field per line


def test_a_terminal_with_columns_0_still_shows_results_and_errors(env: dict[str, str]) -> None:
    """COLUMNS=0 (a broken shell profile) made Rich print nothing: a fund done in silence."""
    zero = {**env, "COLUMNS": "0"}
    status, shown = in_pty(zero, 80, "wallet", "fund", "--demo", "1")
    assert status == 0 and "funded default with 1.00 USDC" in shown, shown
    status, shown = in_pty(zero, 80, "token", "issue", "--limit", "999999")
    assert status == 5 and "INSUFFICIENT_FUNDS" in shown, shown


def test_head_1_ends_a_listing_quietly(env: dict[str, str], cli: Invoke) -> None:
    for n in range(250):  # more lines than a pipe buffers: head leaves before the last
        assert cli("token", "issue", "--limit", "0.01", "--agent", f"bulk-{n}").exit_code == 0
    for command in (["events", "export"], ["token", "list"]):
        with subprocess.Popen([MCPBILL, *command], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env) as producer:
            assert producer.stdout is not None and producer.stderr is not None
            head = subprocess.run(["head", "-1"], stdin=producer.stdout, capture_output=True,
                                  check=True)
            producer.stdout.close()  # only head reads it now
            assert producer.wait() == 0
            assert producer.stderr.read() == b""
        assert len(head.stdout.splitlines()) == 1


def test_a_closed_pipe_exits_0_without_a_word(env: dict[str, str]) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line
    proc = subprocess.run([MCPBILL, "events", "export"], stdout=write_end, capture_output=False,
                          stderr=subprocess.PIPE, env=env, check=False)
    os.close(write_end)
    assert (proc.returncode, proc.stderr) == (0, b"")


@pytest.mark.parametrize("as_json", [False, True])
def test_a_token_issued_into_a_closed_pipe_is_named_on_stderr(env: dict[str, str],
                                                              as_json: bool) -> None:
    """The credit token cannot be printed again: stderr names it, so it can be revoked."""
    before = {t["jti"] for t in data(env, "token", "list")}
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the token is printed
    proc = subprocess.run([MCPBILL, "token", "issue", "--limit", "0.25",
                           *(["--json"] if as_json else [])], stdout=write_end,
                          stderr=subprocess.PIPE, text=True, env=env, check=False)
    os.close(write_end)
    [issued] = [t for t in data(env, "token", "list") if t["jti"] not in before]
    assert proc.returncode == 0
    assert f"token {issued['jti']} was issued but not printed" in proc.stderr
    assert "eyJ" not in proc.stderr  # the credential itself is never on stderr
    revoked = json.loads(run(env, "revoke", issued["jti"], "--json").stdout)
    assert revoked["status"] == "ok"
    assert {t["jti"]: t["status"] for t in data(env, "token", "list")}[issued["jti"]] == (
        "revoked")


def test_help_through_head_1_exits_quietly(isolated_home: Path) -> None:
    """Rich, which prints the help, ends a run on a broken pipe with exit 1 of its own."""
    with subprocess.Popen([MCPBILL, "--help"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as producer:
        assert producer.stdout is not None and producer.stderr is not None
        producer.stdout.close()  # the reader is gone before the first line
        assert (producer.wait(), producer.stderr.read()) == (0, b"")


def test_a_usage_error_in_a_pipe_is_plain_lines(isolated_home: Path) -> None:
    option = "--no-such-option-" + "x" * 120
    proc = subprocess.run([MCPBILL, "token", "list", option], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "80"}, check=False)
    assert proc.returncode == 2
    assert not BOX.search(proc.stderr), proc.stderr
    assert f"Error: No such option: {option}" in proc.stderr.splitlines()


def test_an_error_in_a_pipe_is_one_line(env: dict[str, str]) -> None:
    jti = "tok_" + "x" * 150
    proc = subprocess.run([MCPBILL, "token", "show", jti], capture_output=True, text=True,
                          env={**env, "COLUMNS": "80"}, check=False)
    assert proc.returncode == 4
    assert len(proc.stderr.splitlines()) == 1 and jti in proc.stderr


@pytest.mark.parametrize("as_json", [False, True])
def test_wallet_sync_on_a_terminal_ends_in_a_coded_error(env: dict[str, str],
                                                        as_json: bool) -> None:
    run(env, "wallet", "address", "--set", "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913")
    args = ["wallet", "sync", "--rpc-url", "http://127.0.0.1:9", "--from-block", "0"]
    status, shown = in_pty(env, 100, *args, *(["--json"] if as_json else []))
    assert status == 17, shown  # RPC_UNAVAILABLE: nothing listens on port 9
    assert "RPC_UNAVAILABLE" in shown and "Traceback" not in shown


@pytest.mark.parametrize("spelling", [["--output", "json"], ["-o", "json"], ["--output=json"]])
def test_output_json_makes_a_usage_error_one_document(isolated_home: Path,
                                                      spelling: list[str]) -> None:
    proc = subprocess.run([MCPBILL, "token", "list", *spelling, "--bogus"], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 2
    assert [e["code"] for e in json.loads(proc.stdout)["errors"]] == ["USAGE_ERROR"]


def test_json_and_another_output_conflict(ledger_cli: Invoke) -> None:
    result = ledger_cli("keys", "list", "--json", "--output", "csv")
    assert result.exit_code == 3
    assert [e["code"] for e in json.loads(result.stdout)["errors"]] == ["INVALID_INPUT"]


def stderr_on_a_terminal(environ: dict[str, str], *args: str) -> tuple[int, str, str]:
    """Run mcpbill with stdout to a pipe and stderr on a pseudo-terminal 100 columns wide."""
    primary, secondary = os.openpty()
    fcntl.ioctl(primary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    shown: list[bytes] = []
    reader = threading.Thread(target=drain, args=(primary, shown))  # the terminal never fills
    reader.start()
    proc = subprocess.run([MCPBILL, *args], stdout=subprocess.PIPE, stderr=secondary,
                          env=environ, check=False)
    os.close(secondary)
    reader.join()
    os.close(primary)
    return proc.returncode, proc.stdout.decode(), ANSI.sub("", b"".join(shown).decode())


def drain(fd: int, into: list[bytes]) -> None:
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: every writer closed the terminal
            return
        if not chunk:
            return
        into.append(chunk)


@pytest.mark.parametrize("command", [["events", "export"], ["reconcile", "--output", "csv"],
                                     ["reconcile", "--json"]])
def test_a_progress_bar_on_the_terminal_leaves_stdout_data(env: dict[str, str],
                                                           command: list[str]) -> None:
    status, stdout, shown = stderr_on_a_terminal(env, *command)
    assert status == 0, shown
    assert "Traceback" not in shown
    if command == ["events", "export"]:
        events = [json.loads(line) for line in stdout.splitlines()]
        assert [e["id"] for e in events] == sorted(e["id"] for e in events) and events
    elif "--json" in command:
        assert json.loads(stdout)["status"] == "ok"
        assert "reconciling" not in shown  # no bar under --json
    else:
        assert next(csv.reader(io.StringIO(stdout)))[:2] == ["dimension", "key"]

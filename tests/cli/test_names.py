"""Names: a blank one is refused everywhere a name is taken, and a tenant the ledger never
funded is NOT_FOUND (exit 4) in every command that addresses one tenant."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import Result

from tests.cli.conftest import Invoke, error_json, ok_json, tree_snapshot
from tests.cli.test_bad_input import ledger_snapshot

# Each command line with "{}" where a name goes.
TAKES_A_NAME = [
    ("wallet", "fund", "--tenant", "{}", "--demo", "1"),
    ("wallet", "balance", "--tenant", "{}"),
    ("token", "issue", "--limit", "1", "--tenant", "{}"),
    ("token", "issue", "--limit", "1", "--agent", "{}"),
    ("token", "issue", "--limit", "1", "--scope", "{}"),
    ("token", "issue", "--limit", "1", "--parent", "{}"),
    ("token", "list", "--tenant", "{}"),
    ("token", "list", "--agent", "{}"),
    ("token", "show", "{}"),
    ("revoke", "{}"),
    ("revoke", "--tenant", "{}", "--yes"),
    ("revoke", "--agent", "{}", "--yes"),
    ("reconcile", "--tenant", "{}"),
    ("reconcile", "--tool", "{}"),
    ("receipt", "show", "{}"),
    ("receipt", "show", "some-key", "--tenant", "{}"),
    ("pricing", "set", "{}", "0.1"),
    ("pricing", "set", "search", "0.1", "--tenant", "{}"),
    ("pricing", "unset", "{}"),
    ("pricing", "quote", "{}"),
    ("keys", "retire", "{}"),
]


@pytest.fixture
def funded(ledger_cli: Invoke) -> Invoke:
    ok_json(ledger_cli("wallet", "fund", "--tenant", "acme", "--demo", "5", "--json"))
    ok_json(ledger_cli("token", "issue", "--tenant", "acme", "--limit", "1", "--json"))
    return ledger_cli


def test_a_blank_name_is_refused_everywhere(funded: Invoke, isolated_home: Path,
                                            db_url: str) -> None:
    files, ledger = tree_snapshot(isolated_home), ledger_snapshot(db_url)
    for args in TAKES_A_NAME:
        for blank in ("", "   "):
            result = funded(*(a.format(blank) for a in args), "--json")
            assert result.exit_code == 3, (args, result.output)
            assert "empty" in error_json(result, "INVALID_INPUT")["message"]
    as_text = funded("wallet", "fund", "--tenant", "", "--demo", "1")
    assert as_text.exit_code == 3 and "tenant given is empty" in as_text.stderr
    assert tree_snapshot(isolated_home) == files and ledger_snapshot(db_url) == ledger
    assert [t["tenant"] for t in ok_json(funded("tenant", "list", "--json"))] == ["acme"]


@pytest.mark.parametrize("args", [
    ("wallet", "balance", "--tenant", "nobody"),
    ("token", "issue", "--limit", "1", "--tenant", "nobody"),
    ("token", "list", "--tenant", "nobody"),
    ("revoke", "--tenant", "nobody", "--yes"),
    ("reconcile", "--tenant", "nobody"),
])
def test_an_unknown_tenant_is_not_found_in_every_command(
        funded: Invoke, isolated_home: Path, db_url: str, args: tuple[str, ...]) -> None:
    files, ledger = tree_snapshot(isolated_home), ledger_snapshot(db_url)
    result = funded(*args, "--json")
    assert result.exit_code == 4, result.output
    error = error_json(result, "NOT_FOUND")
    assert error["tenant"] == "nobody" and "wallet fund" in error["message"]
    assert tree_snapshot(isolated_home) == files and ledger_snapshot(db_url) == ledger


def test_a_known_tenant_still_works(funded: Invoke) -> None:
    assert len(ok_json(funded("token", "list", "--tenant", "acme", "--json"))) == 1
    assert ok_json(funded("reconcile", "--tenant", "acme", "--json"))["errors"] == 0
    assert len(ok_json(funded("revoke", "--tenant", "acme", "--yes", "--json"))["revoked"]) == 1


# --- what a tenant or agent name may be (mcpbill_cli/names.py) ------------------------------

# Each command line that takes a tenant or agent, with "{}" where it goes.
TAKES_A_TENANT = [
    ("wallet", "fund", "--tenant", "{}", "--demo", "1"),
    ("wallet", "balance", "--tenant", "{}"),
    ("wallet", "link", "--tenant", "{}", "--address", "0x" + "ab" * 20),
    ("token", "issue", "--limit", "1", "--tenant", "{}"),
    ("token", "list", "--tenant", "{}"),
    ("revoke", "--tenant", "{}", "--yes"),
    ("reconcile", "--tenant", "{}"),
    ("receipt", "show", "some-key", "--tenant", "{}"),
    ("pricing", "show", "--tenant", "{}"),
    ("pricing", "set", "search", "0.1", "--tenant", "{}"),
    ("webhooks", "balance-alert", "{}", "--below", "1"),
]
TAKES_AN_AGENT = [
    ("token", "issue", "--limit", "1", "--agent", "{}"),
    ("token", "list", "--agent", "{}"),
    ("revoke", "--agent", "{}", "--yes"),
    ("reconcile", "--agent", "{}"),
]
# Not names: outer spaces (a second "acme" that lists alike), a terminal escape that sets the
# window title, a newline and a tab (two names that list alike), DEL, a no-break space, and
# the lone surrogate Python makes of a byte that is not UTF-8 (`--tenant $'\xff'`).
NOT_NAMES = ["acme ", " acme", "x\x1b]0;pwned\x07y", "a\nb", "a\tb", "a\x7fb", "acme\xa0",
             "caf\udce9"]


def _refused(result: Result, field: str) -> str:
    """The message of an INVALID_INPUT about ``field`` (exit 3), checked to quote no control
    character or surrogate raw."""
    assert result.exit_code == 3, result.output
    error = error_json(result, "INVALID_INPUT")
    assert error["field"] == field, error
    assert error["message"].isprintable(), error
    return str(error["message"])


def test_a_tenant_or_agent_that_is_not_a_name_is_refused_everywhere(
        funded: Invoke, isolated_home: Path, db_url: str) -> None:
    files, ledger = tree_snapshot(isolated_home), ledger_snapshot(db_url)
    for field, lines in (("tenant", TAKES_A_TENANT), ("agent", TAKES_AN_AGENT)):
        for args in lines:
            for bad in NOT_NAMES:
                result = funded(*(a.format(bad) for a in args), "--json")
                assert "printable text without outer spaces" in _refused(result, field), args
    assert tree_snapshot(isolated_home) == files and ledger_snapshot(db_url) == ledger
    assert [t["tenant"] for t in ok_json(funded("tenant", "list", "--json"))] == ["acme"]


def test_outer_spaces_do_not_make_a_second_tenant(funded: Invoke) -> None:
    refused = funded("wallet", "fund", "--demo", "2", "--tenant", "acme ")
    assert refused.exit_code == 3, refused.output
    assert "error INVALID_INPUT: tenant name 'acme ' must be" in refused.stderr
    assert [t["tenant"] for t in ok_json(funded("tenant", "list", "--json"))] == ["acme"]


def test_a_terminal_escape_in_a_tenant_never_reaches_the_terminal(funded: Invoke) -> None:
    refused = funded("wallet", "fund", "--demo", "1", "--tenant", "x\x1b]0;pwned\x07y")
    assert refused.exit_code == 3, refused.output
    assert "\x1b" not in refused.stderr and r"'x\x1b]0;pwned\x07y'" in refused.stderr
    listed = funded("tenant", "list")
    assert listed.exit_code == 0 and "\x1b" not in listed.stdout


@pytest.mark.parametrize(("field", "args", "longest"), [
    ("tenant", ("wallet", "fund", "--demo", "1", "--tenant", "{}"), 100),
    ("agent", ("token", "issue", "--tenant", "acme", "--limit", "0.1", "--agent", "{}"), 200),
])
def test_a_name_longer_than_its_column_is_refused_on_every_backend(
        funded: Invoke, isolated_home: Path, db_url: str, field: str, args: tuple[str, ...],
        longest: int) -> None:
    files, ledger = tree_snapshot(isolated_home), ledger_snapshot(db_url)
    too_long = funded(*(a.format("t" * (longest + 1)) for a in args), "--json")
    assert f"longer than {longest} characters" in _refused(too_long, field)
    listed = funded("token", "list", f"--{field}", "t" * (longest + 1), "--json")
    assert f"longer than {longest} characters" in _refused(listed, field)
    assert tree_snapshot(isolated_home) == files and ledger_snapshot(db_url) == ledger
    assert ok_json(funded(*(a.format("t" * longest) for a in args), "--json"))[field] == (
        "t" * longest)


def test_bytes_that_are_not_utf8_are_invalid_input_not_a_crash(
        funded: Invoke, db_url: str) -> None:
    """The real program, given the bytes: `--tenant $'\\xff'`, `--agent $'caf\\xe9'`."""
    env = {**os.environ, "MCPBILL_DB_URL": db_url}
    for args in ([b"wallet", b"fund", b"--demo", b"1", b"--tenant", b"\xff"],
                 [b"token", b"list", b"--agent", b"caf\xe9"]):
        proc = subprocess.run([sys.executable, "-m", "mcpbill_cli", *args, "--json"],
                              capture_output=True, env=env, check=False)
        assert proc.returncode == 3, proc.stdout + proc.stderr
        [error] = json.loads(proc.stdout)["errors"]
        assert error["code"] == "INVALID_INPUT" and error["field"] in ("tenant", "agent")


@pytest.mark.parametrize("audience", ["", " ", " mcpbill", "mcpbill ", "a\x1bb", "a" * 201])
def test_token_issue_refuses_an_audience_that_is_not_a_name(
        funded: Invoke, isolated_home: Path, db_url: str, audience: str) -> None:
    files, ledger = tree_snapshot(isolated_home), ledger_snapshot(db_url)
    _refused(funded("token", "issue", "--limit", "1", "--audience", audience, "--json"),
             "audience")
    assert tree_snapshot(isolated_home) == files and ledger_snapshot(db_url) == ledger


@pytest.mark.parametrize("issuer", [" ", " mcpbill", "mcp\tbill"])
def test_no_token_is_signed_with_an_issuer_that_is_not_a_name(
        funded: Invoke, isolated_home: Path, db_url: str, issuer: str) -> None:
    jti = ok_json(funded("token", "issue", "--tenant", "acme", "--limit", "1", "--ttl", "1h",
                         "--json"))["jti"]
    files, ledger = tree_snapshot(isolated_home), ledger_snapshot(db_url)
    env = {"MCPBILL_ISSUER": issuer}
    _refused(funded("token", "issue", "--tenant", "acme", "--limit", "1", "--json", env=env),
             "issuer")
    _refused(funded("token", "extend", jti, "--ttl", "2h", "--json", env=env), "issuer")
    assert tree_snapshot(isolated_home) == files and ledger_snapshot(db_url) == ledger


def test_names_that_are_names_still_work(funded: Invoke) -> None:
    for tenant in ("o'brien & co", "acme/eu", "Zürich 🏔", "t" * 100):
        assert ok_json(funded("wallet", "fund", "--tenant", tenant, "--demo", "1", "--json"))
        issued = ok_json(funded("token", "issue", "--tenant", tenant, "--limit", "0.5",
                                "--agent", f"{tenant} bot", "--audience", "https://x.test/mcp",
                                "--json"))
        assert (issued["tenant"], issued["agent"]) == (tenant, f"{tenant} bot")
        assert len(ok_json(funded("token", "list", "--agent", f"{tenant} bot", "--json"))) == 1



def test_a_name_kept_before_names_were_checked_lists_as_data_not_terminal_codes(
        funded: Invoke, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ledger older than the name rule may hold a tenant or agent with a terminal escape in
    it: listings in a terminal and in a pipe show it escaped, never raw."""
    from mcpbill_cli import names
    from mcpbill_cli.ledger import credit
    from tests.cli.terminal import in_terminal, without_terminal

    raw = "ac\x1b]0;pwned\x07me"
    with monkeypatch.context() as old_rules:  # as an older mcpbill kept them
        for module in (names, credit):
            old_rules.setattr(module, "require_name", lambda name, what: name)
        ok_json(funded("wallet", "fund", "--tenant", raw, "--demo", "2", "--json"))
        ok_json(funded("token", "issue", "--tenant", raw, "--agent", raw, "--limit", "1",
                       "--json"))
    assert raw in [t["tenant"] for t in ok_json(funded("tenant", "list", "--json"))]

    for args in (("tenant", "list"), ("token", "list")):
        for run in (in_terminal, without_terminal):
            seen = run(*args)
            shown = seen.stdout + seen.stderr
            assert seen.returncode == 0, (args, run, shown)
            assert "pwned\x07" not in shown and "\x1b]0;" not in shown, (args, run, shown)
            assert "pwned\\x07me" in "".join(shown.split()), (args, run, shown)

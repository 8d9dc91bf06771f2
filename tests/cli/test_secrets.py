"""Secrets never printed: credit tokens quoted back and database passwords are redacted in
errors, in `config show` and under --json, whatever shape the URL has."""

from __future__ import annotations

import os

import pytest

from tests.cli.conftest import Invoke, error_json, ok_json

URLS = [  # (database URL, its secret)
    ("postgresql+psycopg://ops:s3cret-pw@127.0.0.1:1/ledger", "s3cret-pw"),
    ("postgresql+psycopg://ops:p%40ss%3Aw0rd@127.0.0.1:1/ledger", "w0rd"),
    ("postgresql+psycopg://ops@127.0.0.1:1/ledger?password=hunter2&sslmode=disable", "hunter2"),
]


def test_token_show_never_echoes_a_bearer_token(ledger_cli: Invoke) -> None:
    ok_json(ledger_cli("wallet", "fund", "--demo", "2", "--json"))
    token = ok_json(ledger_cli("token", "issue", "--limit", "1", "--json"))["token"]
    as_text = ledger_cli("token", "show", token)
    as_json = ledger_cli("token", "show", token, "--json")
    assert as_text.exit_code == as_json.exit_code == 4, as_text.output
    assert token not in as_text.output and token not in as_json.output
    assert token.split(".")[2] not in as_text.output + as_json.output
    assert "eyJhbGciOi…(redacted)" in error_json(as_json, "NOT_FOUND")["message"]
    assert "(redacted)" in as_text.stderr


@pytest.mark.parametrize(("url", "secret"), URLS)
def test_config_show_scrubs_every_shape_of_password(cli: Invoke, url: str, secret: str) -> None:
    shown = ok_json(cli("--db-url", url, "config", "show", "--json"))["db_url"]
    as_text = cli("--db-url", url, "config", "show")
    assert secret not in shown and secret not in as_text.output
    assert "***" in shown and shown.startswith("postgresql+psycopg://ops")


@pytest.mark.parametrize(("url", "secret"), URLS)
def test_an_unreachable_ledger_error_hides_every_shape_of_password(
        cli: Invoke, url: str, secret: str) -> None:
    as_json = cli("--db-url", url, "wallet", "balance", "--json")
    as_text = cli("--db-url", url, "wallet", "balance")
    assert as_json.exit_code == as_text.exit_code == 8, as_json.output
    error = error_json(as_json, "LEDGER_UNAVAILABLE")
    assert "127.0.0.1:1/ledger" in error["message"] and "***" in error["url"]
    assert secret not in as_json.output and secret not in as_text.output


def test_an_unparsable_url_with_a_raw_at_sign_keeps_the_password_out(cli: Invoke) -> None:
    url = "postgresql+psycopg://ops:p@ss:w0rd@127.0.0.1:1/ledger"
    result = cli("--db-url", url, "wallet", "balance", "--json")
    assert result.exit_code == 3, result.output
    message = error_json(result, "INVALID_INPUT")["message"]
    assert "w0rd" not in result.output and "p@ss" not in result.output
    assert "%40" in message


def test_a_usage_error_in_a_log_never_echoes_a_token(ledger_cli: Invoke) -> None:
    import subprocess
    import sys
    from pathlib import Path

    ok_json(ledger_cli("wallet", "fund", "--demo", "2", "--json"))
    token = ok_json(ledger_cli("token", "issue", "--limit", "1", "--json"))["token"]
    mcpbill = str(Path(sys.executable).parent / "mcpbill")
    for extra in ([], ["--json"]):
        proc = subprocess.run([mcpbill, "token", "show", "tok_x", token, *extra],
                              capture_output=True, text=True, check=False, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert token not in proc.stdout + proc.stderr
        shown = proc.stdout + proc.stderr
        assert "eyJhbGciOi" in shown and "(redacted)" in shown


def test_a_usage_error_on_a_terminal_never_echoes_a_token(ledger_cli: Invoke,
                                                           db_url: str) -> None:
    from tests.cli.terminal import in_terminal

    ok_json(ledger_cli("wallet", "fund", "--demo", "2", "--json"))
    token = ok_json(ledger_cli("token", "issue", "--limit", "1", "--json"))["token"]
    run = in_terminal("token", "show", "tok_x", token,
                      env={**os.environ, "MCPBILL_DB_URL": db_url, "COLUMNS": "400"})

    assert run.returncode == 2, run.stderr
    screen = "".join(run.stderr.split())  # the box may wrap the message; join its pieces
    assert token not in screen and token[:60] not in screen
    assert "eyJhbGciOi" in screen and "(redacted)" in screen

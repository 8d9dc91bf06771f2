"""Bad input: a clear message, a documented exit code, and nothing changed anywhere."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from mcpbill_cli.config import load_settings
from mcpbill_cli.ledger.engine import make_engine
from tests.cli.conftest import Invoke, error_json, ok_json, tree_snapshot

LEDGER_TABLES = ("accounts", "transfers", "tokens", "calls", "events")


def ledger_snapshot(db_url: str) -> dict[str, list[tuple[object, ...]]]:
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            return {t: sorted(map(tuple, conn.execute(text(f"SELECT * FROM {t}"))), key=repr)
                    for t in LEDGER_TABLES}
    finally:
        engine.dispose()


@pytest.fixture
def funded(ledger_cli: Invoke, isolated_home: Path, db_url: str) -> Iterator[Invoke]:
    """A home with 10 USDC funded and one 5 USDC token; asserts the refusal changed nothing."""
    ok_json(ledger_cli("wallet", "fund", "--demo", "10", "--json"))
    ok_json(ledger_cli("token", "issue", "--limit", "5", "--json"))
    files, ledger = tree_snapshot(isolated_home), ledger_snapshot(db_url)
    yield ledger_cli
    assert tree_snapshot(isolated_home) == files
    assert ledger_snapshot(db_url) == ledger


@pytest.mark.parametrize(("limit", "needle"), [
    ("0", "more than 0"), ("-1", "not an amount"), ("abc", "not an amount"),
    ("1.0000001", "more than 6 decimals"), ("1e3", "not an amount"),
])
def test_token_issue_refuses_a_bad_limit(funded: Invoke, limit: str, needle: str) -> None:
    result = funded("token", "issue", "--limit", limit)
    assert result.exit_code == 3, result.output
    assert needle in result.stderr and result.stdout == ""


def test_token_issue_refuses_a_limit_above_the_available_balance(funded: Invoke) -> None:
    result = funded("token", "issue", "--limit", "5.000001", "--json")
    assert result.exit_code == 5, result.output
    error = error_json(result, "INSUFFICIENT_FUNDS")
    assert error["available"] == "5.00" and "wallet fund" in error["message"]


@pytest.mark.parametrize(("ttl", "code"), [("0s", 3), ("-5m", 3), ("25h", 3), ("forever", 3),
                                           ("2d", 3), ("1.5h", 3)])
def test_token_issue_refuses_a_bad_ttl(funded: Invoke, ttl: str, code: int) -> None:
    result = funded("token", "issue", "--limit", "1", "--ttl", ttl, "--json")
    assert result.exit_code == code, result.output
    assert "ttl" in error_json(result, "INVALID_INPUT")["message"]


def test_revoking_an_unknown_jti_revokes_nothing(funded: Invoke) -> None:
    jti = ok_json(funded("token", "list", "--json"))[0]["jti"]
    result = funded("revoke", jti, "tok_does_not_exist", "--json")
    assert result.exit_code == 4, result.output
    assert "tok_does_not_exist" in error_json(result, "NOT_FOUND")["message"]


@pytest.mark.parametrize("command", ["inspect", "revoke"])
@pytest.mark.parametrize("token", [
    "not-a-jwt.at.all",
    "eyJhbGciOiJFZERTQSIsImtpZCI6Im5vcGUiLCJ0eXAiOiJKV1QifQ.e30.c2ln",
])
def test_malformed_or_foreign_jwt_is_refused(funded: Invoke, command: str, token: str) -> None:
    args = ["token", "inspect", token] if command == "inspect" else ["revoke", token]
    result = funded(*args, "--json")
    assert result.exit_code == 6, result.output
    assert error_json(result, "INVALID_CREDIT_TOKEN")["reason"] in ("malformed", "unknown_key")


def test_a_token_signed_by_a_foreign_key_is_refused(funded: Invoke, tmp_path: Path) -> None:
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from mcpbill_cli.keys import KeyRing

    kid = KeyRing.load(load_settings().keys_dir).active().kid
    forged = jwt.encode({"jti": "tok_x", "sub": "a"}, ed25519.Ed25519PrivateKey.generate(),
                        algorithm="EdDSA", headers={"kid": kid})
    for args in (["token", "inspect", forged], ["revoke", forged]):
        result = funded(*args, "--json")
        assert result.exit_code == 6, result.output
        assert error_json(result, "INVALID_CREDIT_TOKEN")["reason"] == "bad_signature"


def test_init_over_an_existing_home_without_force(funded: Invoke) -> None:
    result = funded("init", "--json")
    assert result.exit_code == 7, result.output
    assert "--force" in error_json(result, "ALREADY_EXISTS")["message"]


def test_unreachable_ledger_names_the_url_without_its_password(cli: Invoke) -> None:
    url = "postgresql+psycopg://ops:s3cret-pw@127.0.0.1:1/ledger"
    result = cli("--db-url", url, "wallet", "balance", "--json")
    assert result.exit_code == 8, result.output
    message = error_json(result, "LEDGER_UNAVAILABLE")["message"]
    assert "ops:***@127.0.0.1:1/ledger" in message and "s3cret" not in result.output


def test_demo_funding_is_refused_in_live_mode(cli: Invoke, db_url: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCPBILL_DB_URL", db_url)
    assert cli("init", "--mode", "live").exit_code == 0
    result = cli("wallet", "fund", "--demo", "10", "--json")
    assert result.exit_code == 11, result.output
    error_json(result, "DEMO_ONLY")
    assert ledger_snapshot(db_url)["transfers"] == []


def test_usage_errors_are_one_json_document_too(tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "mcpbill_cli", "token", "issue", "--json"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    document = json.loads(proc.stdout)
    assert document["status"] == "error" and document["errors"][0]["code"] == "USAGE_ERROR"
    assert "--limit" in document["errors"][0]["message"]

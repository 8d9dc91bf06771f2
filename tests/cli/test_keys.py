"""Signing keys: modes, rotation, JWKS export, retirement; private keys never printed."""

from __future__ import annotations

import json
import stat
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from mcpbill_cli.keys import KeyRing, keys_from_jwks
from mcpbill_cli.tokens import decode_token
from tests.cli.conftest import Invoke, ok_json


def private_key_texts(keys_dir: Path) -> list[str]:
    return [p.read_bytes().decode("latin-1") for p in keys_dir.iterdir()
            if p.suffix in (".pem", ".secret")]


def test_private_keys_are_0600_in_a_0700_dir_and_never_printed(
        ledger_cli: Invoke, isolated_home: Path) -> None:
    keys_dir = isolated_home / "keys"
    assert stat.S_IMODE(keys_dir.stat().st_mode) == 0o700
    files = [p for p in keys_dir.iterdir() if p.suffix in (".pem", ".secret")]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
    outputs = [ledger_cli(*args) for args in (
        ("keys", "list", "--json"), ("keys", "export-jwks"), ("config", "show", "--json"),
        ("keys", "rotate", "--json"))]
    secrets = private_key_texts(keys_dir)
    body_lines = [line for s in secrets for line in s.splitlines() if "-----" not in line]
    for result in outputs:
        assert result.exit_code == 0, result.output
        assert not any(line in result.output for line in body_lines if line)
        assert "PRIVATE KEY" not in result.output and '"d"' not in result.output


def test_rotation_keeps_old_tokens_verifying_until_their_last_expiry(
        ledger_cli: Invoke, isolated_home: Path) -> None:
    cli = ledger_cli
    ok_json(cli("wallet", "fund", "--demo", "2", "--json"))
    old = ok_json(cli("token", "issue", "--limit", "1", "--ttl", "2h", "--json"))
    rotated = ok_json(cli("keys", "rotate", "--json"))
    assert rotated["previous"]["kid"] == old["kid"]
    assert rotated["previous"]["status"] == "verifying"
    leeway = timedelta(seconds=30)  # verifiers accept a token this long past its exp
    assert datetime.fromisoformat(rotated["previous"]["verify_until"]) == (
        datetime.fromisoformat(old["expires_at"]) + leeway)
    new = ok_json(cli("token", "issue", "--limit", "1", "--json"))
    assert new["kid"] == rotated["active"]["kid"] != old["kid"]

    jwks = json.loads(cli("keys", "export-jwks").stdout)
    assert sorted(k["kid"] for k in jwks["keys"]) == sorted([old["kid"], new["kid"]])
    keys = keys_from_jwks(jwks)
    for issued in (old, new):
        claims = decode_token(issued["token"], keys, audience="mcpbill", issuer="mcpbill")
        assert claims.jti == issued["jti"]

    refused = cli("keys", "retire", old["kid"], "--json")
    assert refused.exit_code == 3 and "unexpired" in refused.stdout
    assert cli("keys", "retire", new["kid"]).exit_code == 3  # the active key: rotate first
    ok_json(cli("keys", "retire", old["kid"], "--force", "--yes", "--json"))
    assert cli("token", "inspect", old["token"]).exit_code == 6
    assert ok_json(cli("token", "inspect", new["token"], "--json"))["valid"] is True


@pytest.mark.parametrize("alg", ["ES256", "HS256"])
def test_other_algorithms_sign_and_verify(cli: Invoke, db_url: str, alg: str,
                                          monkeypatch: pytest.MonkeyPatch,
                                          isolated_home: Path) -> None:
    monkeypatch.setenv("MCPBILL_DB_URL", db_url)
    ok_json(cli("init", "--alg", alg, "--json"))
    ok_json(cli("wallet", "fund", "--demo", "1", "--json"))
    issued = ok_json(cli("token", "issue", "--limit", "1", "--json"))
    assert ok_json(cli("token", "inspect", issued["token"], "--json"))["kid"] == issued["kid"]
    jwks = ok_json(cli("keys", "export-jwks", "--json"))
    assert [k["alg"] for k in jwks["keys"]] == ([] if alg == "HS256" else ["ES256"])
    if alg == "HS256":
        secret = (isolated_home / "keys" / f"{issued['kid']}.secret").read_bytes()
        assert len(secret) >= 32


def test_init_force_replaces_keys_and_keeps_everything_else(
        ledger_cli: Invoke, isolated_home: Path) -> None:
    pricing_before = (isolated_home / "pricing.toml").read_bytes()
    old_kid = KeyRing.load(isolated_home / "keys").active().kid
    ok_json(ledger_cli("wallet", "fund", "--demo", "3", "--json"))
    data = ok_json(ledger_cli("init", "--force", "--yes", "--json"))
    assert data["kid"] != old_kid
    assert KeyRing.load(isolated_home / "keys").keys[old_kid].status == "retired"
    assert (isolated_home / "pricing.toml").read_bytes() == pricing_before
    assert ok_json(ledger_cli("wallet", "balance", "--json"))["available_usd"] == "3.00"

"""`token extend JTI --ttl D`: a later expiry in the ledger, and the token signed again with it.

A JWT's exp is signed, so the earlier JWT still expires when it said; the verifier honours the
new one, and both spend the same credit.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta

import jwt
import pytest

from mcpbill_cli import Verifier
from mcpbill_cli.errors import BillingError
from mcpbill_cli.ledger.engine import make_engine, reading
from tests.cli.conftest import Invoke, error_json, ok_json
from tests.verifier.invariants import assert_ledger_invariants


def claims(token: str) -> dict:
    return dict(jwt.decode(token, options={"verify_signature": False}))


def test_extend_moves_the_expiry_and_signs_the_token_again(ledger_cli: Invoke) -> None:
    ok_json(ledger_cli("wallet", "fund", "--demo", "5", "--json"))
    issued = ok_json(ledger_cli("token", "issue", "--limit", "1", "--ttl", "1h", "--json"))
    done = ok_json(ledger_cli("token", "extend", issued["jti"], "--ttl", "3h", "--json"))
    old, new = claims(issued["token"]), claims(done["token"])
    assert new["exp"] - old["exp"] in range(2 * 3600 - 5, 2 * 3600 + 5)
    assert {k: v for k, v in new.items() if k != "exp"} == {
        k: v for k, v in old.items() if k != "exp"}
    shown = ok_json(ledger_cli("token", "show", issued["jti"], "--json"))
    assert datetime.fromisoformat(shown["expires_at"]).timestamp() == new["exp"]
    inspected = ok_json(ledger_cli("token", "inspect", done["token"], "--json"))
    assert inspected["status"] == "active"


def test_the_verifier_honours_the_new_token_and_the_old_one_expires(
        ledger_cli: Invoke, db_url: str) -> None:
    ok_json(ledger_cli("wallet", "fund", "--demo", "5", "--json"))
    issued = ok_json(ledger_cli("token", "issue", "--limit", "1", "--ttl", "2s", "--json"))
    extended = ok_json(ledger_cli("token", "extend", issued["jti"], "--ttl", "1h", "--json"))
    time.sleep(2.2)  # past the first JWT's exp (whole seconds: at most 2s after its issue)
    verifier = Verifier.from_settings(leeway=0)
    try:
        with pytest.raises(BillingError) as old:
            verifier.charge(issued["token"], "search", idempotency_key="old")
        receipt = verifier.charge(extended["token"], "search", idempotency_key="new")
    finally:
        verifier.close()
    assert (old.value.code, old.value.details["reason"]) == ("INVALID_CREDIT_TOKEN", "expired")
    assert receipt.claims["jti"] == issued["jti"]
    swept = ok_json(ledger_cli("token", "sweep", "--json"))
    assert issued["jti"] not in str(swept)
    shown = ok_json(ledger_cli("token", "show", issued["jti"], "--json"))
    assert (shown["status"], shown["spent_usd"]) == ("active", "0.002")
    engine = make_engine(db_url)
    with reading(engine) as conn:
        assert_ledger_invariants(conn)
    engine.dispose()


def test_extend_stays_within_ttl_cap_from_issue(ledger_cli: Invoke) -> None:
    ok_json(ledger_cli("wallet", "fund", "--demo", "5", "--json"))
    jti = ok_json(ledger_cli("token", "issue", "--limit", "1", "--ttl", "1h", "--json"))["jti"]
    before = ok_json(ledger_cli("token", "show", jti, "--json"))["expires_at"]
    for ttl in ("25h", "30m"):  # past the 24h cap; earlier than now
        result = ledger_cli("token", "extend", jti, "--ttl", ttl, "--json")
        assert result.exit_code == 3, result.output
        error_json(result, "INVALID_INPUT")
    assert ok_json(ledger_cli("token", "show", jti, "--json"))["expires_at"] == before
    assert ledger_cli("token", "extend", jti, "--ttl", "23h", "--json").exit_code == 0


def test_a_child_cannot_outlive_its_parent(ledger_cli: Invoke) -> None:
    ok_json(ledger_cli("wallet", "fund", "--demo", "5", "--json"))
    parent = ok_json(ledger_cli("token", "issue", "--limit", "1", "--ttl", "2h", "--json"))
    child = ok_json(ledger_cli("token", "issue", "--limit", "0.5", "--ttl", "1h", "--parent",
                               parent["jti"], "--json"))["jti"]
    result = ledger_cli("token", "extend", child, "--ttl", "3h", "--json")
    assert "parent" in error_json(result, "INVALID_INPUT")["message"]
    done = ok_json(ledger_cli("token", "extend", child, "--ttl", "90m", "--json"))
    parent_exp = datetime.fromisoformat(
        ok_json(ledger_cli("token", "show", parent["jti"], "--json"))["expires_at"])
    assert datetime.fromisoformat(done["expires_at"]) <= parent_exp - timedelta(minutes=29)


def test_revoked_and_rotated_out_tokens_are_not_extended(ledger_cli: Invoke) -> None:
    ok_json(ledger_cli("wallet", "fund", "--demo", "5", "--json"))
    revoked = ok_json(ledger_cli("token", "issue", "--limit", "1", "--json"))["jti"]
    ok_json(ledger_cli("revoke", revoked, "--json"))
    result = ledger_cli("token", "extend", revoked, "--ttl", "2h", "--json")
    assert result.exit_code == 6
    error_json(result, "TOKEN_REVOKED")
    older = ok_json(ledger_cli("token", "issue", "--limit", "1", "--ttl", "1h", "--json"))["jti"]
    ok_json(ledger_cli("keys", "rotate", "--json"))
    result = ledger_cli("token", "extend", older, "--ttl", "2h", "--json")
    assert "no longer the active" in error_json(result, "INVALID_INPUT")["message"]
    assert ledger_cli("token", "extend", "tok_nope", "--ttl", "2h", "--json").exit_code == 4


def test_extend_prints_only_the_token(ledger_cli: Invoke) -> None:
    ok_json(ledger_cli("wallet", "fund", "--demo", "5", "--json"))
    jti = ok_json(ledger_cli("token", "issue", "--limit", "1", "--ttl", "1h", "--json"))["jti"]
    result = ledger_cli("token", "extend", jti, "--ttl", "2h")
    assert result.exit_code == 0, result.output
    assert claims(result.stdout.strip())["jti"] == jti

"""`mcpbill receipt show | verify`: a lost reply is recovered; receipts verify offline."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from mcpbill_cli import Verifier
from tests.cli.conftest import Invoke, error_json, ok_json


def test_show_recovers_a_receipt_and_verify_checks_it_against_a_jwks(
        ledger_cli: Invoke, tmp_path: Path) -> None:
    cli = ledger_cli
    ok_json(cli("wallet", "fund", "--demo", "1", "--json"))
    token = ok_json(cli("token", "issue", "--limit", "0.5", "--json"))["token"]
    verifier = Verifier.from_settings()
    receipt = verifier.charge(token, "search", args={"q": "x"}, idempotency_key="order-7")
    verifier.close()

    by_key = ok_json(cli("receipt", "show", "order-7", "--json"))
    by_id = ok_json(cli("receipt", "show", receipt.receipt_id, "--json"))
    assert by_key == by_id
    assert (by_key["receipt_id"], by_key["jws"]) == (receipt.receipt_id, receipt.jws)
    assert by_key["amount_usd"] == "0.002" and by_key["remaining_usd"] == "0.498"
    assert by_key["amount_micro"] == receipt.amount == 2000

    jwks = tmp_path / "jwks.json"
    jwks.write_text(cli("keys", "export-jwks").stdout)
    checked = ok_json(cli("receipt", "verify", receipt.jws, "--jwks", str(jwks), "--json"))
    assert checked["valid"] is True and checked["receipt_id"] == receipt.receipt_id
    assert ok_json(cli("receipt", "verify", "-", "--json", input=receipt.jws))["valid"]

    head, payload, signature = receipt.jws.split(".")
    forged = json.loads(base64.urlsafe_b64decode(payload + "=="))
    forged["amountUsd"] = "0.000001"
    forged_payload = base64.urlsafe_b64encode(json.dumps(forged).encode()).decode().rstrip("=")
    tampered = ".".join([head, forged_payload, signature])
    refused = cli("receipt", "verify", tampered, "--json")
    assert refused.exit_code == 6
    error_json(refused, "INVALID_RECEIPT")


def test_show_of_an_unknown_key_is_not_found(ledger_cli: Invoke) -> None:
    result = ledger_cli("receipt", "show", "nope", "--json")
    assert result.exit_code == 4
    error_json(result, "NOT_FOUND")


def test_a_key_two_tenants_used_needs_the_tenant(ledger_cli: Invoke) -> None:
    cli = ledger_cli
    receipts = {}
    verifier = Verifier.from_settings()
    for tenant in ("acme", "globex"):
        ok_json(cli("wallet", "fund", "--demo", "1", "--tenant", tenant, "--json"))
        token = ok_json(cli("token", "issue", "--limit", "0.5", "--tenant", tenant,
                            "--json"))["token"]
        receipts[tenant] = verifier.charge(token, "search", args={"q": tenant},
                                           idempotency_key="order-7")
    verifier.close()
    refused = cli("receipt", "show", "order-7", "--json")
    assert refused.exit_code == 3
    assert "--tenant" in error_json(refused, "INVALID_INPUT")["message"]
    for tenant, receipt in receipts.items():
        shown = ok_json(cli("receipt", "show", "order-7", "--tenant", tenant, "--json"))
        assert shown["jws"] == receipt.jws and shown["tenant"] == tenant
    error_json(cli("receipt", "show", "order-7", "--tenant", "initech", "--json"), "NOT_FOUND")

"""`mcpbill receipt show | verify` print, for a person or a pipe, the fields --json prints."""

from __future__ import annotations

import json

from mcpbill_cli import Verifier
from tests.cli.conftest import Invoke, ok_json


def test_a_receipt_prints_the_same_fields_with_and_without_json(ledger_cli: Invoke) -> None:
    ok_json(ledger_cli("wallet", "fund", "--demo", "1", "--json"))
    token = ok_json(ledger_cli("token", "issue", "--limit", "1", "--json"))["token"]
    verifier = Verifier.from_settings()
    try:
        receipt = verifier.charge(token, "search", idempotency_key="shown-1")
    finally:
        verifier.close()
    for args in (("receipt", "show", receipt.receipt_id), ("receipt", "verify", receipt.jws)):
        document = ok_json(ledger_cli(*args, "--json"))
        printed = ledger_cli(*args)
        assert printed.exit_code == 0, printed.output
        shown = dict(line.split("\t", 1) for line in printed.stdout.splitlines())
        assert {key: json.loads(value) if key != "jws" and not isinstance(document[key], str)
                else value for key, value in shown.items()} == document
        assert json.loads(shown["amount_micro"]) == receipt.amount
        assert "idempotency_key" in shown and "idempotencyKey" not in shown

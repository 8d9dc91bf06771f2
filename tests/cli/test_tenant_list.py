"""`mcpbill tenant list`: every tenant's money and tokens, agreeing with `wallet balance`."""

from __future__ import annotations

from mcpbill_cli import Verifier
from tests.cli.conftest import Invoke, ok_json


def test_an_empty_ledger_has_no_tenants(ledger_cli: Invoke) -> None:
    assert ok_json(ledger_cli("tenant", "list", "--json")) == []


def test_each_tenant_with_balance_allotted_spent_and_token_counts(ledger_cli: Invoke) -> None:
    ok_json(ledger_cli("wallet", "fund", "--tenant", "acme", "--demo", "10", "--json"))
    ok_json(ledger_cli("wallet", "fund", "--tenant", "zeta", "--demo", "3", "--json"))
    first = ok_json(ledger_cli("token", "issue", "--tenant", "acme", "--limit", "2", "--json"))
    second = ok_json(ledger_cli("token", "issue", "--tenant", "acme", "--limit", "1", "--json"))
    verifier = Verifier.from_settings()
    try:
        verifier.charge(first["token"], "search", idempotency_key="k1")  # acme pays 0.001
    finally:
        verifier.close()
    ok_json(ledger_cli("revoke", second["jti"], "--json"))

    listed = {t["tenant"]: t for t in ok_json(ledger_cli("tenant", "list", "--json"))}
    assert list(listed) == ["acme", "zeta"]
    assert listed["acme"] == {
        "tenant": "acme", "tokens": 2, "active_tokens": 1, "funded_usd": "10.00",
        "allotted_usd": "1.999", "held_usd": "0.00", "spent_usd": "0.001",
        "available_usd": "8.00"}
    assert listed["zeta"]["available_usd"] == "3.00" and listed["zeta"]["tokens"] == 0
    for name, row in listed.items():
        balance = ok_json(ledger_cli("wallet", "balance", "--tenant", name, "--json"))
        assert {k: v for k, v in row.items() if k.endswith("_usd")} == {
            k: v for k, v in balance.items() if k.endswith("_usd")}


def test_the_human_listing_shows_every_tenant(ledger_cli: Invoke) -> None:
    ok_json(ledger_cli("wallet", "fund", "--tenant", "acme", "--demo", "1", "--json"))
    result = ledger_cli("tenant", "list")
    assert result.exit_code == 0, result.output
    assert "acme" in result.stdout and "1.00" in result.stdout

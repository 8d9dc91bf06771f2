"""`token issue --rate / --spend-rate`: a token's own rate limits, validated, signed into the
token, shown back, and enforced by a verifier on the same home."""

from __future__ import annotations

import pytest

from mcpbill_cli import Verifier
from mcpbill_cli.errors import RateLimited
from tests.cli.conftest import Invoke, error_json, ok_json


def test_issued_rates_are_signed_into_the_token_and_enforced(ledger_cli: Invoke) -> None:
    cli = ledger_cli
    ok_json(cli("wallet", "fund", "--demo", "10", "--json"))
    issued = ok_json(cli("token", "issue", "--limit", "1", "--rate", "2/s", "--rate", "100/m",
                         "--spend-rate", "0.5/m", "--json"))
    assert issued["rate_limits"] == {"calls": ["2/s", "100/m"], "spend": ["0.50/m"]}
    inspected = ok_json(cli("token", "inspect", issued["token"], "--json"))
    assert inspected["rates"] == issued["rate_limits"]
    shown = cli("token", "inspect", issued["token"])
    assert "calls 2/s, 100/m; spend 0.50/m" in shown.stdout

    verifier = Verifier.from_settings()
    try:
        verifier.charge(issued["token"], "search", args={"n": 1})
        verifier.charge(issued["token"], "search", args={"n": 2})
        with pytest.raises(RateLimited) as refused:
            verifier.charge(issued["token"], "search", args={"n": 3})
    finally:
        verifier.close()
    assert refused.value.details["limit"] == "2/s"


def test_a_token_without_rates_says_so(ledger_cli: Invoke) -> None:
    ok_json(ledger_cli("wallet", "fund", "--demo", "10", "--json"))
    issued = ok_json(ledger_cli("token", "issue", "--limit", "1", "--json"))
    assert issued["rate_limits"] == {"calls": [], "spend": []}


@pytest.mark.parametrize("flags", [
    ("--rate", "0/s"), ("--rate", "10/h"), ("--rate", "ten/s"), ("--rate", "1.5/s"),
    ("--rate", "10/s", "--rate", "20/s"), ("--spend-rate", "-1/m"), ("--spend-rate", "0/m"),
    ("--spend-rate", "0.0000001/m"), ("--rate", "10"),
])
def test_bad_rates_are_invalid_input_and_issue_nothing(ledger_cli: Invoke,
                                                       flags: tuple[str, ...]) -> None:
    ok_json(ledger_cli("wallet", "fund", "--demo", "10", "--json"))
    result = ledger_cli("token", "issue", "--limit", "1", *flags, "--json")
    assert result.exit_code == 3, result.output
    error_json(result, "INVALID_INPUT")
    assert ok_json(ledger_cli("token", "list", "--json")) == []


def test_an_extended_token_keeps_its_rates(ledger_cli: Invoke) -> None:
    """`token extend` signs the token again from its ledger row: its own rate limits come
    with it (a token that lost them on extend would let a loop run unchecked)."""
    cli = ledger_cli
    ok_json(cli("wallet", "fund", "--demo", "10", "--json"))
    issued = ok_json(cli("token", "issue", "--limit", "1", "--ttl", "1h", "--rate", "2/s",
                         "--spend-rate", "0.5/m", "--json"))
    extended = ok_json(cli("token", "extend", issued["jti"], "--ttl", "2h", "--json"))
    inspected = ok_json(cli("token", "inspect", extended["token"], "--json"))
    assert inspected["rates"] == issued["rate_limits"]

    verifier = Verifier.from_settings()
    try:
        verifier.charge(extended["token"], "search", args={"n": 1})
        verifier.charge(extended["token"], "search", args={"n": 2})
        with pytest.raises(RateLimited):
            verifier.charge(extended["token"], "search", args={"n": 3})
    finally:
        verifier.close()

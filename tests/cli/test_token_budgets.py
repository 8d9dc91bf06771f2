"""`token issue --daily --monthly --topup-below --topup-to`: a token's own caps and auto top-up,
validated before anything is written, kept in the ledger, shown by `token show` and `list`."""

from __future__ import annotations

import pytest

from mcpbill_cli import Verifier
from mcpbill_cli.errors import BudgetExceeded
from tests.cli.conftest import Invoke, error_json, ok_json
from tests.verifier.billing_support import jwt_parts

TERMS = ("daily_cap_usd", "monthly_cap_usd", "topup_below_usd", "topup_to_usd")


@pytest.mark.parametrize("flags", [
    ("--daily", "-1"), ("--daily", "0"), ("--monthly", "0"), ("--daily", "abc"),
    ("--daily", "2", "--monthly", "1"), ("--topup-below", "0.5"), ("--topup-to", "2"),
    ("--topup-below", "2", "--topup-to", "2"), ("--topup-below", "0", "--topup-to", "2"),
    ("--topup-below", "3", "--topup-to", "2"),
], ids=lambda flags: " ".join(flags))
def test_bad_budget_flags_are_invalid_input_and_issue_nothing(ledger_cli: Invoke,
                                                              flags: tuple[str, ...]) -> None:
    ok_json(ledger_cli("wallet", "fund", "--demo", "5", "--json"))
    result = ledger_cli("token", "issue", "--limit", "1", *flags, "--json")
    assert result.exit_code == 3, result.output
    assert error_json(result, "INVALID_INPUT")["message"]
    assert ok_json(ledger_cli("token", "list", "--json")) == []
    assert ok_json(ledger_cli("wallet", "balance", "--json"))["available_usd"] == "5.00"


def test_caps_and_topup_are_kept_and_shown(ledger_cli: Invoke) -> None:
    ok_json(ledger_cli("wallet", "fund", "--demo", "5", "--json"))
    issued = ok_json(ledger_cli("token", "issue", "--limit", "1", "--daily", "2", "--monthly",
                                "20", "--topup-below", "0.50", "--topup-to", "2", "--json"))
    expected = {"daily_cap_usd": "2.00", "monthly_cap_usd": "20.00",
                "topup_below_usd": "0.50", "topup_to_usd": "2.00"}
    assert {k: issued[k] for k in TERMS} == expected
    shown = ok_json(ledger_cli("token", "show", issued["jti"], "--json"))
    assert {k: shown[k] for k in TERMS} == expected
    plain = ok_json(ledger_cli("token", "issue", "--limit", "1", "--json"))
    listed = {t["jti"]: t for t in ok_json(ledger_cli("token", "list", "--json"))}
    assert {k: listed[issued["jti"]][k] for k in TERMS} == expected
    assert {k: listed[plain["jti"]][k] for k in TERMS} == dict.fromkeys(TERMS)
    human = ledger_cli("token", "show", issued["jti"])
    assert "daily_cap_usd" in human.stdout and "20.00" in human.stdout


def test_a_token_issued_with_a_daily_cap_is_refused_past_it(ledger_cli: Invoke) -> None:
    ok_json(ledger_cli("wallet", "fund", "--demo", "5", "--json"))
    token = ok_json(ledger_cli("token", "issue", "--limit", "1", "--daily", "0.004",
                               "--json"))["token"]
    verifier = Verifier.from_settings()
    try:
        for n in range(2):
            verifier.charge(token, "search", args={"n": n})
        with pytest.raises(BudgetExceeded) as refused:
            verifier.charge(token, "search", args={"n": 2})
    finally:
        verifier.close()
    details = refused.value.to_dict()
    assert (details["scope"], details["window"], details["capUsd"]) == ("token", "day", "0.004")


def test_the_terms_are_signed_into_the_token_and_kept_by_extend(ledger_cli: Invoke) -> None:
    ok_json(ledger_cli("wallet", "fund", "--demo", "5", "--json"))
    issued = ok_json(ledger_cli("token", "issue", "--limit", "1", "--ttl", "1h", "--daily",
                                "2", "--topup-below", "0.5", "--topup-to", "1", "--json"))
    budget = {"dailyCapUsd": "2.00", "topupBelowUsd": "0.50", "topupToUsd": "1.00"}
    assert jwt_parts(issued["token"])[1]["budget"] == budget
    extended = ok_json(ledger_cli("token", "extend", issued["jti"], "--ttl", "2h", "--json"))
    assert jwt_parts(extended["token"])[1]["budget"] == budget
    plain = ok_json(ledger_cli("token", "issue", "--limit", "1", "--json"))
    assert "budget" not in jwt_parts(plain["token"])[1]

"""Reading challenges and settlements, judging options, signing: no network, no ledger."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data

from mcpbill_cli.errors import InvalidInput
from mcpbill_cli.x402 import (
    AllowedAsset,
    PaymentPolicy,
    X402BadChallenge,
    X402NoAcceptableOption,
    X402OverMaximum,
    choose,
    decide,
    parse_challenge,
)
from mcpbill_cli.x402.signing import AUTHORIZATION_TYPES, sign_authorization
from mcpbill_cli.x402.wire import parse_settlement, payment_header

USDC_BASE = "0x833589fcd6edb6e08f4c7c32d4f71b54bda02913"
PAY_TO = "0x209693bc6afc0c5328ba36faf03c514ef312287c"
BASE = AllowedAsset("eip155:8453", USDC_BASE, "USD Coin", "2")
POLICY = PaymentPolicy((BASE,), max_amount=50_000)


def option(**overrides: Any) -> dict[str, Any]:
    return {"scheme": "exact", "network": "eip155:8453", "amount": "10000",
            "asset": "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913", "payTo": PAY_TO,
            "maxTimeoutSeconds": 60, "extra": {"name": "USD Coin", "version": "2"},
            **overrides}


def v2_headers(*options: dict[str, Any], **document: Any) -> dict[str, str]:
    body = {"x402Version": 2, "resource": {"url": "https://api.example.com/r"},
            "accepts": list(options), **document}
    return {"PAYMENT-REQUIRED": base64.b64encode(json.dumps(body).encode()).decode()}


def test_a_v2_challenge_is_read_from_its_header() -> None:
    challenge = parse_challenge(v2_headers(option()), b"{}")

    assert (challenge.version, challenge.payment_header) == (2, "PAYMENT-SIGNATURE")
    [offer] = challenge.offers
    assert offer.requirement is not None
    assert (offer.requirement.amount, offer.requirement.asset) == (10_000, USDC_BASE)
    assert offer.requirement.chain_id == 8453


def test_a_v1_challenge_is_read_from_its_body_with_legacy_names() -> None:
    body = {"x402Version": 1, "error": "X-PAYMENT header is required", "accepts": [{
        "scheme": "exact", "network": "base", "maxAmountRequired": "2500",
        "resource": "https://api.example.com/r", "payTo": PAY_TO, "maxTimeoutSeconds": 30,
        "asset": USDC_BASE, "extra": json.dumps({"name": "USD Coin", "version": "2"})}]}

    challenge = parse_challenge({}, json.dumps(body).encode())

    assert (challenge.version, challenge.payment_header) == (1, "X-PAYMENT")
    requirement = challenge.offers[0].requirement
    assert requirement is not None
    assert (requirement.network, requirement.amount) == ("eip155:8453", 2500)
    assert requirement.extra == {"name": "USD Coin", "version": "2"}


@pytest.mark.parametrize(("headers", "body", "reason"), [
    ({}, b'{"error": "pay us"}', "no_requirements"),
    ({}, b"<html>402</html>", "no_requirements"),
    ({"PAYMENT-REQUIRED": "not base64 json!"}, b"", "malformed"),
    ({"PAYMENT-REQUIRED": base64.b64encode(b"[1]").decode()}, b"", "malformed"),
    ({"PAYMENT-REQUIRED": "A" * 70_000}, b"", "too_large"),
    (v2_headers(x402Version=3), b"", "unsupported_version"),
    (v2_headers(), b"", "no_options"),
])
def test_a_402_without_usable_requirements_is_a_bad_challenge(
        headers: dict[str, str], body: bytes, reason: str) -> None:
    with pytest.raises(X402BadChallenge) as refused:
        parse_challenge(headers, body)
    assert refused.value.details["reason"] == reason


def test_an_unreadable_option_is_kept_with_its_problem() -> None:
    solana = option(network="solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp", asset="EPjFWdd5Aufq")
    decision = decide(parse_challenge(v2_headers(solana, option()), b""), POLICY)

    assert [v.reason for v in decision.verdicts] == ["unreadable", "ok"]
    assert decision.choice is not None and decision.choice.offer.index == 1


def test_the_cheapest_acceptable_option_wins() -> None:
    challenge = parse_challenge(v2_headers(option(amount="30000"), option(amount="20000"),
                                           option(scheme="upto", amount="1")), b"")
    choice = choose(challenge, POLICY)
    assert (choice.offer.index, choice.amount) == (1, 20_000)


def test_over_the_maximum_is_told_apart_from_not_allowed() -> None:
    pricey = parse_challenge(v2_headers(option(amount="50001")), b"")
    with pytest.raises(X402OverMaximum) as over:
        choose(pricey, POLICY)
    assert (over.value.details["amountUsd"], over.value.details["maximumUsd"]) == (
        "0.050001", "0.05")

    elsewhere = parse_challenge(v2_headers(option(network="eip155:1")), b"")
    with pytest.raises(X402NoAcceptableOption) as refused:
        choose(elsewhere, POLICY)
    assert refused.value.details["options"][0]["reason"] == "asset"


def test_a_lookalike_eip712_name_is_refused_before_signing() -> None:
    """A wrong domain name signs something that looks fine and fails on chain."""
    lookalike = parse_challenge(v2_headers(option(extra={"name": "USDC", "version": "2"})), b"")
    with pytest.raises(X402NoAcceptableOption) as refused:
        choose(lookalike, POLICY)
    assert refused.value.details["options"][0]["reason"] == "domain"


def test_a_missing_domain_is_taken_from_the_allowed_asset() -> None:
    choice = choose(parse_challenge(v2_headers(option(extra=None)), b""), POLICY)
    assert (choice.domain_name, choice.domain_version) == ("USD Coin", "2")


def test_only_six_decimal_assets_can_be_allowed() -> None:
    with pytest.raises(InvalidInput):
        AllowedAsset("eip155:1", "0x" + "22" * 20, decimals=18, symbol="DAI")


def test_the_authorization_is_signed_by_the_payer_for_the_token_and_chain() -> None:
    account = Account.create()
    challenge = parse_challenge(v2_headers(option()), b"")
    choice = choose(challenge, POLICY)

    payload = sign_authorization(account, choice, valid_after=100, valid_before=200,
                                 nonce=b"\x01" * 32)

    auth = payload["authorization"]
    assert (auth["value"], auth["validAfter"], auth["validBefore"]) == ("10000", "100", "200")
    assert auth["to"].lower() == PAY_TO and auth["from"] == account.address
    message = {**auth, "value": 10_000, "validAfter": 100, "validBefore": 200,
               "nonce": b"\x01" * 32}
    domain = {"name": "USD Coin", "version": "2", "chainId": 8453,
              "verifyingContract": "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"}
    signable = encode_typed_data(domain, AUTHORIZATION_TYPES, message)
    assert Account.recover_message(signable, signature=payload["signature"]) == account.address


def test_the_payment_header_echoes_the_option_as_sent() -> None:
    raw = option(extra={"name": "USD Coin", "version": "2", "vendor": "x"})
    challenge = parse_challenge(v2_headers(raw, extensions={"bazaar": {"info": {}}}), b"")
    header = payment_header(challenge, challenge.offers[0], {"signature": "0x"})
    document = json.loads(base64.b64decode(header))
    assert document["accepted"] == raw
    assert document["extensions"] == {"bazaar": {"info": {}}}
    assert document["resource"] == {"url": "https://api.example.com/r"}


def test_settlements_are_read_or_ignored() -> None:
    challenge = parse_challenge(v2_headers(option()), b"")

    def settle(document: Any) -> dict[str, str]:
        return {"PAYMENT-RESPONSE": base64.b64encode(json.dumps(document).encode()).decode()}

    ok = parse_settlement(settle({"success": True, "transaction": "0x" + "ab" * 32,
                                  "network": "eip155:8453"}), challenge)
    assert ok is not None and ok.success and ok.transaction == "0x" + "ab" * 32
    failed = parse_settlement(settle({"success": False, "errorReason": "insufficient_funds",
                                      "transaction": "", "network": "eip155:8453"}), challenge)
    assert failed is not None and not failed.success
    assert failed.error_reason == "insufficient_funds"
    assert parse_settlement({"PAYMENT-RESPONSE": "%%%"}, challenge) is None
    assert parse_settlement({}, challenge) is None

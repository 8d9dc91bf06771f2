"""Paying a real x402 peer (official middleware and facilitator, settling on anvil) from an agent's
budget: the chain, the peer and the ledger all agree on what moved, and what did not."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from mcpbill_cli.errors import BillingError, BudgetExceeded
from mcpbill_cli.ledger.credit import IssuedToken
from mcpbill_cli.ledger.engine import reading
from mcpbill_cli.ledger.models import calls
from mcpbill_cli.ledger.ops import balance, token_account
from mcpbill_cli.verifier import Verifier
from mcpbill_cli.x402 import (
    AgentBudget,
    AsyncX402Transport,
    PaymentPolicy,
    X402AlreadyPaid,
    X402BadChallenge,
    X402OverMaximum,
    X402Payer,
    X402SettlementFailed,
    X402Transport,
    parse_challenge,
    payment_of,
)

from .conftest import MAX_PER_CALL, PRICE, PRICEY, USDC, Peer, SpySigner, Wire

pytestmark = pytest.mark.slow

NewToken = Callable[..., IssuedToken]
PayerFor = Callable[..., X402Payer]


def get(payer: X402Payer, url: str, wire: Wire, **kw: Any) -> httpx.Response:
    with httpx.Client(transport=X402Transport(payer, wire)) as http:
        return http.get(url, **kw)


def spent_and_held(verifier: Verifier, jti: str) -> tuple[int, int]:
    assert verifier.engine is not None
    with reading(verifier.engine) as conn:
        account = balance(conn, token_account(jti))
    return account.debits_posted, account.debits_pending


def call_rows(verifier: Verifier, jti: str) -> list[dict[str, Any]]:
    assert verifier.engine is not None
    c = calls.c
    with reading(verifier.engine) as conn:
        rows = conn.execute(select(c.status, c.amount_held, c.amount, c.price_rule, c.tool)
                            .where(c.jti == jti)).all()
    return [dict(row._mapping) for row in rows]


@pytest.mark.parametrize("route", ["/v2/report", "/v1/report"])
def test_a_paid_request_settles_on_chain_and_captures_the_hold(
        peer: Peer, verifier: Verifier, new_token: NewToken, payer_for: PayerFor,
        signer: SpySigner, wire: Wire, route: str) -> None:
    issued = new_token(limit=USDC)
    before = peer.balances()

    response = get(payer_for(issued.token), peer.url + route, wire)

    assert response.status_code == 200, response.text
    assert response.json()["report"] == "paid content"
    outcome = payment_of(response)
    assert outcome is not None
    tx = outcome.settlement.transaction
    assert peer.devnet.w3.eth.get_transaction_receipt(tx)["status"] == 1
    operator, payee = peer.balances()
    assert (before[0] - operator, payee - before[1]) == (PRICE, PRICE)
    assert spent_and_held(verifier, issued.claims.jti) == (PRICE, 0)
    assert call_rows(verifier, issued.claims.jti) == [
        {"status": "captured", "amount_held": PRICE, "amount": PRICE, "price_rule": "x402",
         "tool": "search"}]
    receipt = verifier.verify_receipt(outcome.receipt.jws)
    assert receipt.amount == PRICE
    assert receipt.claims["transaction"] == tx.lower()
    assert receipt.claims["network"] == "eip155:43113"
    assert receipt.claims["settlement"]["payer"] == peer.operator.address.lower()
    assert receipt.claims["settlement"]["payTo"] == peer.pay_to.lower()
    assert receipt.remaining == USDC - PRICE
    header = "payment-signature" if route.startswith("/v2") else "x-payment"
    assert [r.url.path for r in wire.sent if header in r.headers] == [route]
    assert len(signer.signed) == 1


@pytest.mark.parametrize("route", ["/v2/report", "/v1/report"])
def test_a_replayed_payment_is_refused_by_the_peer(
        peer: Peer, new_token: NewToken, payer_for: PayerFor, wire: Wire, route: str) -> None:
    response = get(payer_for(new_token().token), peer.url + route, wire)
    assert response.status_code == 200
    [payment] = wire.payments()
    before = peer.balances()

    name = "PAYMENT-SIGNATURE" if route.startswith("/v2") else "X-PAYMENT"
    replay = httpx.get(peer.url + route, headers={name: payment})

    assert replay.status_code == 402
    assert "paid content" not in replay.text
    reason = parse_challenge(replay.headers, replay.content).error or ""
    assert reason.startswith("invalid_exact_evm_"), reason  # v2: ..._nonce_already_used
    assert peer.balances() == before


def test_one_request_is_never_paid_twice(peer: Peer, verifier: Verifier, new_token: NewToken,
                                         payer_for: PayerFor, signer: SpySigner,
                                         wire: Wire) -> None:
    issued = new_token()
    first = get(payer_for(issued.token, request_id="mcp-7"), peer.url + "/v2/report", wire)
    assert first.status_code == 200
    before = peer.balances()

    with pytest.raises(X402AlreadyPaid) as refused:
        get(payer_for(issued.token, request_id="mcp-7"), peer.url + "/v2/report", wire)

    assert refused.value.details["transaction"] == payment_of(first).settlement.transaction.lower()
    assert len(signer.signed) == 1 and len(wire.payments()) == 1
    assert peer.balances() == before
    assert spent_and_held(verifier, issued.claims.jti) == (PRICE, 0)


def test_a_price_above_the_maximum_is_refused_without_signing(
        peer: Peer, verifier: Verifier, new_token: NewToken, payer_for: PayerFor,
        signer: SpySigner, wire: Wire) -> None:
    issued = new_token(limit=10 * USDC)
    before = peer.balances()

    with pytest.raises(X402OverMaximum) as refused:
        get(payer_for(issued.token), peer.url + "/v2/pricey", wire)

    assert refused.value.code == "X402_OVER_MAXIMUM"
    assert refused.value.details["amountUsd"] == "2.00"
    assert refused.value.details["maximumUsd"] == "0.05"
    assert signer.signed == [] and wire.payments() == []
    assert call_rows(verifier, issued.claims.jti) == []
    assert peer.balances() == before
    assert PRICEY > MAX_PER_CALL


def test_an_agent_with_too_little_budget_gets_budget_exceeded_and_nothing_is_signed(
        peer: Peer, verifier: Verifier, new_token: NewToken, payer_for: PayerFor,
        signer: SpySigner, wire: Wire) -> None:
    issued = new_token(limit=PRICE - 1)
    before = peer.balances()

    with pytest.raises(BudgetExceeded) as refused:
        get(payer_for(issued.token), peer.url + "/v2/report", wire)

    details = refused.value.to_dict()
    assert details["code"] == "BUDGET_EXCEEDED"
    assert (details["priceUsd"], details["remainingUsd"], details["shortfallUsd"]) == (
        "0.01", "0.009999", "0.000001")
    assert "moreCredit" in details["fallback"]
    assert signer.signed == [] and wire.payments() == []
    assert spent_and_held(verifier, issued.claims.jti) == (0, 0)
    assert peer.balances() == before


def test_a_402_without_x402_requirements_is_a_clear_error(
        peer: Peer, new_token: NewToken, payer_for: PayerFor, signer: SpySigner,
        wire: Wire) -> None:
    with pytest.raises(X402BadChallenge) as refused:
        get(payer_for(new_token().token), peer.url + "/plain402", wire)

    assert refused.value.code == "X402_BAD_CHALLENGE"
    assert "without x402 payment requirements" in refused.value.message
    assert signer.signed == []


def test_a_free_route_is_fetched_without_paying(peer: Peer, verifier: Verifier,
                                                 new_token: NewToken, payer_for: PayerFor,
                                                 wire: Wire) -> None:
    issued = new_token()
    response = get(payer_for(issued.token), peer.url + "/free", wire)
    assert response.json() == {"free": True}
    assert payment_of(response) is None
    assert call_rows(verifier, issued.claims.jti) == []


def test_a_payment_the_peer_refuses_is_voided_and_nothing_is_charged(
        peer: Peer, verifier: Verifier, new_token: NewToken, policy: PaymentPolicy,
        wire: Wire) -> None:
    """The operator's wallet cannot cover it: the facilitator refuses, the hold is released."""
    from eth_account import Account

    issued = new_token()
    broke = SpySigner(Account.create())
    payer = X402Payer(AgentBudget(verifier, issued.token, tool="search"), broke, policy)
    before = peer.balances()

    with pytest.raises(X402SettlementFailed) as refused:
        get(payer, peer.url + "/v2/report", wire)

    assert refused.value.details["status"] == 402
    assert refused.value.details["errorReason"].startswith("invalid_exact_evm_")
    assert len(broke.signed) == 1
    assert spent_and_held(verifier, issued.claims.jti) == (0, 0)
    assert call_rows(verifier, issued.claims.jti)[0]["status"] == "voided"
    assert peer.balances() == before


@pytest.mark.parametrize("status", [500, 404, 402])
def test_a_settlement_the_server_reports_done_is_captured_whatever_its_status(
        peer: Peer, verifier: Verifier, new_token: NewToken, payer_for: PayerFor,
        status: int) -> None:
    """The server took the payment and says so, then failed the resource: the money moved,
    so it counts in the agent's budget (voided, a budget would let more be paid than it
    holds)."""
    import base64
    import json

    issued = new_token(limit=USDC)
    payer = payer_for(issued.token)
    request = httpx.Request("GET", peer.url + "/v2/report")
    challenge = httpx.get(peer.url + "/v2/report")
    assert challenge.status_code == 402
    pending = payer.prepare(request, challenge.headers, challenge.content)
    tx = "0x" + "ab" * 32
    settled = base64.b64encode(json.dumps({
        "success": True, "transaction": tx, "network": "eip155:43113",
        "payer": peer.operator.address}).encode()).decode()

    outcome = payer.finish(pending, status,
                           httpx.Headers({pending.challenge.response_header: settled}))

    assert outcome.receipt.amount == PRICE and outcome.receipt.claims["transaction"] == tx
    assert spent_and_held(verifier, issued.claims.jti) == (PRICE, 0)
    failed = base64.b64encode(json.dumps({"success": False, "transaction": "",
                                          "errorReason": "insufficient_funds"}).encode())
    again = payer.prepare(httpx.Request("GET", peer.url + "/v2/report?n=2"),
                          challenge.headers, challenge.content)
    with pytest.raises(X402SettlementFailed):
        payer.finish(again, status, httpx.Headers({
            again.challenge.response_header: failed.decode()}))
    assert spent_and_held(verifier, issued.claims.jti) == (PRICE, 0)  # that one: voided


def test_the_async_transport_pays_too(peer: Peer, verifier: Verifier, new_token: NewToken,
                                      payer_for: PayerFor) -> None:
    issued = new_token()

    async def fetch() -> httpx.Response:
        transport = AsyncX402Transport(payer_for(issued.token))
        async with httpx.AsyncClient(transport=transport) as http:
            return await http.get(peer.url + "/v2/report")

    response = asyncio.run(fetch())

    assert response.status_code == 200
    outcome = payment_of(response)
    assert outcome is not None and outcome.receipt.amount == PRICE
    assert spent_and_held(verifier, issued.claims.jti) == (PRICE, 0)


def test_an_asset_the_operator_did_not_allow_is_never_paid(
        peer: Peer, new_token: NewToken, payer_for: PayerFor, signer: SpySigner,
        wire: Wire) -> None:
    from mcpbill_cli.x402 import AllowedAsset, X402NoAcceptableOption

    other = PaymentPolicy((AllowedAsset("eip155:43113", "0x" + "11" * 20, "USD Coin", "2"),),
                          max_amount=MAX_PER_CALL)
    with pytest.raises(X402NoAcceptableOption) as refused:
        get(payer_for(new_token().token, allow=other), peer.url + "/v2/report", wire)

    assert [o["reason"] for o in refused.value.details["options"]] == ["asset"]
    assert signer.signed == [] and wire.payments() == []


def test_refusals_are_billing_errors() -> None:
    for error in (X402AlreadyPaid, X402BadChallenge, X402OverMaximum, X402SettlementFailed):
        assert issubclass(error, BillingError)

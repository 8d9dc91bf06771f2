"""x402 payments on billed HTTP routes: the official x402 HTTP client (its httpx integration)
pays our 402 itself; the shop settles on the session's anvil and records the call.

Each test gets a fresh deposit address and fresh payers, so on-chain balances are its own.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine
from web3 import Web3
from x402 import x402Client
from x402.http.clients import x402HttpxClient
from x402.mechanisms.evm.exact import ExactEvmClientScheme
from x402.mechanisms.evm.exact.v1 import ExactEvmSchemeV1Client
from x402.schemas.v1 import PaymentRequiredV1

from mcpbill_cli.clock import utcnow
from mcpbill_cli.http import (
    RECEIPT_HEADER,
    REPLAYED_HEADER,
    TOKEN_HEADER,
    PaidRoute,
    PaymentMiddleware,
)
from mcpbill_cli.keys import KeySource
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.verifier import Verifier
from mcpbill_cli.wallet.rpc import Rpc, connect
from mcpbill_cli.x402.accept import Acceptor
from mcpbill_cli.x402.offers import Terms
from mcpbill_cli.x402.settlers import FacilitatorSettler, SelfSettler, Settler
from tests.proxy.test_cut_off import ledger_locked
from tests.x402.accepting import (
    ACCEPT_PRICING,
    SEARCH_PRICE,
    Shop,
    balance,
    cut_recording,
    new_payer,
    official_client,
    official_payment,
    rate_limited,
    recording_waits,
)
from tests.x402.conftest import Peer
from tests.x402.peer import NETWORK, V1_NETWORK

from .conftest import Switch

ROUTES = [PaidRoute("GET", "/report", "search"), PaidRoute("GET", "/premium", "premium"),
          PaidRoute("GET", "/boom", "boom"), PaidRoute("GET", "/status", "status"),
          PaidRoute("GET", "/drain", "search"), PaidRoute("GET", "/held", "search")]
SECRET = "the paid content"


@dataclass
class Held:
    """``/held`` says it has ``entered``, then waits for ``release``."""

    entered: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


def shop_app(shop: Shop, runs: Counter[str], drain: LocalAccount | None = None,
             held: Held | None = None) -> FastAPI:
    app = FastAPI()
    app.add_middleware(PaymentMiddleware, verifier=shop.verifier, routes=ROUTES,
                       acceptor=shop.acceptor)

    @app.get("/report")
    async def report() -> dict[str, Any]:
        runs["report"] += 1
        return {"report": SECRET, "run": runs["report"]}

    @app.get("/premium")
    async def premium() -> dict[str, Any]:
        runs["premium"] += 1
        return {"premium": True}

    @app.get("/boom")
    async def boom() -> Response:
        runs["boom"] += 1
        return JSONResponse({"error": "upstream down"}, status_code=502)

    @app.get("/status")
    async def status() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/drain")
    def drained() -> dict[str, Any]:
        """Runs, then the payer moves its USDC away before the payment settles."""
        runs["drain"] += 1
        assert drain is not None
        _move_all(shop, drain)
        return {"report": SECRET}

    @app.get("/held")
    def holding() -> dict[str, Any]:
        runs["held"] += 1
        assert held is not None
        held.entered.set()
        held.release.wait(30)
        return {"held": True}

    return app


def _move_all(shop: Shop, payer: LocalAccount) -> None:
    devnet = shop.devnet
    devnet.rpc("anvil_impersonateAccount", payer.address)
    devnet.rpc("anvil_setBalance", payer.address, hex(10**18))
    held = balance(devnet, payer.address)
    tx = devnet.usdc.functions.transfer(Web3.to_checksum_address(devnet.stranger), held
                                        ).transact({"from": payer.address, "gas": 100_000})
    assert devnet.w3.eth.wait_for_transaction_receipt(tx)["status"] == 1


@pytest.fixture(scope="session")
def gas_account(peer: Peer) -> LocalAccount:
    """The operator's own account on anvil: it pays the gas of self-settlement."""
    account: LocalAccount = Account.create()
    w3 = peer.devnet.w3
    tx = w3.eth.send_transaction({"from": peer.devnet.deployer, "to": account.address,
                                  "value": 10**19})
    assert w3.eth.wait_for_transaction_receipt(tx)["status"] == 1
    return account


def make_shop(engine: Engine, keys_dir: Path, peer: Peer, rpc_url: str,
              settler: Settler | None = None, gas: LocalAccount | None = None) -> Shop:
    verifier = Verifier(keys=KeySource(directory=keys_dir),
                        pricing=PricingTable.from_document(ACCEPT_PRICING), engine=engine)
    chain = peer.devnet.chain
    pay_to = Account.create().address.lower()
    rpc = Rpc(connect(rpc_url))
    terms = Terms(NETWORK, chain.usdc, pay_to, chain.eip712_name, chain.eip712_version, 60)
    acceptor = Acceptor(verifier, chain=chain, pay_to=pay_to, rpc=rpc,
                        settler=settler or SelfSettler(rpc, terms, lambda: gas))
    return Shop(acceptor, verifier, engine, peer.devnet, pay_to, keys_dir)


@pytest.fixture
def shop(engine: Engine, keys_dir: Path, peer: Peer, fuji_anvil: str,
         gas_account: LocalAccount) -> Iterator[Shop]:
    shop = make_shop(engine, keys_dir, peer, fuji_anvil, gas=gas_account)
    yield shop
    shop.verifier.close()


@pytest.fixture
def runs() -> Counter[str]:
    return Counter()


@pytest.fixture
def payer(peer: Peer) -> LocalAccount:
    return new_payer(peer.devnet)


@pytest.fixture
def url(served: tuple[Switch, str], shop: Shop, runs: Counter[str],
        payer: LocalAccount) -> Iterator[str]:
    switch, base = served
    switch.app = shop_app(shop, runs, drain=payer)
    yield base
    switch.app = None


def official_async_client(payer: LocalAccount, asset: str) -> x402Client:
    """The official async x402 client, paying with ``payer``, allowed the test USDC."""
    client = x402Client()
    client.register(NETWORK, ExactEvmClientScheme(payer))
    client.register_v1(V1_NETWORK, ExactEvmSchemeV1Client(payer))
    client.set_spend_controls({"allowed_assets": [
        {"network": network, "asset": asset, "max_amount_per_payment": "1000000"}
        for network in (NETWORK, V1_NETWORK)]})
    return client


def pay_with_official_client(url: str, path: str, payer: LocalAccount, asset: str
                             ) -> httpx.Response:
    async def scenario() -> httpx.Response:
        async with x402HttpxClient(official_async_client(payer, asset), base_url=url,
                                   timeout=60) as http:
            return await http.get(path)

    return asyncio.run(scenario())


def decoded(value: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(base64.b64decode(value))
    return document


def test_the_official_x402_http_client_pays_once_and_the_books_agree(
        url: str, shop: Shop, payer: LocalAccount, runs: Counter[str]) -> None:
    before = balance(shop.devnet, payer.address)
    response = pay_with_official_client(url, "/report", payer, shop.terms.asset)
    assert response.status_code == 200, response.text
    assert response.json() == {"report": SECRET, "run": 1}
    settlement = decoded(response.headers["PAYMENT-RESPONSE"])
    assert settlement["success"] is True and settlement["network"] == NETWORK
    assert settlement["payer"].lower() == payer.address.lower()
    receipt = shop.verifier.verify_receipt(response.headers[RECEIPT_HEADER])
    assert receipt.amount == SEARCH_PRICE and receipt.claims["tool"] == "search"
    assert receipt.claims["transaction"] == settlement["transaction"]
    assert shop.received() == SEARCH_PRICE
    assert balance(shop.devnet, payer.address) == before - SEARCH_PRICE
    assert runs["report"] == 1 and len(shop.captured_calls("search")) == 1
    assert [row.status for row in shop.payment_rows()] == ["settled"]
    shop.assert_books_clean()


def test_a_request_without_token_or_payment_gets_both_challenges(
        url: str, shop: Shop, runs: Counter[str]) -> None:
    response = httpx.get(f"{url}/report?q=1")
    assert response.status_code == 402
    v2 = decoded(response.headers["PAYMENT-REQUIRED"])
    assert v2["x402Version"] == 2 and v2["resource"]["url"] == f"{url}/report?q=1"
    (option,) = v2["accepts"]
    assert (option["scheme"], option["network"], option["amount"]) == (
        "exact", NETWORK, str(SEARCH_PRICE))
    assert option["payTo"].lower() == shop.pay_to
    body = response.json()
    assert body["x402Version"] == 1 and body["code"] == "INVALID_CREDIT_TOKEN"
    assert body["reason"] == "missing" and body["error"] == body["message"]
    (legacy,) = body["accepts"]
    assert (legacy["network"], legacy["maxAmountRequired"]) == (V1_NETWORK, str(SEARCH_PRICE))
    assert legacy["resource"] == f"{url}/report?q=1"
    assert runs["report"] == 0 and shop.received() == 0


def test_a_token_over_budget_pays_with_x402_at_its_tenants_price(
        url: str, shop: Shop, payer: LocalAccount, runs: Counter[str]) -> None:
    from mcpbill_cli.clock import utcnow
    from mcpbill_cli.keys import KeyRing
    from tests.verifier.billing_support import fund, mint

    acme_price = SEARCH_PRICE // 2  # acme has 50% off
    fund(shop.engine, "acme", 1_000_000, now=utcnow())
    token = mint(shop.engine, KeyRing.load(shop.keys_dir), now=utcnow(), limit=1,
                 agent="acme-agent")
    refused = httpx.get(f"{url}/report", headers={TOKEN_HEADER: token.token})
    assert refused.status_code == 402
    assert refused.json()["code"] == "BUDGET_EXCEEDED" and "fallback" in refused.json()
    challenge = decoded(refused.headers["PAYMENT-REQUIRED"])
    assert challenge["accepts"][0]["amount"] == str(acme_price)

    async def scenario() -> httpx.Response:
        async with x402HttpxClient(official_async_client(payer, shop.terms.asset),
                                   base_url=url, timeout=60,
                                   headers={TOKEN_HEADER: token.token}) as http:
            return await http.get("/report")

    paid = asyncio.run(scenario())
    assert paid.status_code == 200, paid.text
    receipt = shop.verifier.verify_receipt(paid.headers[RECEIPT_HEADER])
    assert (receipt.amount, receipt.claims["tenant"], receipt.claims["payer"]) == (
        acme_price, "acme", "acme-agent")
    assert shop.received() == acme_price and runs["report"] == 1
    forged = httpx.get(f"{url}/report", headers={
        TOKEN_HEADER: "not.a.jwt", "PAYMENT-SIGNATURE": "e30="})
    assert forged.status_code == 401 and forged.json()["code"] == "INVALID_CREDIT_TOKEN"
    shop.assert_books_clean()


def test_a_v1_client_pays_with_x_payment(url: str, shop: Shop, payer: LocalAccount,
                                         runs: Counter[str]) -> None:
    challenge = httpx.get(f"{url}/report")
    required = PaymentRequiredV1.model_validate(challenge.json())
    client = official_client(payer, shop.terms.asset)
    payload = client.create_payment_payload(required)
    assert payload.x402_version == 1
    header = base64.b64encode(json.dumps(payload.model_dump(
        by_alias=True, exclude_none=True)).encode()).decode()
    response = httpx.get(f"{url}/report", headers={"X-PAYMENT": header})
    assert response.status_code == 200, response.text
    settlement = decoded(response.headers["X-PAYMENT-RESPONSE"])
    assert settlement["success"] is True and settlement["network"] == V1_NETWORK
    assert "PAYMENT-RESPONSE" not in response.headers
    shop.verifier.verify_receipt(response.headers[RECEIPT_HEADER])
    assert shop.received() == SEARCH_PRICE and runs["report"] == 1
    shop.assert_books_clean()


def test_a_reused_payment_header_replays_or_is_refused_and_settles_once(
        url: str, shop: Shop, payer: LocalAccount, runs: Counter[str]) -> None:
    metrics = shop.verifier.enable_metrics()
    challenge = httpx.get(f"{url}/report")
    v2 = decoded(challenge.headers["PAYMENT-REQUIRED"])
    payment = official_payment(official_client(payer, shop.terms.asset), v2)
    header = base64.b64encode(json.dumps(payment).encode()).decode()
    first = httpx.get(f"{url}/report", headers={"PAYMENT-SIGNATURE": header})
    again = httpx.get(f"{url}/report", headers={"PAYMENT-SIGNATURE": header})
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json() and again.headers[REPLAYED_HEADER] == "true"
    assert again.headers[RECEIPT_HEADER] == first.headers[RECEIPT_HEADER]
    assert again.headers["PAYMENT-RESPONSE"] == first.headers["PAYMENT-RESPONSE"]
    other = httpx.get(f"{url}/report?page=2", headers={"PAYMENT-SIGNATURE": header})
    assert other.status_code == 402 and other.json()["code"] == "X402_NONCE_USED"
    assert "PAYMENT-REQUIRED" in other.headers
    assert runs["report"] == 1 and shop.received() == SEARCH_PRICE
    assert len(shop.captured_calls("search")) == 1
    shop.assert_books_clean()
    counted = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
               for family in text_string_to_metric_families(metrics.text())
               for sample in family.samples if sample.labels.get("tool") == "search"
               and sample.name.endswith("_total") and sample.value}
    assert counted == {
        ("mcpbill_calls_total", (("outcome", "captured"), ("tool", "search"))): 1,
        ("mcpbill_calls_total", (("outcome", "replayed"), ("tool", "search"))): 1,
        ("mcpbill_calls_total", (("outcome", "refused"), ("tool", "search"))): 2,
        ("mcpbill_refusals_total", (("code", "INVALID_CREDIT_TOKEN"), ("tool", "search"))): 1,
        ("mcpbill_refusals_total", (("code", "X402_NONCE_USED"), ("tool", "search"))): 1,
        ("mcpbill_charged_micro_usdc_total", (("tool", "search"),)): SEARCH_PRICE,
    }


def test_a_payer_over_its_agent_rate_limit_gets_429_with_retry_after_and_no_challenge(
        shop: Shop, payer: LocalAccount, served: tuple[Switch, str],
        runs: Counter[str]) -> None:
    """A payer paying again and again meets ``[limits] agent_calls`` as its agent: 429 with
    ``Retry-After`` and no ``PAYMENT-REQUIRED`` (paying again would not help); the endpoint
    does not run and the payment is not taken."""
    pinned = utcnow()  # one window for both requests
    switch, url = served
    with rate_limited(shop, "1/m", clock=lambda: pinned) as limited:
        switch.app = shop_app(limited, runs)
        try:
            first = pay_with_official_client(url, "/report", payer, shop.terms.asset)
            v2 = decoded(httpx.get(f"{url}/report").headers["PAYMENT-REQUIRED"])
            payment = official_payment(official_client(payer, shop.terms.asset), v2)
            second = httpx.get(f"{url}/report", headers={
                "PAYMENT-SIGNATURE": base64.b64encode(json.dumps(payment).encode()).decode()})
        finally:
            switch.app = None

    assert first.status_code == 200, first.text
    assert second.status_code == 429 and second.json()["code"] == "RATE_LIMITED"
    assert second.json()["scope"] == "agent" and int(second.headers["Retry-After"]) >= 1
    assert "PAYMENT-REQUIRED" not in second.headers
    assert runs["report"] == 1 and shop.received() == SEARCH_PRICE
    assert [row.status for row in shop.payment_rows()] == ["settled"]


def test_an_error_status_releases_the_payment_and_moves_nothing(
        url: str, shop: Shop, payer: LocalAccount, runs: Counter[str]) -> None:
    response = pay_with_official_client(url, "/boom", payer, shop.terms.asset)
    assert response.status_code == 502 and response.json() == {"error": "upstream down"}
    assert "PAYMENT-RESPONSE" not in response.headers
    assert RECEIPT_HEADER not in response.headers
    assert runs["boom"] == 1 and shop.received() == 0
    assert [row.status for row in shop.payment_rows()] == ["released"]
    shop.assert_books_clean()


def test_a_failed_settlement_withholds_the_response(
        url: str, shop: Shop, payer: LocalAccount, runs: Counter[str]) -> None:
    response = pay_with_official_client(url, "/drain", payer, shop.terms.asset)
    assert runs["drain"] == 1  # it ran; then its payer moved the funds away
    assert response.status_code == 402
    assert SECRET not in response.text
    assert response.json()["code"] == "X402_SETTLEMENT_FAILED"
    failure = decoded(response.headers["PAYMENT-RESPONSE"])
    assert failure["success"] is False and failure["errorReason"] == "X402_SETTLEMENT_FAILED"
    assert RECEIPT_HEADER not in response.headers
    assert shop.received() == 0 and shop.captured_calls() == []
    assert [row.status for row in shop.payment_rows()] == ["failed"]
    shop.assert_books_clean()


@pytest.mark.parametrize("cut", ["task", "ledger"])
def test_a_request_cut_off_while_its_payment_is_recorded_is_paid_once(
        shop: Shop, payer: LocalAccount, runs: Counter[str], cut: str) -> None:
    """The payment of a paid request is on chain and its record waits for the ledger; then
    either the task serving the request is cancelled (``task``: a plain ``task.cancel()``, the
    server stopping), or PostgreSQL cuts the ledger connection recording it (``ledger``).

    - ``task``: the worker records the payment all the same as soon as the ledger is free,
      not later by ``Acceptor.recover()``, and counts the call ``captured``; the same header
      replays the kept response.
    - ``ledger``: the payer has paid, so the response is its due: 200 with ``PAYMENT-RESPONSE``
      and no receipt yet. ``Acceptor.recover()`` records the payment once; the same header
      then gets DUPLICATE_CALL with the receipt (no response was kept)."""
    if cut == "ledger" and shop.engine.dialect.name != "postgresql":
        pytest.skip("cuts the ledger's connection from the PostgreSQL server")
    metrics = shop.verifier.enable_metrics()
    held = Held()
    app = shop_app(shop, runs, held=held)

    def statuses() -> list[str]:
        return [row.status for row in shop.payment_rows()]

    async def until(done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 30
        while not done():
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.1)

    async def scenario() -> tuple[httpx.Response | None, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://shop", timeout=60) as http:
            v2 = decoded((await http.get("/held")).headers["PAYMENT-REQUIRED"])
            payment = official_payment(official_client(payer, shop.terms.asset), v2)
            header = {"PAYMENT-SIGNATURE": base64.b64encode(json.dumps(payment).encode()).decode()}
            request = asyncio.create_task(http.get("/held", headers=header))
            assert await asyncio.to_thread(held.entered.wait, 30)
            answered = None
            with ledger_locked(shop.engine):
                held.release.set()
                await until(lambda: shop.received() > 0, "never settled on chain")
                if cut == "task":
                    await asyncio.sleep(0.5)  # recording: waiting for the ledger
                    assert statuses() == ["reserved"]
                    request.cancel()
                    with suppress(asyncio.CancelledError):
                        await request
                else:
                    await until(lambda: recording_waits(shop.engine), "never recorded")
                    cut_recording(shop.engine)
                    answered = await request
            if cut == "task":
                await until(lambda: statuses() != ["reserved"], "left for recover()")
            else:
                assert statuses() == ["reserved"]
                assert len(shop.acceptor.recover(older_than=0)) == 1
            return answered, await http.get("/held", headers=header)

    answered, again = asyncio.run(scenario())
    assert statuses() == ["settled"] and shop.received() == SEARCH_PRICE
    assert runs["held"] == 1 and len(shop.captured_calls("search")) == 1
    if cut == "task":
        assert again.status_code == 200 and again.headers[REPLAYED_HEADER] == "true", again.text
        assert again.json() == {"held": True}
    else:
        assert answered is not None and answered.status_code == 200, answered.text
        assert answered.json() == {"held": True} and RECEIPT_HEADER not in answered.headers
        settlement = decoded(answered.headers["PAYMENT-RESPONSE"])
        assert settlement["success"] is True and settlement["payer"] == payer.address.lower()
        assert again.status_code == 409 and again.json()["code"] == "DUPLICATE_CALL"
        assert decoded(again.headers["PAYMENT-RESPONSE"]) == settlement
    receipt = shop.verifier.verify_receipt(again.headers[RECEIPT_HEADER])
    assert receipt.amount == SEARCH_PRICE
    sample = metrics.registry.get_sample_value
    counted = {outcome: sample("mcpbill_calls_total", {"tool": "search", "outcome": outcome})
               for outcome in ("captured", "voided", "refused", "replayed")}
    assert counted == {"captured": 1, "voided": None, "refused": 1, "replayed": 1}
    assert sample("mcpbill_charged_micro_usdc_total", {"tool": "search"}) == SEARCH_PRICE
    shop.assert_books_clean()


def test_a_payer_without_funds_is_refused_before_the_endpoint_runs(
        url: str, shop: Shop, peer: Peer, runs: Counter[str]) -> None:
    broke = new_payer(peer.devnet, amount=SEARCH_PRICE - 1)
    response = pay_with_official_client(url, "/report", broke, shop.terms.asset)
    assert response.status_code == 402
    assert response.json()["code"] == "X402_INSUFFICIENT_FUNDS"
    assert runs["report"] == 0 and shop.received() == 0


def test_a_tool_without_x402_has_no_challenge_and_refuses_payments(
        url: str, shop: Shop, payer: LocalAccount, runs: Counter[str]) -> None:
    plain = httpx.get(f"{url}/premium")
    assert plain.status_code == 401 and "PAYMENT-REQUIRED" not in plain.headers
    v2 = decoded(httpx.get(f"{url}/report").headers["PAYMENT-REQUIRED"])
    payment = official_payment(official_client(payer, shop.terms.asset), v2)
    header = base64.b64encode(json.dumps(payment).encode()).decode()
    refused = httpx.get(f"{url}/premium", headers={"PAYMENT-SIGNATURE": header})
    assert refused.status_code == 402 and refused.json()["reason"] == "not_offered"
    assert "PAYMENT-REQUIRED" not in refused.headers
    assert httpx.get(f"{url}/status").json() == {"status": "ok"}  # free: no payment asked
    assert runs["premium"] == 0 and shop.received() == 0


def test_facilitator_down_the_endpoint_does_not_run(
        engine: Engine, keys_dir: Path, peer: Peer, fuji_anvil: str, payer: LocalAccount,
        served: tuple[Switch, str]) -> None:
    shop = make_shop(engine, keys_dir, peer, fuji_anvil,
                     settler=FacilitatorSettler("http://127.0.0.1:9", timeout=2))
    runs: Counter[str] = Counter()
    switch, url = served
    switch.app = shop_app(shop, runs)
    try:
        response = pay_with_official_client(url, "/report", payer, shop.terms.asset)
    finally:
        switch.app = None
        shop.verifier.close()
    assert response.status_code == 402
    assert response.json()["code"] == "X402_FACILITATOR_UNAVAILABLE"
    assert runs["report"] == 0 and shop.received() == 0


def test_the_example_takes_x402_payments_on_a_post(
        shop: Shop, payer: LocalAccount, served: tuple[Switch, str]) -> None:
    from .test_example import load_example

    switch, url = served
    switch.app = load_example().build_app(shop.verifier, shop.acceptor)

    async def scenario() -> httpx.Response:
        async with x402HttpxClient(official_async_client(payer, shop.terms.asset),
                                   base_url=url, timeout=60) as http:
            return await http.post("/search", json={"q": "usdc"})

    try:
        response = asyncio.run(scenario())
    finally:
        switch.app = None
    assert response.status_code == 200, response.text
    assert response.json()["results"][0] == "usdc: result 1"
    assert shop.verifier.verify_receipt(response.headers[RECEIPT_HEADER]).amount == SEARCH_PRICE
    assert shop.received() == SEARCH_PRICE
    shop.assert_books_clean()


def test_a_payment_for_the_wrong_amount_is_refused_with_a_fresh_challenge(
        url: str, shop: Shop, payer: LocalAccount, runs: Counter[str]) -> None:
    from tests.x402.accepting import signed_payment

    payment = signed_payment(payer, shop.terms, amount=SEARCH_PRICE - 1)
    header = base64.b64encode(json.dumps(payment).encode()).decode()
    response = httpx.get(f"{url}/report", headers={"PAYMENT-SIGNATURE": header})
    assert response.status_code == 402
    assert (response.json()["code"], response.json()["reason"]) == (
        "X402_PAYMENT_INVALID", "amount")
    assert decoded(response.headers["PAYMENT-REQUIRED"])["accepts"][0]["amount"] == str(
        SEARCH_PRICE)
    assert runs["report"] == 0 and shop.received() == 0 and shop.payment_rows() == []


def replica_of(shop: Shop) -> Shop:
    """Another server on the same ledger, chain and deposit address: its own verifier and
    acceptor."""
    verifier = Verifier(keys=KeySource(directory=shop.keys_dir),
                        pricing=PricingTable.from_document(ACCEPT_PRICING), engine=shop.engine)
    acceptor = Acceptor(verifier, chain=shop.acceptor.chain, pay_to=shop.pay_to,
                        rpc=shop.acceptor.rpc, settler=shop.acceptor.settler)
    return Shop(acceptor, verifier, shop.engine, shop.devnet, shop.pay_to, shop.keys_dir)


def test_one_payment_sent_to_two_replicas_at_once_settles_once(
        shop: Shop, payer: LocalAccount, served: tuple[Switch, str]) -> None:
    """Two servers on one ledger, the same payment header at both while the first runs."""
    from tests.x402.peer import ServedApp

    second = replica_of(shop)
    held = Held()
    runs: Counter[str] = Counter()
    switch, url_one = served
    switch.app = shop_app(shop, runs, held=held)
    other = ServedApp(shop_app(second, runs, held=held))
    url_two = other.start()
    try:
        v2 = decoded(httpx.get(f"{url_one}/report").headers["PAYMENT-REQUIRED"])
        payment = official_payment(official_client(payer, shop.terms.asset), v2)
        header = {"PAYMENT-SIGNATURE": base64.b64encode(json.dumps(payment).encode()).decode()}
        answers: list[httpx.Response] = []
        running = threading.Thread(target=lambda: answers.append(
            httpx.get(f"{url_one}/held", headers=header, timeout=60)))
        running.start()
        assert held.entered.wait(30)
        at_the_same_time = httpx.get(f"{url_two}/held", headers=header, timeout=60)
        held.release.set()
        running.join(60)
    finally:
        held.release.set()
        switch.app = None
        other.stop()
        second.verifier.close()
    assert at_the_same_time.status_code == 409
    assert at_the_same_time.json()["code"] == "CALL_IN_PROGRESS"
    assert at_the_same_time.headers["retry-after"] == "1"
    assert answers[0].status_code == 200 and runs["held"] == 1
    assert shop.received() == SEARCH_PRICE and len(shop.captured_calls("search")) == 1
    shop.assert_books_clean()

"""x402 through `mcpbill proxy`, as the embedded extension takes it: the reference server as the
upstream over stdio, the official ``mcp`` client as the agent, the official ``x402`` client
signing the payment from the proxy's challenge, mcpbill settling it on anvil. Billed once, the
upstream called once; the payment reused for another call is X402_NONCE_USED; a call the
upstream fails, or the agent cancels while its payment is reserved, releases the payment at once;
the upstream never sees it. A payment sent on a 2026-07-28 round that ends in
``input_required`` is released and pays the round that completes."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, ElicitResult, InputRequiredResult
from x402.mcp.utils import extract_payment_required_from_result

from mcpbill_cli.keys import KeySource
from mcpbill_cli.ledger.engine import writing
from mcpbill_cli.mcp import RECEIPT_META, REPLAYED_META
from mcpbill_cli.mcp.x402 import PAYMENT_META, PAYMENT_RESPONSE_META
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.proxy import Limits, Proxy, Upstream, UpstreamTarget, build_app
from mcpbill_cli.verifier import Verifier
from mcpbill_cli.x402.accept import Acceptor
from tests.mcp.conftest import serve
from tests.wallet.conftest import token_build  # noqa: F401 - the session's compiled test USDC
from tests.x402 import conftest as x402_fixtures  # first: accepting.py imports it
from tests.x402.accepting import (  # noqa: F401 - the shop and its chain, as fixtures
    ACCEPT_PRICING,
    Shop,
    balance,
    gas_account,
    new_payer,
    official_client,
    official_payment,
    shop,
)
from tests.x402.peer import NETWORK
from tests.x402.test_accept_mcp import as_x402

from .conftest import agent, stdio_target
from .test_cut_off import LONG, MODES, CutOff, agent_on, handling_tasks, ledger_locked
from .test_input_required import QUESTION, upstream_server

# The x402 tests' session chain and keys, as fixtures here.
fuji_anvil = x402_fixtures.fuji_anvil
peer = x402_fixtures.peer
keys_dir = x402_fixtures.keys_dir

ECHO_PRICE = 10_000  # 0.01 USDC
LONG_ARGS = {"duration": 2, "steps": 4}
RELEASED_WITHIN = 10.0  # seconds: well before Acceptor.recover would release a payment
PROXY_PRICING: dict[str, Any] = {**ACCEPT_PRICING, "tools": {
    "echo": {"price": "0.01"}, "get-sum": {"price": "0"}, LONG: {"price": "0.01"},
    "get-env": {"price": "0.01", "x402": False}}}


@pytest.fixture
def x402_proxy(shop: Shop, tmp_path: Path) -> Iterator[tuple[Proxy, Shop]]:  # noqa: F811
    """The proxy taking x402 for the reference server's tools, served on ``proxy.url``: (the
    proxy, its shop)."""
    a = shop.acceptor
    verifier = Verifier(keys=KeySource(directory=shop.keys_dir), engine=shop.engine,
                        pricing=PricingTable.from_document(PROXY_PRICING), metrics=True)
    acceptor = Acceptor(verifier, chain=a.chain, pay_to=a.pay_to, rpc=a.rpc, settler=a.settler)
    with (tmp_path / "upstream.log").open("w") as errlog:
        upstream = Upstream(stdio_target(tmp_path / "upstream.pid"), errlog=errlog)
        proxy = Proxy(verifier, upstream, Limits(call_timeout=30), acceptor=acceptor)
        try:
            with serve(build_app(proxy)) as url:
                proxy.url = url  # type: ignore[attr-defined]
                yield proxy, replace(shop, acceptor=acceptor, verifier=verifier)
        finally:
            verifier.close()


@pytest.fixture
def proxied(x402_proxy: tuple[Proxy, Shop]) -> tuple[str, Shop]:
    """The proxy taking x402 for the reference server's tools: (its URL, its shop)."""
    proxy, books = x402_proxy
    return str(proxy.url), books  # type: ignore[attr-defined]


@pytest.fixture
def proxied_orders(shop: Shop) -> Iterator[tuple[str, Shop]]:  # noqa: F811
    """The proxy taking x402 (with metrics) in front of a 2026-07-28 upstream whose ``confirm``
    asks the agent first: (its URL, its shop)."""
    a = shop.acceptor
    pricing = {**PROXY_PRICING, "tools": {"confirm": {"price": "0.01"}}}
    verifier = Verifier(keys=KeySource(directory=shop.keys_dir), engine=shop.engine,
                        pricing=PricingTable.from_document(pricing), metrics=True)
    acceptor = Acceptor(verifier, chain=a.chain, pay_to=a.pay_to, rpc=a.rpc, settler=a.settler)
    try:
        with serve(upstream_server().streamable_http_app()) as upstream_url:
            upstream = Upstream(UpstreamTarget.parse(command=None, url=upstream_url))
            proxy = Proxy(verifier, upstream, Limits(call_timeout=30), acceptor=acceptor)
            with serve(build_app(proxy)) as url:
                yield url, replace(shop, acceptor=acceptor, verifier=verifier)
    finally:
        verifier.close()


def call(url: str, tool: str, args: dict[str, Any],
         meta: dict[str, Any] | None = None) -> CallToolResult:
    async def run() -> CallToolResult:
        async with agent(url, None) as client:
            return await client.call(tool, args, meta=meta or {})

    return anyio.run(run)


def challenge_of(result: CallToolResult) -> dict[str, Any]:
    offer = extract_payment_required_from_result(as_x402(result))
    assert offer is not None, result
    return offer.model_dump(by_alias=True, exclude_none=True)


def code_of(result: CallToolResult) -> str:
    assert result.is_error, result
    return str(json.loads(result.content[0].text)["code"])  # type: ignore[union-attr]


def test_an_x402_agent_pays_through_the_proxy_once(proxied: tuple[str, Shop]) -> None:
    url, books = proxied
    payer = new_payer(books.devnet)
    challenged = call(url, "echo", {"message": "paid by x402"})
    assert code_of(challenged) == "INVALID_CREDIT_TOKEN"  # and the challenge beside it
    payment = official_payment(official_client(payer, books.devnet.chain.usdc),
                               challenge_of(challenged))

    paid = call(url, "echo", {"message": "paid by x402"}, {PAYMENT_META: payment})
    again = call(url, "echo", {"message": "paid by x402"}, {PAYMENT_META: payment})  # resent
    reused = call(url, "echo", {"message": "another call"}, {PAYMENT_META: payment})

    assert not paid.is_error and paid.content[0].text == "Echo: paid by x402"  # type: ignore[union-attr]
    settlement = (paid.meta or {})[PAYMENT_RESPONSE_META]
    assert settlement["success"] is True and settlement["network"] == NETWORK
    assert settlement["payer"] == payer.address.lower()
    receipt = books.verifier.verify_receipt((paid.meta or {})[RECEIPT_META]["jws"])
    assert receipt.amount == ECHO_PRICE and receipt.claims["tool"] == "echo"
    assert receipt.claims["transaction"] == settlement["transaction"]
    assert not again.is_error and (again.meta or {})[PAYMENT_RESPONSE_META] == settlement
    assert code_of(reused) == "X402_NONCE_USED"
    challenge_of(reused)  # with a fresh challenge

    assert books.received() == ECHO_PRICE
    assert balance(books.devnet, payer.address) == 1_000_000 - ECHO_PRICE
    assert [row.status for row in books.payment_rows()] == ["settled"]
    assert len(books.captured_calls("echo")) == 1
    books.assert_books_clean()


def test_an_upstream_error_releases_the_payment(proxied: tuple[str, Shop]) -> None:
    url, books = proxied
    payer = new_payer(books.devnet)
    payment = official_payment(official_client(payer, books.devnet.chain.usdc),
                               challenge_of(call(url, "echo", {"message": 5})))

    failed = call(url, "echo", {"message": 5}, {PAYMENT_META: payment})  # the upstream refuses

    assert failed.is_error and "Input validation error" in str(failed.content)
    assert PAYMENT_RESPONSE_META not in (failed.meta or {})
    assert books.received() == 0 and balance(books.devnet, payer.address) == 1_000_000
    assert books.captured_calls() == []
    assert [row.status for row in books.payment_rows()] in ([], ["released"])
    books.assert_books_clean()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # a write lock holds the reserve
@pytest.mark.parametrize("mode", MODES)
def test_a_payment_reserved_for_a_call_cancelled_meanwhile_is_released_at_once(
        proxied: tuple[str, Shop], mode: str) -> None:
    url, books = proxied
    payer = new_payer(books.devnet)
    client = official_client(payer, books.devnet.chain.usdc)
    challenge = challenge_of(call(url, "echo", {"message": "cut off"}))
    cut_off = official_payment(client, challenge)

    async def cancel_while_reserving() -> None:
        async with httpx2.AsyncClient(timeout=60) as web, \
                Client(streamable_http_client(url, http_client=web), mode=mode,
                       cache=None) as session:
            async def paid_call() -> None:
                await session.call_tool("echo", {"message": "cut off"},
                                        meta={PAYMENT_META: cut_off})  # type: ignore[arg-type]
                raise AssertionError("the cancelled call was answered")

            with writing(books.engine):  # the ledger is locked: the reserve waits for it
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(paid_call)
                    await anyio.sleep(2)  # the proxy has verified the payment and is reserving
                    tasks.cancel_scope.cancel()
                await anyio.sleep(1)  # the cancellation reaches the proxy
            deadline = time.monotonic() + RELEASED_WITHIN
            while [row.status for row in books.payment_rows()] != ["released"] \
                    or calls_ended(books, "echo") != {"refused": 1, "voided": 1}:
                assert time.monotonic() < deadline, (books.payment_rows(),
                                                     calls_ended(books, "echo"))
                await anyio.sleep(0.1)

    anyio.run(cancel_while_reserving)
    assert books.received() == 0 and balance(books.devnet, payer.address) == 1_000_000
    assert books.captured_calls() == []

    paid = call(url, "echo", {"message": "paid again"},
                {PAYMENT_META: official_payment(client, challenge)})  # a new authorization
    assert not paid.is_error and paid.content[0].text == "Echo: paid again"  # type: ignore[union-attr]
    assert [row.status for row in books.payment_rows()] == ["released", "settled"]
    assert books.received() == ECHO_PRICE  # the second payment alone, settled once
    assert calls_ended(books, "echo") == {"refused": 1, "voided": 1, "captured": 1}
    books.assert_books_clean()


def calls_ended(books: Shop, tool: str) -> dict[str, float]:
    """The verifier's ``mcpbill_calls_total`` for ``tool``, by outcome (those counted; the
    challenge a payment is signed from counts as ``refused``)."""
    assert books.verifier.metrics is not None
    sample = books.verifier.metrics.registry.get_sample_value
    counted = {outcome: sample("mcpbill_calls_total", {"tool": tool, "outcome": outcome})
               for outcome in ("captured", "voided", "refused", "replayed")}
    return {outcome: n for outcome, n in counted.items() if n}


@pytest.mark.parametrize("point", ["reserve", "upstream", "settle"])
def test_a_plain_task_cancel_at_each_step_of_an_x402_paid_call_settles_its_payment_once(
        x402_proxy: tuple[Proxy, Shop], point: str) -> None:
    """The task handling an x402-paid call is cancelled with a plain ``task.cancel()`` (no
    anyio scope: the shields do not hold it back, and the ledger work goes on on its worker
    thread) while its payment is reserved, while the upstream runs it, or once it settled on
    chain and waits for the ledger to record it. The payment ends released, or (settlement
    had started) settled once with the call captured, and a retry replays it: never left
    reserved, never paid without a receipt. A released payment pays its retry once."""
    proxy, books = x402_proxy
    url = str(proxy.url)  # type: ignore[attr-defined]
    payer = new_payer(books.devnet)
    payment = official_payment(official_client(payer, books.devnet.chain.usdc),
                               challenge_of(call(url, LONG, LONG_ARGS)))
    step = PaidStep(books=books, handling=handling_tasks(proxy))

    async def cancel_at_point() -> None:
        async with agent_on(url, "legacy") as session:

            async def paid_call() -> None:
                with suppress(MCPError):  # the cut-off handling may close the request's stream
                    await session.call_tool(LONG, LONG_ARGS, meta={PAYMENT_META: payment},  # type: ignore[arg-type]
                                            progress_callback=step.progress)

            await step.cancelled_at(point, paid_call, settled_or_released)

    async def settled_or_released() -> None:
        deadline = time.monotonic() + RELEASED_WITHIN
        while [row.status for row in books.payment_rows()] in ([], ["reserved"]):
            assert time.monotonic() < deadline, "left reserved"
            await anyio.sleep(0.1)

    anyio.run(cancel_at_point)
    statuses = [row.status for row in books.payment_rows()]
    received = books.received()
    retried = call(url, LONG, LONG_ARGS, {PAYMENT_META: payment})

    if point == "settle":  # too late to cancel: paid once, and the retry replays its receipt
        assert statuses == ["settled"] and received == ECHO_PRICE
        assert (retried.meta or {}).get(REPLAYED_META) is True
        assert calls_ended(books, LONG) == {"refused": 1, "captured": 1, "replayed": 1}
    else:  # released, nothing moved; the retry pays its own call
        assert statuses == ["released"] and received == 0
        assert REPLAYED_META not in (retried.meta or {})
        assert calls_ended(books, LONG) == {"refused": 1, "voided": 1, "captured": 1}
    assert not retried.is_error, retried
    receipt = books.verifier.verify_receipt((retried.meta or {})[RECEIPT_META]["jws"])
    assert receipt.amount == ECHO_PRICE
    assert [row.status for row in books.payment_rows()] == ["settled"]
    assert books.received() == ECHO_PRICE  # settled once, on chain
    assert balance(books.devnet, payer.address) == 1_000_000 - ECHO_PRICE
    assert len(books.captured_calls(LONG)) == 1
    books.assert_books_clean()


@dataclass(kw_only=True)
class PaidStep(CutOff):
    """Where an x402-paid call of LONG is in the proxy, for a test to cancel it there: each
    method returns once the call is at its step (``lock`` keeps the ledger locked when it must
    wait)."""

    books: Shop

    async def reserve(self) -> None:
        """Its payment, verified, waits for the ledger to reserve it."""
        self.lock.enter_context(ledger_locked(self.books.engine))
        while not self.handling:
            await anyio.sleep(0.05)
        await anyio.sleep(1)  # verified, and reserving
        assert self.books.payment_rows() == []

    async def upstream(self) -> None:
        """The upstream runs it."""
        await self.running.wait()

    async def settle(self) -> None:
        """The upstream answered and the payment is on chain; its record waits for the
        ledger."""
        await self.running.wait()
        self.lock.enter_context(ledger_locked(self.books.engine))
        while self.books.received() == 0:
            await anyio.sleep(0.1)
        await anyio.sleep(0.5)  # recording
        assert [row.status for row in self.books.payment_rows()] == ["reserved"]


def test_a_tool_without_x402_offers_no_challenge(proxied: tuple[str, Shop]) -> None:
    url, _ = proxied
    refused = call(url, "get-env", {})
    assert code_of(refused) == "INVALID_CREDIT_TOKEN"
    assert extract_payment_required_from_result(as_x402(refused)) is None


def test_a_payment_released_at_input_required_pays_the_round_that_completes(
        proxied_orders: tuple[str, Shop]) -> None:
    url, books = proxied_orders
    payer = new_payer(books.devnet)
    order = {"order": "X-1"}

    async def run() -> tuple[InputRequiredResult, list[str], Any]:
        async with httpx2.AsyncClient(timeout=60) as web, \
                Client(streamable_http_client(url, http_client=web), mode="2026-07-28",
                       cache=None) as client:
            unpaid = await client.session.call_tool("confirm", order)
            meta: Any = {PAYMENT_META: official_payment(
                official_client(payer, books.devnet.chain.usdc), challenge_of(unpaid))}
            asked = await client.session.call_tool("confirm", order, meta=meta,
                                                   allow_input_required=True)
            assert isinstance(asked, InputRequiredResult), asked
            statuses = [row.status for row in books.payment_rows()]
            done = await client.session.call_tool(
                "confirm", order, meta=meta, allow_input_required=True,
                input_responses={"ship": ElicitResult(action="accept", content={"ship": True})},
                request_state=asked.request_state)
            return asked, statuses, done

    asked, statuses, done = anyio.run(run)

    assert asked.input_requests == {"ship": QUESTION} and statuses == ["released"]
    assert not done.is_error and done.content[0].text == "X-1: shipped"  # type: ignore[union-attr]
    settlement = (done.meta or {})[PAYMENT_RESPONSE_META]
    assert settlement["success"] is True and settlement["payer"] == payer.address.lower()
    receipt = books.verifier.verify_receipt((done.meta or {})[RECEIPT_META]["jws"])
    assert receipt.amount == ECHO_PRICE and receipt.claims["tool"] == "confirm"
    assert receipt.claims["transaction"] == settlement["transaction"]
    assert [row.status for row in books.payment_rows()] == ["settled"]
    assert books.received() == ECHO_PRICE  # settled once, on chain
    assert balance(books.devnet, payer.address) == 1_000_000 - ECHO_PRICE
    assert len(books.captured_calls("confirm")) == 1
    books.assert_books_clean()
    assert books.verifier.metrics is not None
    sample = books.verifier.metrics.registry.get_sample_value
    assert [sample("mcpbill_calls_total", {"tool": "confirm", "outcome": outcome})
            for outcome in ("input_required", "captured", "voided")] == [1, 1, None]
    assert sample("mcpbill_charged_micro_usdc_total", {"tool": "confirm"}) == ECHO_PRICE

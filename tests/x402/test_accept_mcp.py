"""x402 payments for billed MCP tools, end to end: the official ``mcp`` client calls a real
``MCPServer`` with the billing extension; the official ``x402`` client reads the challenge from
the tool result (its own MCP helpers) and signs the payment; the server settles on anvil."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from mcp.client import Client
from mcp.server.mcpserver import Context, MCPServer
from mcp_types import (
    CallToolResult,
    ElicitRequest,
    ElicitRequestFormParams,
    ElicitResult,
    InputRequiredResult,
)
from x402.mcp.types import MCPToolResult
from x402.mcp.utils import extract_payment_required_from_result

from mcpbill_cli.clock import utcnow
from mcpbill_cli.keys import KeyRing
from mcpbill_cli.ledger import credit
from mcpbill_cli.ledger.engine import writing
from mcpbill_cli.mcp import RECEIPT_META, TOKEN_META, Billing
from mcpbill_cli.mcp.x402 import PAYMENT_META, PAYMENT_RESPONSE_META
from mcpbill_cli.wallet.addresses import checksum_address
from tests.proxy.test_cut_off import ledger_locked
from tests.verifier.billing_support import fund, mint

from .accepting import (
    SEARCH_PRICE,
    Shop,
    balance,
    cut_recording,
    new_payer,
    official_client,
    official_payment,
    rate_limited,
    recording_waits,
    signed_payment,
)
from .peer import NETWORK

SURE = ElicitRequest(params=ElicitRequestFormParams(
    message="Search now?", requested_schema={"type": "object", "properties": {}}))
YES = ElicitResult(action="accept", content={})


@dataclass
class Tools:
    """What the paid tools did: every run, by tool."""

    runs: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def count(self, tool: str) -> int:
        return sum(1 for name, _ in self.runs if name == tool)


@pytest.fixture
def tools() -> Tools:
    return Tools()


@pytest.fixture
def server(shop: Shop, tools: Tools) -> MCPServer:
    billing = Billing(shop.verifier, acceptor=shop.acceptor)
    server: MCPServer = MCPServer("paid", extensions=[billing])

    @billing.tool(server)
    def search(q: str) -> list[str]:
        tools.runs.append(("search", {"q": q}))
        return [f"{q}: result {n}" for n in (1, 2)]

    @billing.tool(server)
    async def boom(q: str) -> str:
        tools.runs.append(("boom", {"q": q}))
        raise ValueError("the tool failed")

    @billing.tool(server)
    def premium(q: str) -> str:
        tools.runs.append(("premium", {"q": q}))
        return "premium"

    return server


def call(server: MCPServer, tool: str, args: dict[str, Any],
         meta: dict[str, Any] | None = None) -> CallToolResult:
    async def run() -> CallToolResult:
        async with Client(server) as client:
            return await client.call_tool(tool, args, meta=meta)  # type: ignore[arg-type]

    return anyio.run(run)


def as_x402(result: CallToolResult) -> MCPToolResult:
    """The tool result as the x402 package's MCP helpers read it."""
    return MCPToolResult(content=[item.model_dump(by_alias=True) for item in result.content],
                         is_error=bool(result.is_error), meta=dict(result.meta or {}),
                         structured_content=result.structured_content)


def body(result: CallToolResult) -> dict[str, Any]:
    """The refusal an agent reads from ``content[0].text``, checked against the rest."""
    assert result.is_error, result
    document: dict[str, Any] = json.loads(result.content[0].text)  # type: ignore[union-attr]
    assert result.structured_content == document
    assert RECEIPT_META not in (result.meta or {}) and PAYMENT_RESPONSE_META not in (
        result.meta or {})
    return document


def pay(server: MCPServer, shop: Shop, payer: Any, tool: str = "search",
        args: dict[str, Any] | None = None) -> tuple[CallToolResult, dict[str, Any]]:
    """An x402 agent's two calls: unpaid, then paid for the challenge it got."""
    args = args or {"q": "usdc"}
    challenge = extract_payment_required_from_result(as_x402(call(server, tool, args)))
    assert challenge is not None
    payment = official_payment(official_client(payer, shop.devnet.chain.usdc),
                               challenge.model_dump(by_alias=True, exclude_none=True))
    return call(server, tool, args, {PAYMENT_META: payment}), payment


def test_an_unpaid_call_answers_an_x402_challenge_beside_the_mcpbill_refusal(
        server: MCPServer, shop: Shop, tools: Tools) -> None:
    refused = body(call(server, "search", {"q": "x"}))

    assert (refused["code"], refused["reason"]) == ("INVALID_CREDIT_TOKEN", "missing")
    assert refused["x402Version"] == 2 and refused["error"] == refused["message"]
    assert refused["resource"]["url"] == "mcp://tool/search"
    assert refused["accepts"] == [{
        "scheme": "exact", "network": NETWORK, "amount": str(SEARCH_PRICE),
        "asset": checksum_address(shop.devnet.chain.usdc),
                     "payTo": checksum_address(shop.pay_to), "maxTimeoutSeconds": 60,
        "extra": {"name": "USD Coin", "version": "2"}}]
    assert tools.runs == []


def test_an_x402_agent_pays_once_and_the_tool_runs_once(server: MCPServer, shop: Shop,
                                                        tools: Tools) -> None:
    payer = new_payer(shop.devnet)

    result, _ = pay(server, shop, payer)

    assert not result.is_error, result
    assert result.structured_content == {"result": ["usdc: result 1", "usdc: result 2"]}
    assert tools.count("search") == 1
    settlement = (result.meta or {})[PAYMENT_RESPONSE_META]
    assert settlement["success"] is True and settlement["network"] == NETWORK
    assert settlement["payer"] == payer.address.lower()
    receipt = shop.verifier.verify_receipt((result.meta or {})[RECEIPT_META]["jws"])
    assert receipt.amount == SEARCH_PRICE
    assert receipt.claims["transaction"] == settlement["transaction"]
    assert shop.received() == SEARCH_PRICE
    assert balance(shop.devnet, payer.address) == 1_000_000 - SEARCH_PRICE
    shop.assert_books_clean()


def test_a_retried_paid_call_replays_without_running_or_paying_again(
        server: MCPServer, shop: Shop, tools: Tools) -> None:
    payer = new_payer(shop.devnet)
    first, payment = pay(server, shop, payer)

    again = call(server, "search", {"q": "usdc"}, {PAYMENT_META: payment})

    assert not again.is_error and again.structured_content == first.structured_content
    assert (again.meta or {})[PAYMENT_RESPONSE_META] == (first.meta or {})[
        PAYMENT_RESPONSE_META]
    assert tools.count("search") == 1 and shop.received() == SEARCH_PRICE
    other = body(call(server, "search", {"q": "another call"}, {PAYMENT_META: payment}))
    assert other["code"] == "X402_NONCE_USED" and "accepts" in other
    assert tools.count("search") == 1


def test_a_wrong_payment_is_refused_with_a_fresh_challenge_and_the_tool_never_runs(
        server: MCPServer, shop: Shop, tools: Tools) -> None:
    payer = new_payer(shop.devnet)
    cheap = signed_payment(payer, shop.terms, amount=SEARCH_PRICE - 1)

    refused = body(call(server, "search", {"q": "x"}, {PAYMENT_META: cheap}))

    assert (refused["code"], refused["reason"]) == ("X402_PAYMENT_INVALID", "amount")
    assert refused["accepts"][0]["amount"] == str(SEARCH_PRICE)
    assert tools.runs == [] and shop.received() == 0 and shop.payment_rows() == []


def test_a_payer_over_its_agent_rate_limit_is_refused_with_no_challenge_and_nothing_runs(
        shop: Shop, tools: Tools) -> None:
    """An agent paying with x402 in a loop meets ``[limits] agent_calls`` as its payer: the
    refusal is RATE_LIMITED with ``retryAfterMs`` and no ``PaymentRequired`` (another payment
    would not help), the tool does not run and nothing moves."""
    pinned = utcnow()  # one window for both calls
    payer = new_payer(shop.devnet)
    with rate_limited(shop, "1/m", clock=lambda: pinned) as books:
        billing = Billing(books.verifier, acceptor=books.acceptor)
        limited: MCPServer = MCPServer("limited", extensions=[billing])

        @billing.tool(limited)
        def search(q: str) -> str:
            tools.runs.append(("search", {"q": q}))
            return q

        first, second = (call(limited, "search", {"q": q}, {PAYMENT_META: signed_payment(
            payer, shop.terms, amount=SEARCH_PRICE)}) for q in "ab")
    refused = body(second)

    assert not first.is_error, first
    assert (refused["code"], refused["scope"], refused["limit"]) == ("RATE_LIMITED", "agent",
                                                                     "1/m")
    assert 0 < refused["retryAfterMs"] <= 60_000
    assert "accepts" not in refused and "x402Version" not in refused
    assert tools.runs == [("search", {"q": "a"})]
    assert shop.received() == SEARCH_PRICE
    assert [row.status for row in shop.payment_rows()] == ["settled"]


def test_a_payment_settled_that_the_ledger_fails_to_record_still_returns_the_result(
        shop: Shop) -> None:
    """The ledger's connection is cut (PostgreSQL terminates it) while a call paid with x402
    is being recorded, after its payment settled on chain. The payer has paid: it gets the
    tool's result with the settlement (no receipt yet), not a refusal with a fresh challenge
    that would have it pay twice. ``Acceptor.recover()`` records the payment once, later, and
    the same payment then replays the call without running it or moving money again."""
    if shop.engine.dialect.name != "postgresql":
        pytest.skip("cuts the ledger's connection from the PostgreSQL server")
    metrics = shop.verifier.enable_metrics()
    billing = Billing(shop.verifier, acceptor=shop.acceptor)
    server: MCPServer = MCPServer("paid", extensions=[billing])
    entered, release, runs = threading.Event(), threading.Event(), []

    @billing.tool(server)
    def search(q: str) -> list[str]:
        runs.append(q)
        entered.set()
        release.wait(30)
        return [f"{q}: result 1"]

    payer = new_payer(shop.devnet)
    args = {"q": "usdc"}
    release.set()  # the challenge: the tool does not run
    challenge = extract_payment_required_from_result(as_x402(call(server, "search", args)))
    assert challenge is not None and runs == []
    release.clear()
    payment = official_payment(official_client(payer, shop.devnet.chain.usdc),
                               challenge.model_dump(by_alias=True, exclude_none=True))

    async def cut_while_recording() -> CallToolResult:
        answered: list[CallToolResult] = []
        async with Client(server) as client, anyio.create_task_group() as tasks:

            async def paid_call() -> None:
                answered.append(await client.call_tool(  # type: ignore[arg-type]
                    "search", args, meta={PAYMENT_META: payment}))

            tasks.start_soon(paid_call)
            assert await anyio.to_thread.run_sync(entered.wait, 30)
            with ledger_locked(shop.engine), anyio.fail_after(60):
                release.set()  # the tool answers; the payment settles; its record waits
                while shop.received() == 0 or not recording_waits(shop.engine):
                    await anyio.sleep(0.1)
                cut_recording(shop.engine)
                while not answered:
                    await anyio.sleep(0.1)
        return answered[0]

    result = anyio.run(cut_while_recording)

    assert not result.is_error, result
    assert result.structured_content == {"result": ["usdc: result 1"]}
    settlement = (result.meta or {})[PAYMENT_RESPONSE_META]
    assert settlement["success"] is True and settlement["payer"] == payer.address.lower()
    assert RECEIPT_META not in (result.meta or {})
    assert shop.received() == SEARCH_PRICE and runs == ["usdc"]
    assert [row.status for row in shop.payment_rows()] == ["reserved"]
    sample = metrics.registry.get_sample_value  # paid: counted, though not recorded yet
    assert sample("mcpbill_calls_total", {"tool": "search", "outcome": "captured"}) == 1
    assert sample("mcpbill_charged_micro_usdc_total", {"tool": "search"}) == SEARCH_PRICE

    assert len(shop.acceptor.recover(older_than=0)) == 1
    assert shop.acceptor.recover(older_than=0) == []
    assert [row.status for row in shop.payment_rows()] == ["settled"]
    [captured] = shop.captured_calls("search")
    again = call(server, "search", args, {PAYMENT_META: payment})  # its result was not kept
    assert again.is_error and (again.meta or {})[PAYMENT_RESPONSE_META] == settlement
    assert again.structured_content is not None
    assert again.structured_content["code"] == "DUPLICATE_CALL"
    receipt = shop.verifier.verify_receipt(again.structured_content["receipt"]["jws"])
    assert (receipt.receipt_id, receipt.amount) == (captured.id, SEARCH_PRICE)
    assert receipt.claims["transaction"] == settlement["transaction"]
    assert runs == ["usdc"] and shop.received() == SEARCH_PRICE
    assert balance(shop.devnet, payer.address) == 1_000_000 - SEARCH_PRICE
    shop.assert_books_clean()


def test_a_tool_that_fails_releases_the_payment_and_nothing_moves(
        server: MCPServer, shop: Shop, tools: Tools) -> None:
    payer = new_payer(shop.devnet)

    result, _ = pay(server, shop, payer, tool="boom")

    assert result.is_error and PAYMENT_RESPONSE_META not in (result.meta or {})
    assert tools.count("boom") == 1
    assert [row.status for row in shop.payment_rows()] == ["released"]
    assert shop.received() == 0 and shop.captured_calls() == []


def test_a_tool_without_x402_takes_no_payment_and_offers_none(
        server: MCPServer, shop: Shop, tools: Tools) -> None:
    payment = signed_payment(new_payer(shop.devnet), shop.terms, amount=50_000)

    refused = body(call(server, "premium", {"q": "x"}, {PAYMENT_META: payment}))

    assert (refused["code"], refused["reason"]) == ("X402_PAYMENT_INVALID", "not_offered")
    assert "accepts" not in refused and tools.runs == []
    unpaid = body(call(server, "premium", {"q": "x"}))
    assert unpaid["code"] == "INVALID_CREDIT_TOKEN" and "accepts" not in unpaid


def test_over_budget_the_token_s_tenant_is_offered_its_own_price(
        server: MCPServer, shop: Shop, tools: Tools) -> None:
    now = utcnow()
    fund(shop.engine, "acme", 1_000_000, now=now)
    token = mint(shop.engine, KeyRing.load(shop.keys_dir), now=now, tenant="acme", limit=1)

    refused = body(call(server, "search", {"q": "x"}, {TOKEN_META: token.token}))

    assert refused["code"] == "BUDGET_EXCEEDED" and "fallback" in refused
    assert refused["accepts"][0]["amount"] == str(SEARCH_PRICE // 2)  # acme: 50% off
    payer = new_payer(shop.devnet)
    challenge = extract_payment_required_from_result(as_x402(call(
        server, "search", {"q": "x"}, {TOKEN_META: token.token})))
    assert challenge is not None
    payment = official_payment(official_client(payer, shop.devnet.chain.usdc),
                               challenge.model_dump(by_alias=True, exclude_none=True))
    paid = call(server, "search", {"q": "x"}, {TOKEN_META: token.token, PAYMENT_META: payment})

    receipt = shop.verifier.verify_receipt((paid.meta or {})[RECEIPT_META]["jws"])
    assert (receipt.claims["tenant"], receipt.amount) == ("acme", SEARCH_PRICE // 2)
    assert receipt.claims["payer"] == token.claims.agent
    assert shop.received() == SEARCH_PRICE // 2 and tools.count("search") == 1
    shop.assert_books_clean()
    with writing(shop.engine) as conn:  # the agent's own token was not touched
        assert credit.show(conn, token.claims.jti, now=utcnow()).spent == 0


def test_an_x402_paid_call_is_counted_in_the_verifier_s_metrics(
        server: MCPServer, shop: Shop) -> None:
    metrics = shop.verifier.enable_metrics()
    payer = new_payer(shop.devnet)

    result, _ = pay(server, shop, payer)  # refused unpaid, then paid
    assert not result.is_error, result

    sample = metrics.registry.get_sample_value
    assert sample("mcpbill_charged_micro_usdc_total", {"tool": "search"}) == shop.received()
    assert sample("mcpbill_calls_total", {"tool": "search", "outcome": "captured"}) == 1
    assert sample("mcpbill_refusals_total",
                  {"tool": "search", "code": "INVALID_CREDIT_TOKEN"}) == 1
    assert sample("mcpbill_calls_total", {"tool": "search", "outcome": "refused"}) == 1


def test_a_payment_released_at_input_required_pays_the_round_that_completes(
        shop: Shop, tools: Tools) -> None:
    metrics = shop.verifier.enable_metrics()
    billing = Billing(shop.verifier, acceptor=shop.acceptor)
    server: MCPServer = MCPServer("asking", extensions=[billing])

    @billing.tool(server, name="search")
    def search_once_sure(q: str, ctx: Context) -> list[str] | InputRequiredResult:
        tools.runs.append(("search", {"q": q}))
        if not ctx.input_responses:
            return InputRequiredResult(input_requests={"sure": SURE}, request_state="asked")
        return [f"{q}: result 1"]

    payer = new_payer(shop.devnet)

    async def run() -> tuple[Any, list[str], Any]:
        async with Client(server, mode="2026-07-28", cache=None) as client:
            unpaid = await client.session.call_tool("search", {"q": "usdc"})
            challenge = extract_payment_required_from_result(as_x402(unpaid))
            assert challenge is not None
            meta: Any = {PAYMENT_META: official_payment(
                official_client(payer, shop.devnet.chain.usdc),
                challenge.model_dump(by_alias=True, exclude_none=True))}
            asked = await client.session.call_tool("search", {"q": "usdc"}, meta=meta,
                                                   allow_input_required=True)
            assert isinstance(asked, InputRequiredResult)
            statuses = [row.status for row in shop.payment_rows()]
            done = await client.session.call_tool(
                "search", {"q": "usdc"}, meta=meta, input_responses={"sure": YES},
                request_state=asked.request_state, allow_input_required=True)
            return asked, statuses, done

    asked, statuses, done = anyio.run(run)

    assert asked.input_requests == {"sure": SURE} and statuses == ["released"]
    assert not done.is_error and done.structured_content == {"result": ["usdc: result 1"]}
    settlement = (done.meta or {})[PAYMENT_RESPONSE_META]
    receipt = shop.verifier.verify_receipt((done.meta or {})[RECEIPT_META]["jws"])
    assert receipt.amount == SEARCH_PRICE and receipt.claims["transaction"] == settlement[
        "transaction"]
    assert [row.status for row in shop.payment_rows()] == ["settled"]
    assert tools.count("search") == 2 and shop.received() == SEARCH_PRICE
    shop.assert_books_clean()
    sample = metrics.registry.get_sample_value
    assert [sample("mcpbill_calls_total", {"tool": "search", "outcome": outcome})
            for outcome in ("input_required", "captured", "voided")] == [1, 1, None]

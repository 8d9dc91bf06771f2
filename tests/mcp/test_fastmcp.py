"""BillingMiddleware on a fastmcp server, called by fastmcp's own client, on both ledgers.

The server mirrors ``examples/paid_server.py`` (a free ``status``, a paid ``search``, a per-word
``summarize``) plus a paid tool that raises and one that returns an error result. The in-memory
client carries the token in ``_meta``, and so do the raw HTTP requests.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import httpx2
import mcp_types as mt
import pytest
from fastmcp import Client, FastMCP
from fastmcp.exceptions import ToolError
from fastmcp.tools.base import ToolResult
from mcp.client import Client as McpClient
from mcp.client.streamable_http import streamable_http_client
from sqlalchemy import Engine

from mcpbill_cli.errors import PriceUnknown
from mcpbill_cli.mcp import IDEMPOTENCY_KEY_META, PRICE_META, RECEIPT_META, TOKEN_META
from mcpbill_cli.mcp.fastmcp import BillingMiddleware
from mcpbill_cli.mcp.units import report_units
from mcpbill_cli.mcp.wire import LIST_TTL_MS
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.verifier import Verifier

from .conftest import (
    Mint,
    assert_ledger_sound,
    assert_paid_search,
    forged_token,
    raw_session,
    receipt_of,
    refusal_of,
    reply,
    rpc,
    serve,
    token_view,
    tool_call,
    usd,
)

SEARCH = usd("0.002")


def build_server(billing: BillingMiddleware) -> FastMCP[Any]:
    server: FastMCP[Any] = FastMCP("fastmcp-paid")

    @billing.tool(server)
    def status() -> dict[str, str]:
        return {"status": "ok"}

    @billing.tool(server)
    async def search(q: str) -> list[str]:
        if not q.strip():
            raise ToolError("the query is empty")
        return [f"{q}: result {n}" for n in range(1, 4)]

    @billing.tool(server, max_units=2000)
    def summarize(text: str) -> str:  # sync: fastmcp runs it in a worker thread
        report_units(len(text.split()))
        return " ".join(text.split()[:12])

    @billing.tool(server, name="search.failing")
    def failing(q: str) -> ToolResult:
        return ToolResult(content=f"upstream refused {q!r}", is_error=True)

    @server.tool
    def health() -> str:
        return "ok"

    return server


@pytest.fixture
def billing(verifier: Verifier) -> BillingMiddleware:
    return BillingMiddleware(verifier)


@pytest.fixture
def server(billing: BillingMiddleware) -> FastMCP[Any]:
    return build_server(billing)


async def call_without_token(server: FastMCP[Any], tool: str,
                             args: dict[str, Any]) -> mt.CallToolResult:
    async with Client(server) as client:
        return await client.call_tool_mcp(tool, args)


def calls(server: FastMCP[Any], token: str, *requests: tuple[str, dict[str, Any]],
          **meta: Any) -> list[mt.CallToolResult]:
    """``requests`` in order on one connection, each with ``token`` and ``meta`` in ``_meta``."""

    async def scenario() -> list[mt.CallToolResult]:
        async with Client(server) as client:
            return [await client.call_tool_mcp(tool, args, meta={TOKEN_META: token, **meta})
                    for tool, args in requests]

    return anyio.run(scenario)


# --- the wire, as an agent sees it ------------------------------------------------------------


def test_paid_call_returns_a_receipt_that_verifies_and_debits_the_ledger(
        server: FastMCP[Any], mint: Mint, verifier: Verifier, engine: Engine) -> None:
    token = mint(limit="0.05")
    [result] = calls(server, token.token, ("search", {"q": "usdc"}))
    assert_paid_search(result, token, verifier, engine)


def test_free_call_checks_the_token_and_charges_nothing(
        server: FastMCP[Any], mint: Mint, engine: Engine) -> None:
    token = mint(limit="0.05")
    [result] = calls(server, token.token, ("status", {}))
    assert not result.is_error and result.structured_content == {"status": "ok"}
    assert RECEIPT_META not in (result.meta or {})
    view = token_view(engine, token)
    assert (view.spent, view.held, view.remaining) == (0, 0, usd("0.05"))
    forged = forged_token(mint().token)
    assert refusal_of(calls(server, forged, ("status", {}))[0])["code"] == "INVALID_CREDIT_TOKEN"


def test_a_call_without_a_token_is_refused_with_where_to_put_one(server: FastMCP[Any]) -> None:
    error = refusal_of(anyio.run(call_without_token, server, "search", {"q": "x"}))
    assert (error["code"], error["reason"]) == ("INVALID_CREDIT_TOKEN", "missing")
    assert TOKEN_META in error["message"]


def test_unbilled_tools_need_no_token(server: FastMCP[Any]) -> None:
    result = anyio.run(call_without_token, server, "health", {})
    assert not result.is_error and RECEIPT_META not in (result.meta or {})


def test_tool_outside_the_token_scope_is_refused(
        server: FastMCP[Any], mint: Mint, engine: Engine) -> None:
    token = mint(limit="0.05", scope=["status"])
    denied, allowed = calls(server, token.token, ("search", {"q": "x"}), ("status", {}))
    error = refusal_of(denied)
    assert (error["code"], error["tool"], error["scope"]) == ("SCOPE_DENIED", "search",
                                                              ["status"])
    assert not allowed.is_error
    assert token_view(engine, token).spent == 0


def test_budget_exceeded_is_readable_from_the_text_alone(
        server: FastMCP[Any], mint: Mint, engine: Engine) -> None:
    token = mint(limit="0.003")
    paid, refused = calls(server, token.token, ("search", {"q": "a"}), ("search", {"q": "b"}))
    receipt_of(paid)
    error = refusal_of(refused)  # parsed from content[0].text, checked against the rest
    assert error["code"] == "BUDGET_EXCEEDED" and error["reason"] == "token_limit"
    assert (error["priceUsd"], error["remainingUsd"], error["shortfallUsd"]) == (
        "0.002", "0.001", "0.001")
    assert error["fallback"]["freeTools"][0] == "status"
    assert "mcpbill token issue" in error["fallback"]["moreCredit"]
    assert token_view(engine, token).spent == SEARCH


def test_tool_that_raises_or_returns_an_error_is_voided_and_costs_nothing(
        server: FastMCP[Any], mint: Mint, engine: Engine) -> None:
    token = mint(limit="0.05")
    raised, returned = calls(server, token.token, ("search", {"q": "  "}),
                             ("search.failing", {"q": "x"}))
    assert raised.is_error and "the query is empty" in raised.content[0].text  # type: ignore[union-attr]
    assert returned.is_error and "upstream refused" in returned.content[0].text  # type: ignore[union-attr]
    assert RECEIPT_META not in (raised.meta or {}) and RECEIPT_META not in (returned.meta or {})
    view = token_view(engine, token)
    assert (view.spent, view.held, view.remaining) == (0, 0, usd("0.05"))
    assert_ledger_sound(engine)


def test_the_same_call_retried_with_its_idempotency_key_is_billed_once(
        server: FastMCP[Any], mint: Mint, engine: Engine) -> None:
    token = mint(limit="0.05")
    key = {IDEMPOTENCY_KEY_META: "agent-1/search/42"}
    first, retried, conflicting = calls(
        server, token.token, ("search", {"q": "a"}), ("search", {"q": "a"}),
        ("search", {"q": "other"}), **key)
    assert receipt_of(retried) == receipt_of(first)
    assert receipt_of(first)["idempotencyKey"] == "agent-1/search/42"
    assert refusal_of(conflicting)["code"] == "IDEMPOTENCY_CONFLICT"
    assert token_view(engine, token).spent == SEARCH


def test_the_same_call_sent_twice_without_a_key_is_one_call_replayed(
        server: FastMCP[Any], mint: Mint, engine: Engine) -> None:
    """Without a key, the same call within the tool's dedupe window is a retry: the first
    run's result and receipt, whatever the connection or request id; other arguments are a
    new call."""
    token = mint(limit="0.05")
    first, second = calls(server, token.token, ("search", {"q": "a"}), ("search", {"q": "a"}))
    [third] = calls(server, token.token, ("search", {"q": "a"}))  # another connection
    [other] = calls(server, token.token, ("search", {"q": "b"}))
    for retry in (second, third):
        assert receipt_of(retry) == receipt_of(first)
        assert retry.content == first.content and retry.meta["dev.mcpbill/replayed"] is True
    assert receipt_of(other)["receiptId"] != receipt_of(first)["receiptId"]
    assert token_view(engine, token).spent == 2 * SEARCH


def test_per_unit_tool_is_charged_for_the_units_it_reports(
        server: FastMCP[Any], mint: Mint, engine: Engine) -> None:
    token = mint(limit="0.05")
    [result] = calls(server, token.token, ("summarize", {"text": "one two three four five"}))
    assert receipt_of(result)["amountUsd"] == "0.00005"  # 5 words, not the 0.02 it held
    view = token_view(engine, token)
    assert (view.spent, view.held) == (usd("0.00005"), 0)


def test_prices_are_advertised_in_tools_list(server: FastMCP[Any]) -> None:
    async def scenario() -> dict[str, dict[str, Any]]:
        async with Client(server) as client:
            listed = await client.list_tools_mcp()
        return {tool.name: dict(tool.meta or {}) for tool in listed.tools}

    metas = anyio.run(scenario)
    prices = {name: meta[PRICE_META] for name, meta in metas.items() if PRICE_META in meta}
    assert set(prices) == {"status", "search", "summarize", "search.failing"}
    assert prices["search"]["amountUsd"] == "0.002" and prices["search"]["asset"] == "USDC"
    assert prices["status"]["free"] is True
    assert (prices["summarize"]["perUnitUsd"], prices["summarize"]["amountUsd"]) == (
        "0.00001", "0.02")  # per word, and the most one call (2000 words) can cost


# --- registration -------------------------------------------------------------------------------


def test_registering_a_billed_tool_adds_the_middleware_once(verifier: Verifier) -> None:
    billing = BillingMiddleware(verifier)
    server = build_server(billing)
    assert [m for m in server.middleware if isinstance(m, BillingMiddleware)] == [billing]
    assert billing.billed_tools["summarize"].max_units == 2000
    assert "health" not in billing.billed_tools


def test_a_tool_billed_by_name_is_billed(verifier: Verifier, mint: Mint, engine: Engine) -> None:
    billing = BillingMiddleware(verifier)
    server: FastMCP[Any] = FastMCP("by-name", middleware=[billing])

    @server.tool
    def search(q: str) -> str:
        return q

    billing.bill("search")
    token = mint()
    receipt_of(calls(server, token.token, ("search", {"q": "x"}))[0])
    assert token_view(engine, token).spent == SEARCH


def test_a_tool_the_table_cannot_price_is_refused_at_registration(verifier: Verifier) -> None:
    strict = Verifier(keys=verifier.keys, engine=verifier.engine,
                      pricing=PricingTable.from_document(
                          {"version": 1, "tools": {"search": {"price": "1"}}}))
    billing = BillingMiddleware(strict)
    server: FastMCP[Any] = FastMCP("strict")

    def unpriced() -> str:
        return "x"

    with pytest.raises(PriceUnknown):
        billing.tool(server)(unpriced)
    assert billing.billed_tools == {} and billing not in server.middleware


# --- streamable HTTP: the request id --------------------------------------------------------------


@pytest.fixture
def http_url(server: FastMCP[Any]) -> Iterator[str]:
    """The fastmcp server's streamable HTTP endpoint under uvicorn in a thread."""
    with serve(server.http_app()) as url:
        yield url


def test_over_http_a_resent_request_is_billed_once(
        http_url: str, mint: Mint, engine: Engine) -> None:
    token = mint()
    with raw_session(http_url) as web:
        search = tool_call(7, "search", {"q": "lost reply"}, token.token)
        first, resent = reply(rpc(web, http_url, search)), reply(rpc(web, http_url, search))
        search["id"] = 8  # a client that lost its stream re-sends under a new id
        again = reply(rpc(web, http_url, search))
    receipt = first["result"]["_meta"][RECEIPT_META]
    assert receipt["jti"] == token.claims.jti
    assert resent["result"]["_meta"][RECEIPT_META] == receipt
    assert again["result"]["_meta"][RECEIPT_META] == receipt
    assert token_view(engine, token).spent == SEARCH


# --- tools/list: ttlMs and cacheScope, read by the official MCP client ----------------------------

FLAT = {"version": 5, "default_price": "0.01", "tools": {"status": {"price": "0"}}}


def official_listing(app: Any) -> mt.ListToolsResult:
    """``tools/list`` of ``app`` as the official ``mcp`` client reads it over streamable HTTP."""

    async def listed() -> mt.ListToolsResult:
        async with httpx2.AsyncClient(timeout=30) as web, \
                McpClient(streamable_http_client(url, http_client=web), cache=None) as client:
            return await client.list_tools()

    with serve(app) as url:
        return anyio.run(listed)


def test_tools_list_is_private_while_a_tenant_has_prices_of_its_own(
        server: FastMCP[Any]) -> None:
    listed = official_listing(server.http_app())  # the sample table: acme's own search price
    assert (listed.ttl_ms, listed.cache_scope) == (LIST_TTL_MS, "private")
    assert PRICE_META in (listed.tools[0].meta or {})


def test_tools_list_is_public_when_every_tenant_pays_the_same(verifier: Verifier) -> None:
    flat = Verifier(keys=verifier.keys, engine=verifier.engine, demo=True,
                    pricing=PricingTable.from_document(FLAT))
    listed = official_listing(build_server(BillingMiddleware(flat, list_ttl_ms=0)).http_app())
    assert (listed.ttl_ms, listed.cache_scope) == (0, "public")


def test_a_servers_own_cache_hints_are_narrowed_never_widened(verifier: Verifier) -> None:
    flat = Verifier(keys=verifier.keys, engine=verifier.engine, demo=True,
                    pricing=PricingTable.from_document(FLAT))
    billing = BillingMiddleware(flat)
    server: FastMCP[Any] = FastMCP("cached", cache_ttl=5, cache_scope="private")
    billing.tool(server, name="status")(lambda: "ok")
    listed = official_listing(server.http_app())
    assert (listed.ttl_ms, listed.cache_scope) == (5000, "private")


def test_install_adds_the_hints_to_a_server_billing_tools_by_name(verifier: Verifier) -> None:
    billing = BillingMiddleware(verifier, list_ttl_ms=1234)
    server: FastMCP[Any] = FastMCP("by-name")

    @server.tool
    def search(q: str) -> str:
        return q

    billing.bill("search")
    billing.install(server)
    billing.install(server)  # twice: still one of each
    assert server.middleware.count(billing) == 1
    listed = official_listing(server.http_app())
    assert (listed.ttl_ms, listed.cache_scope) == (1234, "private")


def test_a_negative_list_ttl_is_refused(verifier: Verifier) -> None:
    with pytest.raises(ValueError, match="list_ttl_ms"):
        BillingMiddleware(verifier, list_ttl_ms=-1)

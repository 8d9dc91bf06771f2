"""x402 payments for the tools of a fastmcp server (BillingMiddleware), called by fastmcp's own
client (the official ``mcp`` client for MCP 2026-07-28 multi-round calls), paid by the official
x402 client, settled on anvil."""

from __future__ import annotations

from typing import Any

import anyio
import httpx2
import mcp_types as mt
from fastmcp import Client, FastMCP
from fastmcp import Context as FastMCPContext
from mcp.client import Client as MCPClient
from mcp.client.streamable_http import streamable_http_client

from mcpbill_cli.mcp import RECEIPT_META
from mcpbill_cli.mcp.fastmcp import BillingMiddleware
from mcpbill_cli.mcp.x402 import PAYMENT_META, PAYMENT_RESPONSE_META
from tests.mcp.conftest import serve

from .accepting import SEARCH_PRICE, Shop, new_payer, official_client, official_payment
from .test_accept_mcp import SURE, YES


def test_a_fastmcp_tool_is_paid_with_x402_once_and_runs_once(shop: Shop) -> None:
    billing = BillingMiddleware(shop.verifier, acceptor=shop.acceptor)
    server: FastMCP[Any] = FastMCP("fastmcp-paid")
    runs: list[str] = []

    @billing.tool(server)
    async def search(q: str) -> list[str]:
        runs.append(q)
        return [f"{q}: result"]

    async def calls(meta: dict[str, Any] | None, times: int) -> list[mt.CallToolResult]:
        async with Client(server) as client:
            return [await client.call_tool_mcp("search", {"q": "usdc"}, meta=meta)
                    for _ in range(times)]

    [unpaid] = anyio.run(calls, None, 1)
    assert unpaid.is_error and unpaid.structured_content is not None
    challenge = {key: unpaid.structured_content[key]
                 for key in ("x402Version", "resource", "accepts")}
    payer = new_payer(shop.devnet)
    payment = official_payment(official_client(payer, shop.devnet.chain.usdc), challenge)

    paid, again = anyio.run(calls, {PAYMENT_META: payment}, 2)

    assert not paid.is_error, paid
    assert (paid.meta or {})[PAYMENT_RESPONSE_META]["success"] is True
    receipt = shop.verifier.verify_receipt((paid.meta or {})[RECEIPT_META]["jws"])
    assert receipt.amount == SEARCH_PRICE
    assert not again.is_error and (again.meta or {})[PAYMENT_RESPONSE_META] == (
        paid.meta or {})[PAYMENT_RESPONSE_META]
    assert runs == ["usdc"] and shop.received() == SEARCH_PRICE
    shop.assert_books_clean()


def test_a_payment_released_at_input_required_pays_the_round_that_completes(
        shop: Shop) -> None:
    shop.verifier.enable_metrics()
    billing = BillingMiddleware(shop.verifier, acceptor=shop.acceptor)
    server: FastMCP[Any] = FastMCP("fastmcp-asking")
    runs: list[str] = []

    @billing.tool(server)
    async def search(q: str, ctx: FastMCPContext) -> list[str] | mt.InputRequiredResult:
        runs.append(q)
        if not ctx.input_responses:
            return mt.InputRequiredResult(input_requests={"sure": SURE}, request_state="asked")
        return [f"{q}: result"]

    payer = new_payer(shop.devnet)

    async def run(url: str) -> tuple[Any, list[str], Any]:
        async with httpx2.AsyncClient(timeout=60) as web, \
                MCPClient(streamable_http_client(url, http_client=web), mode="2026-07-28",
                          cache=None) as client:
            unpaid = await client.session.call_tool("search", {"q": "usdc"})
            assert unpaid.is_error and unpaid.structured_content is not None
            challenge = {key: unpaid.structured_content[key]
                         for key in ("x402Version", "resource", "accepts")}
            meta: Any = {PAYMENT_META: official_payment(
                official_client(payer, shop.devnet.chain.usdc), challenge)}
            asked = await client.session.call_tool("search", {"q": "usdc"}, meta=meta,
                                                   allow_input_required=True)
            statuses = [row.status for row in shop.payment_rows()]
            done = await client.session.call_tool(
                "search", {"q": "usdc"}, meta=meta, input_responses={"sure": YES},
                request_state=asked.request_state, allow_input_required=True)
            return asked, statuses, done

    with serve(server.http_app()) as url:
        asked, statuses, done = anyio.run(run, url)

    assert isinstance(asked, mt.InputRequiredResult) and statuses == ["released"]
    assert not done.is_error, done
    settlement = (done.meta or {})[PAYMENT_RESPONSE_META]
    receipt = shop.verifier.verify_receipt((done.meta or {})[RECEIPT_META]["jws"])
    assert receipt.amount == SEARCH_PRICE and receipt.claims["transaction"] == settlement[
        "transaction"]
    assert [row.status for row in shop.payment_rows()] == ["settled"]
    assert runs == ["usdc", "usdc"] and shop.received() == SEARCH_PRICE
    shop.assert_books_clean()
    assert shop.verifier.metrics is not None
    sample = shop.verifier.metrics.registry.get_sample_value
    assert [sample("mcpbill_calls_total", {"tool": "search", "outcome": outcome})
            for outcome in ("input_required", "captured", "voided")] == [1, 1, None]

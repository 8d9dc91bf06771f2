"""The x402 results of billed MCP tools on the MCP 2026-07-28 wire, as the server writes them over
streamable HTTP: the challenge and the paid result are ``resultType: "complete"`` results."""

from __future__ import annotations

from typing import Any

import httpx2
from mcp.server.mcpserver import MCPServer
from mcp_types.version import LATEST_MODERN_VERSION
from x402.mcp.types import MCPToolResult
from x402.mcp.utils import extract_payment_required_from_result

from mcpbill_cli.mcp import RECEIPT_META
from mcpbill_cli.mcp.x402 import PAYMENT_META, PAYMENT_RESPONSE_META
from tests.mcp.conftest import MCP_HEADERS, serve
from tests.mcp.test_protocol import modern_call

from .accepting import Shop, new_payer, official_client, official_payment
from .test_accept_mcp import Tools, server, tools  # noqa: F401 - the paid server and its runs


def test_the_challenge_and_the_paid_result_are_complete_results_on_the_wire(
        server: MCPServer, shop: Shop, tools: Tools) -> None:  # noqa: F811
    payer = new_payer(shop.devnet)
    with serve(server.streamable_http_app()) as url, \
            httpx2.Client(headers={**MCP_HEADERS, "mcp-protocol-version": LATEST_MODERN_VERSION},
                          timeout=60) as web:
        challenged = modern_call(web, url, 1, "search", {"q": "wire"}, {})
        offer = extract_payment_required_from_result(MCPToolResult(
            content=challenged["content"], is_error=challenged["isError"],
            structured_content=challenged["structuredContent"]))
        assert offer is not None
        payment: dict[str, Any] = official_payment(
            official_client(payer, shop.devnet.chain.usdc),
            offer.model_dump(by_alias=True, exclude_none=True))
        paid = modern_call(web, url, 2, "search", {"q": "wire"}, {PAYMENT_META: payment})
    assert (challenged["resultType"], challenged["isError"]) == ("complete", True)
    assert challenged["structuredContent"]["x402Version"] == 2
    assert paid["resultType"] == "complete" and not paid.get("isError")
    assert {RECEIPT_META, PAYMENT_RESPONSE_META} <= set(paid["_meta"])
    assert tools.count("search") == 1

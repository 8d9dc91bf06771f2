"""x402 payments for the tools of a fastmcp server (BillingMiddleware), called by fastmcp's own
client, paid by the official x402 client, settled on anvil."""

from __future__ import annotations

from typing import Any

import anyio
import mcp_types as mt
from fastmcp import Client, FastMCP

from mcpbill_cli.mcp import RECEIPT_META
from mcpbill_cli.mcp.fastmcp import BillingMiddleware
from mcpbill_cli.mcp.x402 import PAYMENT_META, PAYMENT_RESPONSE_META

from .accepting import SEARCH_PRICE, Shop, new_payer, official_client, official_payment


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

"""x402 for a billed MCP tool end to end over streamable HTTP: the official ``mcp`` client talks
to the server under uvicorn, the official ``x402`` client reads the challenge from the tool
result and signs the payment, mcpbill settles it on anvil by itself (its own gas account).
Billed once; the result carries the settlement and the receipt; the payment used again for
another call, on this server or on another replica of the same ledger, is X402_NONCE_USED."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx2
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import MCPServer
from mcp_types import CallToolResult
from x402.mcp.utils import extract_payment_required_from_result

from mcpbill_cli.keys import KeySource
from mcpbill_cli.mcp import RECEIPT_META, Billing
from mcpbill_cli.mcp.x402 import PAYMENT_META, PAYMENT_RESPONSE_META
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.verifier import Verifier
from mcpbill_cli.x402.accept import Acceptor
from tests.mcp.conftest import serve

from .accepting import (
    ACCEPT_PRICING,
    SEARCH_PRICE,
    Shop,
    balance,
    new_payer,
    official_client,
    official_payment,
)
from .peer import NETWORK
from .test_accept_mcp import Tools, as_x402, server, tools  # noqa: F401 - the paid server


@asynccontextmanager
async def agent(url: str) -> AsyncIterator[Client]:
    """The official MCP client on ``url`` over streamable HTTP."""
    async with httpx2.AsyncClient(timeout=60) as web, \
            Client(streamable_http_client(url, http_client=web), cache=None) as client:
        yield client


def call(url: str, args: dict[str, Any], meta: dict[str, Any] | None = None) -> CallToolResult:
    async def run() -> CallToolResult:
        async with agent(url) as client:
            return await client.call_tool("search", args, meta=meta)  # type: ignore[arg-type]

    return anyio.run(run)


def refusal_code(result: CallToolResult) -> str:
    assert result.is_error, result
    document = json.loads(result.content[0].text)  # type: ignore[union-attr]
    assert document == result.structured_content and "accepts" in document  # a new challenge
    assert PAYMENT_RESPONSE_META not in (result.meta or {})
    return str(document["code"])


def test_an_x402_agent_pays_over_streamable_http_once(
        server: MCPServer, shop: Shop, tools: Tools) -> None:  # noqa: F811
    payer = new_payer(shop.devnet)
    with serve(server.streamable_http_app()) as url:
        challenged = call(url, {"q": "http"})
        offer = extract_payment_required_from_result(as_x402(challenged))
        assert offer is not None and tools.runs == []
        payment = official_payment(official_client(payer, shop.devnet.chain.usdc),
                                   offer.model_dump(by_alias=True, exclude_none=True))

        paid = call(url, {"q": "http"}, {PAYMENT_META: payment})
        again = call(url, {"q": "http"}, {PAYMENT_META: payment})  # a lost reply, resent
        reused = call(url, {"q": "another call"}, {PAYMENT_META: payment})

    assert not paid.is_error, paid
    assert paid.structured_content == {"result": ["http: result 1", "http: result 2"]}
    settlement = (paid.meta or {})[PAYMENT_RESPONSE_META]
    assert settlement["success"] is True and settlement["network"] == NETWORK
    assert settlement["payer"] == payer.address.lower()
    receipt = shop.verifier.verify_receipt((paid.meta or {})[RECEIPT_META]["jws"])
    assert receipt.amount == SEARCH_PRICE
    assert receipt.claims["transaction"] == settlement["transaction"]
    assert not again.is_error and (again.meta or {})[PAYMENT_RESPONSE_META] == settlement
    assert refusal_code(reused) == "X402_NONCE_USED"

    assert tools.count("search") == 1
    assert shop.received() == SEARCH_PRICE
    assert balance(shop.devnet, payer.address) == 1_000_000 - SEARCH_PRICE
    assert [row.status for row in shop.payment_rows()] == ["settled"]
    assert len(shop.captured_calls("search")) == 1
    shop.assert_books_clean()


def test_a_payment_used_on_one_replica_is_refused_on_another(
        server: MCPServer, shop: Shop, tools: Tools) -> None:  # noqa: F811
    a = shop.acceptor  # the replica: a verifier and an acceptor of its own, the same ledger
    verifier = Verifier(keys=KeySource(directory=shop.keys_dir), engine=shop.engine,
                        pricing=PricingTable.from_document(ACCEPT_PRICING))
    other = Billing(verifier, acceptor=Acceptor(verifier, chain=a.chain, pay_to=a.pay_to,
                                                rpc=a.rpc, settler=a.settler))
    replica: MCPServer = MCPServer("paid-replica", extensions=[other])
    other.tool(replica, "search")(lambda q: [f"replica: {q}"])
    payer = new_payer(shop.devnet)
    with serve(server.streamable_http_app()) as url, \
            serve(replica.streamable_http_app()) as replica_url:
        offer = extract_payment_required_from_result(as_x402(call(url, {"q": "one"})))
        assert offer is not None
        payment = official_payment(official_client(payer, shop.devnet.chain.usdc),
                                   offer.model_dump(by_alias=True, exclude_none=True))
        paid = call(url, {"q": "one"}, {PAYMENT_META: payment})
        elsewhere = call(replica_url, {"q": "two"}, {PAYMENT_META: payment})

    verifier.close()
    assert not paid.is_error, paid
    assert refusal_code(elsewhere) == "X402_NONCE_USED"
    assert tools.count("search") == 1 and shop.received() == SEARCH_PRICE
    assert len(shop.captured_calls("search")) == 1
    shop.assert_books_clean()

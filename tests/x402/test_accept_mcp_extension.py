"""The x402 MCP transport's extension binding (``org.x402/payment``, MCP 2026-07-28), as the x402
spec ``specs/transports-v2/mcp.md`` writes it, over streamable HTTP with the official ``mcp``
client:

- a server with x402 on advertises ``org.x402/payment`` in ``capabilities.extensions``;
- a request whose client capabilities advertise it gets ``resultType: "payment_required"`` with
  the ``PaymentRequired`` in ``paymentRequired`` wherever payment is missing or invalid, and the
  tool does not run; the payment goes in ``_meta["x402/payment"]`` and the settlement comes
  back in ``_meta["x402/payment-response"]``, as in the tool-result binding;
- a client that does not advertise it keeps the tool-result binding;
- a fastmcp server billed by ``BillingMiddleware`` does the same.

The agent here is a real client extension: it claims ``payment_required``, signs with the
official ``x402`` client and calls again, so ``client.call_tool`` just returns the paid result.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import httpx2
import pytest
from eth_account.signers.local import LocalAccount
from mcp.client import Client
from mcp.client.extension import ClaimContext, ClientExtension, ResultClaim
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import MCPServer
from mcp_types import CallToolResult, Result
from x402 import x402ClientSync

from mcpbill_cli.mcp import EXTENSION_ID, RECEIPT_META, Billing
from mcpbill_cli.mcp.x402 import (
    PAYMENT_META,
    PAYMENT_RESPONSE_META,
    REFUSAL_META,
    X402_EXTENSION_ID,
)
from tests.mcp.conftest import serve

from .accepting import (
    SEARCH_PRICE,
    Shop,
    balance,
    new_payer,
    official_client,
    official_payment,
    signed_payment,
)
from .peer import NETWORK
from .test_accept_mcp import Tools, server, tools  # noqa: F401 - the paid server and its runs


class PaymentRequiredResult(Result):
    """The extension's result type: the operation did not run, payment is required."""

    result_type: Literal["payment_required"] = "payment_required"
    payment_required: dict[str, Any]


@dataclass
class X402Payments(ClientExtension):
    """An agent's ``org.x402/payment``: pays each ``payment_required`` once, then calls again."""

    signer: x402ClientSync
    arguments: dict[str, Any]
    challenges: list[dict[str, Any]] = field(default_factory=list)
    identifier = X402_EXTENSION_ID

    def claims(self) -> Sequence[ResultClaim[Any]]:
        return [ResultClaim(result_type="payment_required", model=PaymentRequiredResult,
                            resolve=self.pay)]

    async def pay(self, required: PaymentRequiredResult, ctx: ClaimContext) -> CallToolResult:
        self.challenges.append(required.payment_required)
        payment = official_payment(self.signer, required.payment_required)
        return await ctx.session.call_tool(ctx.tool_name, self.arguments,
                                           meta={PAYMENT_META: payment})


@asynccontextmanager
async def agent(url: str, *extensions: ClientExtension) -> AsyncIterator[Client]:
    async with httpx2.AsyncClient(timeout=60) as web, \
            Client(streamable_http_client(url, http_client=web), cache=None,
                   extensions=list(extensions)) as client:
        yield client


@pytest.fixture
def url(server: MCPServer) -> Any:  # noqa: F811
    with serve(server.streamable_http_app()) as served:
        yield served


def payer_extension(shop: Shop, payer: LocalAccount, args: dict[str, Any]) -> X402Payments:
    return X402Payments(official_client(payer, shop.devnet.chain.usdc), args)


def test_the_server_advertises_org_x402_payment_in_its_capabilities(url: str) -> None:
    async def capabilities() -> Any:
        async with agent(url) as client:
            return client.server_capabilities

    advertised = anyio.run(capabilities).extensions
    assert advertised[X402_EXTENSION_ID] == {}
    assert EXTENSION_ID in advertised


def test_an_unpaid_call_is_payment_required_and_the_tool_does_not_run(
        url: str, shop: Shop, tools: Tools) -> None:  # noqa: F811
    extension = payer_extension(shop, new_payer(shop.devnet), {"q": "x"})

    async def unpaid() -> Any:
        async with agent(url, extension) as client:
            return await client.session.call_tool("search", {"q": "x"}, allow_claimed=True)

    result = anyio.run(unpaid)
    assert isinstance(result, PaymentRequiredResult)
    required = result.payment_required
    assert required["x402Version"] == 2
    assert required["resource"]["url"] == "mcp://tool/search"
    [offer] = required["accepts"]
    assert (offer["scheme"], offer["network"], offer["amount"]) == (
        "exact", NETWORK, str(SEARCH_PRICE))
    assert (result.meta or {})[REFUSAL_META]["code"] == "INVALID_CREDIT_TOKEN"
    assert tools.runs == []


def test_the_extension_pays_and_the_call_returns_the_settled_result(
        url: str, shop: Shop, tools: Tools) -> None:  # noqa: F811
    payer = new_payer(shop.devnet)
    extension = payer_extension(shop, payer, {"q": "ext"})

    async def paid() -> CallToolResult:
        async with agent(url, extension) as client:
            return await client.call_tool("search", {"q": "ext"})

    result = anyio.run(paid)

    assert not result.is_error, result
    assert result.structured_content == {"result": ["ext: result 1", "ext: result 2"]}
    assert len(extension.challenges) == 1
    settlement = (result.meta or {})[PAYMENT_RESPONSE_META]
    assert settlement["success"] is True and settlement["payer"] == payer.address.lower()
    receipt = shop.verifier.verify_receipt((result.meta or {})[RECEIPT_META]["jws"])
    assert receipt.claims["transaction"] == settlement["transaction"]
    assert tools.count("search") == 1 and shop.received() == SEARCH_PRICE
    assert balance(shop.devnet, payer.address) == 1_000_000 - SEARCH_PRICE
    shop.assert_books_clean()


def test_an_invalid_payment_is_payment_required_again(url: str, shop: Shop,
                                                     tools: Tools) -> None:  # noqa: F811
    payer = new_payer(shop.devnet)
    wrong = signed_payment(payer, shop.terms, amount=SEARCH_PRICE - 1)

    async def underpaid() -> Any:
        async with agent(url, payer_extension(shop, payer, {"q": "x"})) as client:
            return await client.session.call_tool("search", {"q": "x"},
                                                  meta={PAYMENT_META: wrong},
                                                  allow_claimed=True)

    result = anyio.run(underpaid)
    assert isinstance(result, PaymentRequiredResult)
    assert result.payment_required["accepts"][0]["amount"] == str(SEARCH_PRICE)
    assert (result.meta or {})[REFUSAL_META]["code"] == "X402_PAYMENT_INVALID"
    assert tools.runs == [] and shop.received() == 0


def test_a_client_without_the_extension_keeps_the_tool_result_binding(
        url: str, tools: Tools) -> None:  # noqa: F811
    async def unpaid() -> CallToolResult:
        async with agent(url) as client:
            return await client.call_tool("search", {"q": "x"})

    result = anyio.run(unpaid)
    assert result.is_error and result.structured_content is not None
    assert result.structured_content["x402Version"] == 2 and "accepts" in result.structured_content
    assert tools.runs == []


def test_a_server_without_x402_does_not_advertise_it(shop: Shop) -> None:
    billing = Billing(shop.verifier)  # no acceptor
    bare: MCPServer = MCPServer("bare", extensions=[billing])
    billing.tool(bare, "search")(lambda q: [q])

    async def capabilities() -> Any:
        async with Client(bare) as client:
            return client.server_capabilities

    assert X402_EXTENSION_ID not in (anyio.run(capabilities).extensions or {})


# --- a fastmcp server: the same binding, from BillingMiddleware --------------------------------


def test_a_fastmcp_server_speaks_the_extension_binding_too(shop: Shop) -> None:
    from fastmcp import FastMCP

    from mcpbill_cli.mcp.fastmcp import BillingMiddleware

    billing = BillingMiddleware(shop.verifier, acceptor=shop.acceptor)
    fast: FastMCP[Any] = FastMCP("fastmcp-paid")
    runs: list[str] = []

    @billing.tool(fast)
    def search(q: str) -> list[str]:
        runs.append(q)
        return [f"{q}: result"]

    payer = new_payer(shop.devnet)
    extension = payer_extension(shop, payer, {"q": "fast"})

    async def scenario(url: str) -> tuple[Any, Any, CallToolResult]:
        async with agent(url, payer_extension(shop, payer, {"q": "x"})) as client:
            unpaid = await client.session.call_tool("search", {"q": "x"}, allow_claimed=True)
        async with agent(url, extension) as client:
            return client.server_capabilities, unpaid, await client.call_tool(
                "search", {"q": "fast"})

    with serve(fast.http_app()) as url:
        capabilities, unpaid, paid = anyio.run(scenario, url)

    assert (capabilities.extensions or {})[X402_EXTENSION_ID] == {}
    assert isinstance(unpaid, PaymentRequiredResult)
    assert set(unpaid.payment_required) <= {"x402Version", "error", "resource", "accepts",
                                            "extensions"}
    assert (unpaid.meta or {})[REFUSAL_META]["code"] == "INVALID_CREDIT_TOKEN"
    assert not paid.is_error, paid
    assert (paid.meta or {})[PAYMENT_RESPONSE_META]["success"] is True
    assert runs == ["fast"] and shop.received() == SEARCH_PRICE
    shop.assert_books_clean()

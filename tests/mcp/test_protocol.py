"""MCP 2026-07-28 to the letter, as the official client meets it, in process and over HTTP:
``_meta`` key names, the extension in the server's capabilities, ``resultType`` on every billed
result, ``tools/list`` cache hints, and refusals of tools that declare an ``outputSchema``."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio
import httpx2
import pytest
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import MCPServer
from mcp_types import CallToolResult
from sqlalchemy import Engine

from mcpbill_cli.mcp import (
    EXTENSION_ID,
    IDEMPOTENCY_KEY_META,
    PRICE_META,
    RECEIPT_META,
    REPLAYED_META,
    TOKEN_META,
)

from .conftest import Mint, receipt_of, token_view, usd

# MCP's `_meta` key rule: an optional prefix of dot-separated labels and a slash, then a name.
META_KEY = re.compile(r"(?:[A-Za-z](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                      r"(?:\.[A-Za-z](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*/)?"
                      r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
OURS = [TOKEN_META, IDEMPOTENCY_KEY_META, RECEIPT_META, PRICE_META, REPLAYED_META, EXTENSION_ID]

Open = Callable[[], AbstractAsyncContextManager[Client]]


@pytest.fixture(params=["memory", "http"])
def bare(request: pytest.FixtureRequest, server: MCPServer) -> Open:
    """``async with bare() as client``: the official client, carrying nothing of its own
    (no header): whatever a call needs travels in its ``_meta``."""

    @asynccontextmanager
    async def memory() -> AsyncIterator[Client]:
        async with Client(server) as client:
            yield client

    @asynccontextmanager
    async def http() -> AsyncIterator[Client]:
        url = request.getfixturevalue("http_url")
        async with httpx2.AsyncClient() as web, \
                Client(streamable_http_client(url, http_client=web)) as client:
            yield client

    return {"memory": memory, "http": http}[request.param]


async def calls(open_client: Open, *sent: tuple[str, dict[str, Any], dict[str, Any]]
                ) -> list[CallToolResult]:
    async with open_client() as client:
        return [await client.call_tool(tool, args, meta=meta)  # type: ignore[arg-type]
                for tool, args, meta in sent]


# --- _meta keys ---------------------------------------------------------------------------------


def test_every_key_has_a_reverse_dns_prefix_that_mcp_does_not_reserve() -> None:
    for key in OURS:
        assert META_KEY.fullmatch(key), key
        labels = key.split("/")[0].split(".")
        assert len(labels) >= 2 and labels[1] not in ("mcp", "modelcontextprotocol"), key
    assert len({key.split("/")[0] for key in OURS}) == 1  # one prefix, the extension's too


def test_the_server_writes_the_new_keys(bare: Open, mint: Mint, engine: Engine) -> None:
    token = mint()
    first, again = anyio.run(calls, bare, ("search", {"q": "keys"}, {TOKEN_META: token.token}),
                             ("search", {"q": "keys"}, {TOKEN_META: token.token}))
    assert receipt_of(first)["jti"] == token.claims.jti
    assert set(first.meta or {}) & {"mcpbill/receipt", "mcpbill/replayed"} == set()
    assert (again.meta or {})[REPLAYED_META] is True
    assert again.meta[RECEIPT_META] == first.meta[RECEIPT_META]  # type: ignore[index]
    assert token_view(engine, token).spent == usd("0.002")


def test_the_old_token_and_idempotency_keys_are_still_read(
        bare: Open, mint: Mint, engine: Engine) -> None:
    token = mint()
    old = {"mcpbill/token": token.token, "mcpbill/idempotencyKey": "order-7"}
    first, retried, other = anyio.run(
        calls, bare, ("search", {"q": "a"}, old),
        ("search", {"q": "a"}, {TOKEN_META: token.token, IDEMPOTENCY_KEY_META: "order-7"}),
        ("search", {"q": "a"}, {**old, "mcpbill/idempotencyKey": "order-8"}))
    receipt = receipt_of(first)
    assert (receipt["jti"], receipt["idempotencyKey"]) == (token.claims.jti, "order-7")
    assert (retried.meta or {})[REPLAYED_META] is True  # the same key under either name
    assert receipt_of(other)["idempotencyKey"] == "order-8"
    assert token_view(engine, token).spent == 2 * usd("0.002")


def test_the_new_key_wins_over_the_old_one(bare: Open, mint: Mint) -> None:
    scoped, full = mint(scope=["status"]), mint(agent="agent-2")
    (result,) = anyio.run(calls, bare, ("search", {"q": "x"}, {
        "mcpbill/token": scoped.token, TOKEN_META: full.token}))
    assert receipt_of(result)["jti"] == full.claims.jti


def test_prices_are_advertised_under_the_new_key(bare: Open) -> None:
    async def listed() -> dict[str, Any]:
        async with bare() as client:
            return {tool.name: tool.meta for tool in (await client.list_tools()).tools}

    tools = anyio.run(listed)
    assert tools["search"][PRICE_META]["amountUsd"] == "0.002"
    assert "mcpbill/price" not in tools["search"]


# --- capabilities.extensions ---------------------------------------------------------------------


def test_the_extension_is_in_the_capabilities_the_client_sees(bare: Open) -> None:
    async def capabilities() -> Any:
        async with bare() as client:
            return client.server_capabilities

    advertised = anyio.run(capabilities).extensions
    assert list(advertised) == [EXTENSION_ID] and EXTENSION_ID == "dev.mcpbill/billing"
    assert advertised[EXTENSION_ID] == {
        "asset": "USDC", "network": "mcpbill:demo", "tokenMeta": TOKEN_META,
        "tokenEnv": "AGENT_CREDIT_JWT", "receiptMeta": RECEIPT_META, "priceMeta": PRICE_META,
        "idempotencyKeyMeta": IDEMPOTENCY_KEY_META, "replayedMeta": REPLAYED_META,
        "authorization": {"bearer": False}}

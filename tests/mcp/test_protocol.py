"""MCP 2026-07-28 to the letter, as the official client meets it, in process and over HTTP:
``_meta`` key names, the extension in the server's capabilities, ``resultType`` on every billed
result, ``tools/list`` cache hints, and refusals of tools that declare an ``outputSchema``."""

from __future__ import annotations

import ast
import importlib
import re
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import mcp_types
import pytest
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import MCPServer
from mcp_types import (
    CLIENT_CAPABILITIES_META_KEY,
    CLIENT_INFO_META_KEY,
    PROTOCOL_VERSION_META_KEY,
    CallToolResult,
    ListToolsResult,
)
from mcp_types.version import LATEST_MODERN_VERSION
from pydantic import BaseModel
from sqlalchemy import Engine

from mcpbill_cli.mcp import (
    EXTENSION_ID,
    IDEMPOTENCY_KEY_META,
    PRICE_META,
    RECEIPT_META,
    REPLAYED_META,
    TOKEN_META,
    Billing,
)
from mcpbill_cli.mcp.wire import LIST_TTL_MS
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.verifier import Verifier

from .conftest import (
    MCP_HEADERS,
    Mint,
    load_example,
    raw_session,
    receipt_of,
    refusal_of,
    reply,
    rpc,
    serve,
    token_view,
    usd,
)

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


# --- tools/list: ttlMs and cacheScope -----------------------------------------------------------

FLAT_PRICES = {"version": 90, "default_price": "0.01", "tools": {
    "status": {"price": "0"}, "search": {"price": "0.002"},
    "summarize": {"price_per_unit": "0.00001", "max_price": "0.5"}}}


def listing(open_client: Open) -> ListToolsResult:
    async def listed() -> ListToolsResult:
        async with open_client() as client:
            return await client.list_tools()

    return anyio.run(listed)


def example_on(verifier: Verifier, document: dict[str, Any], **options: Any) -> MCPServer:
    table = PricingTable.from_document(document)
    priced = Verifier(keys=verifier.keys, engine=verifier.engine, pricing=table, demo=True)
    server: MCPServer = load_example().build_server(Billing(priced, **options))
    return server


def test_tools_list_is_private_while_some_tenant_has_prices_of_its_own(bare: Open) -> None:
    listed = listing(bare)  # the sample table: acme pays its own price for search
    assert (listed.ttl_ms, listed.cache_scope) == (LIST_TTL_MS, "private")
    assert listed.result_type == "complete"


@pytest.mark.parametrize("tenants", [{}, {"acme": {"daily_cap": "25"}}],
                         ids=["no-tenants", "a-cap-is-not-a-price"])
def test_tools_list_is_public_when_every_tenant_pays_the_same(
        verifier: Verifier, tenants: dict[str, Any]) -> None:
    server = example_on(verifier, {**FLAT_PRICES, "tenants": tenants})
    listed = listing(lambda: Client(server))
    assert (listed.ttl_ms, listed.cache_scope) == (LIST_TTL_MS, "public")


@pytest.mark.parametrize("terms", [{"discount_percent": 10},
                                   {"tools": {"search": {"price": "0.001"}}}],
                         ids=["discount", "own-price"])
def test_a_tenant_discount_or_price_makes_tools_list_private(
        verifier: Verifier, terms: dict[str, Any]) -> None:
    server = example_on(verifier, {**FLAT_PRICES, "tenants": {"acme": terms}}, list_ttl_ms=0)
    listed = listing(lambda: Client(server))
    assert (listed.ttl_ms, listed.cache_scope) == (0, "private")


def test_tools_list_keeps_its_hints_over_http_on_the_wire(http_url: str) -> None:
    with httpx2.Client(headers={**MCP_HEADERS, "mcp-protocol-version": LATEST_MODERN_VERSION,
                                "mcp-method": "tools/list"},
                       timeout=30) as web:
        answer = reply(rpc(web, http_url, {"id": 1, "method": "tools/list", "params": {
            "_meta": {CLIENT_INFO_META_KEY: {"name": "raw", "version": "1"},
                      CLIENT_CAPABILITIES_META_KEY: {},
                      PROTOCOL_VERSION_META_KEY: LATEST_MODERN_VERSION}}}))
    result = answer["result"]
    assert (result["ttlMs"], result["cacheScope"], result["resultType"]) == (
        LIST_TTL_MS, "private", "complete")


def test_an_earlier_protocol_version_gets_no_cache_hints(http_url: str) -> None:
    with raw_session(http_url) as web:
        result = reply(rpc(web, http_url, {"id": 2, "method": "tools/list"}))["result"]
    assert "ttlMs" not in result and "cacheScope" not in result
    assert PRICE_META in result["tools"][0]["_meta"]


# --- resultType on every billed result ----------------------------------------------------------


def modern_call(web: httpx2.Client, url: str, number: int, tool: str, args: dict[str, Any],
                meta: dict[str, Any]) -> dict[str, Any]:
    """One ``tools/call`` on the 2026-07-28 wire, as bytes the server wrote: the result dict."""
    envelope = {CLIENT_INFO_META_KEY: {"name": "raw", "version": "1"},
                CLIENT_CAPABILITIES_META_KEY: {}, PROTOCOL_VERSION_META_KEY: LATEST_MODERN_VERSION}
    answer = reply(web.post(url, headers={"mcp-method": "tools/call", "mcp-name": tool}, json={
        "jsonrpc": "2.0", "id": number, "method": "tools/call",
        "params": {"name": tool, "arguments": args, "_meta": {**envelope, **meta}}}))
    return dict(answer["result"])


def test_every_kind_of_billed_result_says_complete_on_the_wire(
        http_url: str, mint: Mint) -> None:
    token, poor = mint(), mint(limit="0.001")
    with httpx2.Client(headers={**MCP_HEADERS, "mcp-protocol-version": LATEST_MODERN_VERSION},
                       timeout=30) as web:
        results = {
            "paid": modern_call(web, http_url, 1, "search", {"q": "r"}, {TOKEN_META: token.token}),
            "replayed": modern_call(web, http_url, 2, "search", {"q": "r"},
                                    {TOKEN_META: token.token}),
            "free": modern_call(web, http_url, 3, "status", {}, {TOKEN_META: token.token}),
            "no token": modern_call(web, http_url, 4, "search", {"q": "r"}, {}),
            "over budget": modern_call(web, http_url, 5, "search", {"q": "r"},
                                       {TOKEN_META: poor.token}),
            "tool failed": modern_call(web, http_url, 6, "search", {"q": " "},
                                       {TOKEN_META: token.token}),
        }
    assert {kind: result.get("resultType") for kind, result in results.items()} == dict.fromkeys(
        results, "complete")
    assert RECEIPT_META in results["paid"]["_meta"]
    assert results["replayed"]["_meta"][REPLAYED_META] is True
    assert results["no token"]["isError"] and results["over budget"]["isError"]
    assert results["over budget"]["structuredContent"]["code"] == "BUDGET_EXCEEDED"


def test_the_client_reads_complete_results_of_every_kind(bare: Open, mint: Mint) -> None:
    token = mint(limit="0.002")
    paid, replayed, refused, missing = anyio.run(
        calls, bare, ("search", {"q": "c"}, {TOKEN_META: token.token}),
        ("search", {"q": "c"}, {TOKEN_META: token.token}),
        ("search", {"q": "d"}, {TOKEN_META: token.token}), ("search", {"q": "d"}, {}))
    assert receipt_of(paid) and (replayed.meta or {})[REPLAYED_META] is True
    assert refusal_of(refused)["code"] == "BUDGET_EXCEEDED"
    assert refusal_of(missing)["code"] == "INVALID_CREDIT_TOKEN"
    assert {r.result_type for r in (paid, replayed, refused, missing)} == {"complete"}


# --- a paid tool with an outputSchema -----------------------------------------------------------


@pytest.fixture
def typed(verifier: Verifier) -> MCPServer:
    """A paid tool whose structured result is declared (the SDK derives the outputSchema)."""
    billing = Billing(verifier)
    server: MCPServer = MCPServer("typed", extensions=[billing])

    @billing.tool(server, name="search")
    def search(q: str) -> Hits:
        return Hits(query=q, hits=[f"{q}: 1", f"{q}: 2"])

    return server


class Hits(BaseModel):
    query: str
    hits: list[str]


@pytest.mark.parametrize("transport", ["memory", "http"])
def test_a_tool_with_an_output_schema_refuses_as_a_tool_error_the_client_accepts(
        typed: MCPServer, mint: Mint, transport: str) -> None:
    """The official client validates ``structuredContent`` against the declared schema, but
    not on an ``isError`` result: a refusal (whose object does not fit the schema) reaches the
    agent as a tool error, never as a validation or protocol exception."""
    token = mint(limit="0.002")

    async def scenario(client: Client) -> tuple[Any, list[CallToolResult]]:
        listed = (await client.list_tools()).tools[0]
        sent = {TOKEN_META: token.token}
        return listed, [await client.call_tool("search", {"q": q}, meta=meta)  # type: ignore[arg-type]
                        for q, meta in (("a", sent), ("a", sent), ("b", sent), ("c", {}))]

    async def run() -> tuple[Any, list[CallToolResult]]:
        if transport == "memory":
            async with Client(typed) as client:
                return await scenario(client)
        with serve(typed.streamable_http_app()) as url:
            async with httpx2.AsyncClient() as web, \
                    Client(streamable_http_client(url, http_client=web)) as client:
                return await scenario(client)

    listed, (paid, replayed, over_budget, missing) = anyio.run(run)
    assert listed.output_schema is not None and "hits" in listed.output_schema["properties"]
    assert paid.structured_content == {"query": "a", "hits": ["a: 1", "a: 2"]}
    receipt_of(paid)
    assert replayed.structured_content == paid.structured_content  # validated by the client too
    assert (replayed.meta or {})[REPLAYED_META] is True
    assert refusal_of(over_budget)["code"] == "BUDGET_EXCEEDED"
    assert refusal_of(missing)["code"] == "INVALID_CREDIT_TOKEN"


# --- JSON-RPC error codes -----------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
# JSON-RPC 2.0 keeps -32768..-32000 for itself; MCP 2026-07-28 leaves -32000..-32019 to
# implementations and allocates -32020..-32099 to the spec. The five standard codes are used
# with their meaning only.
STANDARD = {-32700, -32600, -32601, -32602, -32603}
IMPLEMENTATION_DEFINED = range(-32019, -31999)
# Codes an Ethereum JSON-RPC node answers with (-32005: limit exceeded): read, never sent.
RECEIVED = {("mcpbill_cli/wallet/rpc.py", -32005)}


def reserved_codes_in(path: Path) -> list[int]:
    """Error codes of ``path`` inside JSON-RPC's reserved block and outside what an
    implementation may send: integer literals, and the SDK's named codes it uses."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for value in [*_literals(tree), *_sdk_codes(tree)]:
        if (-32768 <= value <= -32000 and value not in STANDARD
                and value not in IMPLEMENTATION_DEFINED
                and (str(path.relative_to(ROOT)), value) not in RECEIVED):
            found.append(value)
    return found


def _literals(tree: ast.AST) -> list[int]:
    values = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            values.append(node.value)
        elif (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
              and isinstance(node.operand, ast.Constant) and type(node.operand.value) is int):
            values.append(-node.operand.value)
    return values


def _sdk_codes(tree: ast.AST) -> list[int]:
    """The integer constants a module takes from ``mcp_types`` (by name, or as attributes)."""
    aliases, values = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mcp_types"):
            module = importlib.import_module(node.module or "")
            values += [getattr(module, a.name) for a in node.names
                       if type(getattr(module, a.name, None)) is int]
        elif isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if a.name == "mcp_types"}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and type(getattr(mcp_types, node.attr, None)) is int):
            values.append(getattr(mcp_types, node.attr))
    return values


def test_no_code_in_the_package_or_the_examples_is_in_a_reserved_range() -> None:
    sources = [*ROOT.joinpath("mcpbill_cli").rglob("*.py"), *ROOT.joinpath("examples").glob("*.py")]
    assert len(sources) > 50
    offenders = {str(path.relative_to(ROOT)): codes for path in sources
                 if (codes := reserved_codes_in(path))}
    assert offenders == {}


def test_a_refusal_is_a_result_not_a_json_rpc_error(http_url: str, mint: Mint) -> None:
    revoked = mint(scope=["status"])
    with httpx2.Client(headers={**MCP_HEADERS, "mcp-protocol-version": LATEST_MODERN_VERSION},
                       timeout=30) as web:
        envelope = {CLIENT_INFO_META_KEY: {"name": "raw", "version": "1"},
                    CLIENT_CAPABILITIES_META_KEY: {},
                    PROTOCOL_VERSION_META_KEY: LATEST_MODERN_VERSION}
        answer = reply(web.post(http_url, headers={"mcp-method": "tools/call",
                                                   "mcp-name": "search"}, json={
            "jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {
                "name": "search", "arguments": {"q": "x"},
                "_meta": {**envelope, TOKEN_META: revoked.token}}}))
    assert "error" not in answer
    assert answer["result"]["structuredContent"]["code"] == "SCOPE_DENIED"

"""The billing extension itself, in process: registration, token sources, guards, capability."""

from __future__ import annotations

import logging
from typing import Any, cast

import anyio
import pytest
from mcp.client import Client
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, RequestParamsMeta
from sqlalchemy import Engine

from mcpbill_cli.config import ENV_TOKEN
from mcpbill_cli.errors import PriceUnknown
from mcpbill_cli.mcp import EXTENSION_ID, RECEIPT_META, TOKEN_META, Billing, report_units
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.verifier import Verifier

from .conftest import Mint, forged_token, receipt_of, refusal_of, token_view, usd


async def call(server: MCPServer, tool: str, args: dict[str, Any] | None = None,
               meta: dict[str, Any] | None = None) -> CallToolResult:
    async with Client(server) as client:
        return await client.call_tool(tool, args or {}, meta=meta)  # type: ignore[arg-type]


def test_a_call_without_a_token_is_refused_with_where_to_put_one(server: MCPServer) -> None:
    error = refusal_of(anyio.run(call, server, "search", {"q": "x"}))
    assert (error["code"], error["reason"]) == ("INVALID_CREDIT_TOKEN", "missing")
    assert "dev.mcpbill/token" in error["message"] and ENV_TOKEN in error["message"]


def test_an_in_process_server_reads_the_token_from_its_environment(
        server: MCPServer, mint: Mint, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    token = mint()
    monkeypatch.setenv(ENV_TOKEN, token.token)
    receipt_of(anyio.run(call, server, "search", {"q": "x"}))
    assert token_view(engine, token).spent == usd("0.002")


def test_a_token_that_is_not_a_string_is_refused(server: MCPServer) -> None:
    error = refusal_of(anyio.run(call, server, "search", {"q": "x"}, {TOKEN_META: 42}))
    assert (error["code"], error["field"]) == ("INVALID_INPUT", TOKEN_META)


def test_a_forged_token_is_refused(server: MCPServer, mint: Mint) -> None:
    forged = forged_token(mint().token)
    error = refusal_of(anyio.run(call, server, "search", {"q": "x"}, {TOKEN_META: forged}))
    assert error["code"] == "INVALID_CREDIT_TOKEN"


def test_unbilled_tools_need_no_token(verifier: Verifier) -> None:
    server: MCPServer = MCPServer("mixed", extensions=[Billing(verifier)])

    @server.tool()
    def health() -> str:
        return "ok"

    result = anyio.run(call, server, "health")
    assert not result.is_error and "dev.mcpbill/receipt" not in (result.meta or {})


def test_a_billed_tool_on_a_server_without_billing_refuses_to_run(verifier: Verifier) -> None:
    ran: list[str] = []
    server: MCPServer = MCPServer("forgot-the-extension")

    @Billing(verifier).tool(server)
    def search(q: str) -> str:
        ran.append(q)
        return q

    result = anyio.run(call, server, "search", {"q": "free ride?"})
    assert result.is_error and "extensions=[billing]" in result.content[0].text  # type: ignore[union-attr]
    assert ran == []


def test_wrapping_keeps_the_signature_and_the_context_parameter(
        verifier: Verifier, mint: Mint) -> None:
    billing = Billing(verifier)
    server: MCPServer = MCPServer("ctx", extensions=[billing])

    @billing.tool(server, description="Search, with the request context.")
    async def search(q: str, ctx: Context, limit: int = 3) -> dict[str, Any]:
        return {"q": q, "limit": limit, "requestId": ctx.request_id}

    assert search.__name__ == "search"  # the decorator hands back the function itself

    async def scenario() -> tuple[Any, CallToolResult]:
        async with Client(server) as client:
            listed = (await client.list_tools()).tools[0]
            result = await client.call_tool(
                "search", {"q": "x"}, meta=cast(RequestParamsMeta, {TOKEN_META: mint().token}))
            return listed, result

    listed, result = anyio.run(scenario)
    assert listed.description == "Search, with the request context."
    assert listed.input_schema["required"] == ["q"]
    assert set(listed.input_schema["properties"]) == {"q", "limit"}
    assert result.structured_content is not None
    assert result.structured_content["q"] == "x" and result.structured_content["requestId"]
    receipt_of(result)


def test_a_tool_the_table_cannot_price_is_refused_at_registration(verifier: Verifier) -> None:
    verifier_without_default = Verifier(
        keys=verifier.keys, engine=verifier.engine,
        pricing=PricingTable.from_document({"version": 1, "tools": {"search": {"price": "1"}}}))
    billing = Billing(verifier_without_default)
    server: MCPServer = MCPServer("strict", extensions=[billing])
    with pytest.raises(PriceUnknown):
        billing.tool(server)(lambda: "x")  # a lambda has no name the table knows
    assert list(billing.billed_tools) == []


def test_bad_units_fail_the_call_and_void_it(verifier: Verifier, mint: Mint,
                                             engine: Engine) -> None:
    billing = Billing(verifier)
    server: MCPServer = MCPServer("units", extensions=[billing])

    @billing.tool(server, max_units=100)
    def summarize(text: str) -> str:
        report_units(-1)
        return text

    token = mint()
    result = anyio.run(call, server, "summarize", {"text": "x"}, {TOKEN_META: token.token})
    assert result.is_error
    view = token_view(engine, token)
    assert (view.spent, view.held) == (0, 0)


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_a_refused_call_never_runs_the_tool_and_a_failed_one_costs_nothing(
        verifier: Verifier, mint: Mint, engine: Engine, is_async: bool,
        caplog: pytest.LogCaptureFixture) -> None:
    """The tool's wrapper opens the call (check, hold) before the tool: in the SDK's worker
    thread for a sync tool, off the event loop for an async one."""
    billing = Billing(verifier)
    server: MCPServer = MCPServer("runs", extensions=[billing])
    ran: list[str] = []

    def work(q: str) -> str:
        ran.append(q)
        if q == "boom":
            raise ToolError("boom")
        return q

    if is_async:
        @billing.tool(server, name="search")
        async def search_async(q: str) -> str:
            return work(q)
    else:
        @billing.tool(server, name="search")
        def search(q: str) -> str:
            return work(q)

    out_of_scope = mint(scope=["translate"])
    refused = anyio.run(call, server, "search", {"q": "x"}, {TOKEN_META: out_of_scope.token})
    assert refusal_of(refused)["code"] == "SCOPE_DENIED"
    assert ran == []
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []  # not a crash
    token = mint()
    failed = anyio.run(call, server, "search", {"q": "boom"}, {TOKEN_META: token.token})
    assert failed.is_error and ran == ["boom"]
    assert (token_view(engine, token).spent, token_view(engine, token).held) == (0, 0)
    receipt_of(anyio.run(call, server, "search", {"q": "fine"}, {TOKEN_META: token.token}))
    assert token_view(engine, token).spent == usd("0.002")


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_a_tool_is_captured_for_the_units_it_reported_and_a_free_one_is_not_held(
        verifier: Verifier, mint: Mint, engine: Engine, is_async: bool) -> None:
    """The wrapper captures after the tool, in the tool's worker thread (sync) or one hop
    after it (async): the units the tool reported reach the capture, and a free tool, held
    nothing, returns its own result without a receipt."""
    billing = Billing(verifier)
    server: MCPServer = MCPServer("units", extensions=[billing])

    def words(text: str) -> int:
        report_units(len(text.split()))
        return len(text.split())

    if is_async:
        @billing.tool(server, name="summarize", max_units=2000)
        async def summarize_async(text: str) -> int:
            return words(text)

        @billing.tool(server, name="status")
        async def status_async() -> str:
            return "ok"
    else:
        @billing.tool(server, name="summarize", max_units=2000)
        def summarize(text: str) -> int:
            return words(text)

        @billing.tool(server, name="status")
        def status() -> str:
            return "ok"

    token = mint()
    meta = {TOKEN_META: token.token}
    paid = anyio.run(call, server, "summarize", {"text": "one two three"}, meta)
    assert paid.structured_content == {"result": 3}
    assert receipt_of(paid)["amountUsd"] == "0.00003"  # 3 words at 0.00001, not its hold
    free = anyio.run(call, server, "status", {}, meta)
    assert free.structured_content == {"result": "ok"} and RECEIPT_META not in (free.meta or {})
    view = token_view(engine, token)
    assert (view.spent, view.held) == (usd("0.00003"), 0)


def test_report_units_outside_a_billed_call_does_nothing() -> None:
    report_units(12)
    with pytest.raises(ValueError, match="whole number"):
        report_units(True)


def test_the_extension_is_advertised_to_current_clients(server: MCPServer) -> None:
    async def capabilities() -> Any:
        async with Client(server) as client:
            return client.server_capabilities

    advertised = anyio.run(capabilities).extensions[EXTENSION_ID]
    assert advertised["tokenMeta"] == TOKEN_META and advertised["asset"] == "USDC"
    assert advertised["network"] == "mcpbill:demo"

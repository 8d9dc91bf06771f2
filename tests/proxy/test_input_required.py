"""MCP 2026-07-28 multi-round calls through the proxy: an upstream tool that answers
``input_required`` (an elicitation) before it completes, driven by the official client.
The round that completes is billed, once; a call abandoned at ``input_required`` is not."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server import Server
from sqlalchemy import Engine, func, select

from mcpbill_cli.config import Settings
from mcpbill_cli.ledger.engine import reading
from mcpbill_cli.ledger.models import calls
from mcpbill_cli.mcp import IDEMPOTENCY_KEY_META, TOKEN_META
from mcpbill_cli.metrics import PrometheusMetrics
from mcpbill_cli.metrics import serve as serve_metrics
from mcpbill_cli.metrics import stop as stop_metrics
from mcpbill_cli.pricing import save_pricing_text
from mcpbill_cli.proxy import Limits, Proxy, Upstream, UpstreamTarget, build_app
from mcpbill_cli.verifier import Verifier
from tests.mcp.conftest import Mint, assert_ledger_sound, receipt_of, serve, token_view, usd

from .conftest import PRICING
from .test_metrics import scrape

CONFIRM = types.Tool(name="confirm", description="Ships an order once the user confirms it.",
                     input_schema={"type": "object", "properties": {"order": {"type": "string"}}})
QUESTION = types.ElicitRequest(params=types.ElicitRequestFormParams(
    message="Ship it?", requested_schema={"type": "object", "properties": {
        "ship": {"type": "boolean"}}, "required": ["ship"]}))


def upstream_server() -> Server[Any]:
    """A 2026-07-28 MCP server whose ``confirm`` asks the agent first (``input_required``)."""

    async def list_tools(_ctx: Any, _params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=[CONFIRM])

    async def call_tool(_ctx: Any, params: types.CallToolRequestParams
                        ) -> types.CallToolResult | types.InputRequiredResult:
        order = (params.arguments or {})["order"]
        answer = (params.input_responses or {}).get("ship")
        if params.request_state != f"order:{order}" or not isinstance(answer, types.ElicitResult):
            return types.InputRequiredResult(input_requests={"ship": QUESTION},
                                             request_state=f"order:{order}")
        shipped = answer.action == "accept" and (answer.content or {}).get("ship") is True
        return types.CallToolResult(content=[types.TextContent(
            text=f"{order}: {'shipped' if shipped else 'kept'}")])

    return Server("orders", on_list_tools=list_tools, on_call_tool=call_tool)


@pytest.fixture
def orders_priced(home: Settings) -> Settings:
    """The proxy tests' pricing table, and ``confirm`` at 0.004."""
    save_pricing_text(home.pricing_path, PRICING + '\n[tools.confirm]\nprice = "0.004"\n')
    return home


@contextmanager
def proxy_of(verifier: Verifier, metrics: PrometheusMetrics | None = None) -> Iterator[str]:
    """The proxy in front of the 2026-07-28 upstream: its MCP URL."""
    with serve(upstream_server().streamable_http_app()) as upstream_url:
        upstream = Upstream(UpstreamTarget.parse(command=None, url=upstream_url))
        proxy = Proxy(verifier, upstream, Limits(call_timeout=30), metrics=metrics)
        with serve(build_app(proxy)) as url:
            yield url


@pytest.fixture
def proxied(orders_priced: Settings, verifier: Verifier) -> Iterator[str]:
    with proxy_of(verifier) as url:
        yield url


@asynccontextmanager
async def modern_agent(url: str) -> AsyncIterator[Client]:
    """The official client on the 2026-07-28 protocol; it answers the question with yes."""

    async def elicit(_context: Any, _params: Any) -> types.ElicitResult:
        return types.ElicitResult(action="accept", content={"ship": True})

    async with httpx2.AsyncClient(timeout=60) as web, \
            Client(streamable_http_client(url, http_client=web), mode="2026-07-28", cache=None,
                   elicitation_callback=elicit) as client:
        yield client


def test_a_call_answered_after_input_required_is_billed_once(
        proxied: str, mint: Mint, engine: Engine) -> None:
    token = mint()
    keyed = mint(agent="agent-2")

    async def run() -> list[types.CallToolResult]:
        async with modern_agent(proxied) as client:
            return [await client.call_tool("confirm", {"order": "A-1"}, meta=meta)  # type: ignore[arg-type]
                    for meta in ({TOKEN_META: token.token},
                                 {TOKEN_META: keyed.token, IDEMPOTENCY_KEY_META: "order-A-2"})]

    results = anyio.run(run)
    for result, issued in zip(results, (token, keyed), strict=True):
        assert result.content[0].text == "A-1: shipped"  # type: ignore[union-attr]
        assert receipt_of(result)["amountUsd"] == "0.004"
        view = token_view(engine, issued)
        assert (view.spent, view.held) == (usd("0.004"), 0)
    assert_ledger_sound(engine)


def test_a_call_abandoned_at_input_required_is_not_billed(
        proxied: str, mint: Mint, engine: Engine) -> None:
    token = mint()

    async def run() -> types.CallToolResult | types.InputRequiredResult:
        async with modern_agent(proxied) as client:
            return await client.session.call_tool(
                "confirm", {"order": "B-1"}, meta={TOKEN_META: token.token},  # type: ignore[arg-type]
                allow_input_required=True)

    asked = anyio.run(run)
    assert isinstance(asked, types.InputRequiredResult)
    assert asked.request_state == "order:B-1" and asked.input_requests == {"ship": QUESTION}
    view = token_view(engine, token)
    assert (view.spent, view.held) == (0, 0)
    assert_ledger_sound(engine)


def test_a_round_that_asked_counts_as_input_required_in_the_metrics(
        orders_priced: Settings, verifier: Verifier, mint: Mint, engine: Engine) -> None:
    """Scraped after a run: each round that ended in ``input_required`` is voided in the ledger
    and counted ``input_required``, not ``voided``; the completing round is the captured one."""
    tokens = [mint(), mint(agent="agent-2")]
    metrics = PrometheusMetrics()
    scraper = serve_metrics(metrics, "127.0.0.1", 0)

    async def run(url: str) -> None:
        async with modern_agent(url) as client:  # the client answers each question itself
            for token in tokens:
                meta: Any = {TOKEN_META: token.token}
                done = await client.call_tool("confirm", {"order": "D-1"}, meta=meta)
                assert receipt_of(done)["amountUsd"] == "0.004"
            abandoned = await client.session.call_tool(
                "confirm", {"order": "D-2"}, meta=meta, allow_input_required=True)
            assert isinstance(abandoned, types.InputRequiredResult)

    try:
        with proxy_of(verifier, metrics) as url:
            anyio.run(run, url)
        got = scrape(f"http://127.0.0.1:{scraper.server_port}/metrics")
    finally:
        stop_metrics(scraper)
    with reading(engine) as conn:
        ledger = {status: count for status, count in conn.execute(
            select(calls.c.status, func.count()).where(calls.c.tool == "confirm")
            .group_by(calls.c.status))}
    assert ledger == {"voided": 3, "captured": 2}

    def counted(outcome: str) -> float:
        return got.get(("mcpbill_calls_total", (("outcome", outcome), ("tool", "confirm"))), 0)

    assert (counted("input_required"), counted("captured")) == (ledger["voided"],
                                                                 ledger["captured"])
    assert counted("voided") == 0
    spent = sum(token_view(engine, token).spent for token in tokens)
    assert got[("mcpbill_charged_micro_usdc_total", (("tool", "confirm"),))] == spent == usd(
        "0.008")
    assert got[("mcpbill_holds_open", ())] == 0

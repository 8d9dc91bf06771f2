"""MCP 2026-07-28 multi-round calls on the embedded integrations: a billed tool that answers
``input_required`` (an elicitation) before it completes, driven by the official client with
the agent's own idempotency key. The round that asked is voided; the round that completes is
captured under the key and a digest of its answers, so a finished call is charged once."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
from fastmcp import Context as FastMCPContext
from fastmcp import FastMCP
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import Context, MCPServer
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import Engine, func, select

from mcpbill_cli import metrics
from mcpbill_cli.config import Settings
from mcpbill_cli.ledger.engine import reading
from mcpbill_cli.ledger.models import calls
from mcpbill_cli.mcp import IDEMPOTENCY_KEY_META, REPLAYED_META, TOKEN_META, Billing
from mcpbill_cli.mcp.fastmcp import BillingMiddleware
from mcpbill_cli.tracing import Tracing
from mcpbill_cli.verifier import Verifier
from tests.verifier.test_metrics import scrape

from .conftest import Mint, assert_ledger_sound, receipt_of, serve, token_view, usd

QUESTION = types.ElicitRequest(params=types.ElicitRequestFormParams(
    message="Ship it?", requested_schema={"type": "object", "properties": {
        "ship": {"type": "boolean"}}, "required": ["ship"]}))
YES = {"ship": types.ElicitResult(action="accept", content={"ship": True})}
NO = {"ship": types.ElicitResult(action="decline")}


def confirmed(order: str, state: str | None, answers: types.InputResponses | None
              ) -> str | types.InputRequiredResult:
    """Ship ``order`` once the agent answered the question, else ask it."""
    answer = (answers or {}).get("ship")
    if state != f"order:{order}" or not isinstance(answer, types.ElicitResult):
        return types.InputRequiredResult(input_requests={"ship": QUESTION},
                                         request_state=f"order:{order}")
    shipped = answer.action == "accept" and (answer.content or {}).get("ship") is True
    return f"{order}: {'shipped' if shipped else 'kept'}"


def sdk_server(verifier: Verifier) -> MCPServer:
    """The MCP SDK's server, billed by the :class:`Billing` extension."""
    billing = Billing(verifier)
    server = MCPServer("orders", extensions=[billing])

    @billing.tool(server)
    async def confirm(order: str, ctx: Context) -> str | types.InputRequiredResult:
        return confirmed(order, ctx.request_state, ctx.input_responses)

    return server


def fastmcp_server(verifier: Verifier) -> FastMCP[Any]:
    """A fastmcp server, billed by its :class:`BillingMiddleware`."""
    billing = BillingMiddleware(verifier)
    server: FastMCP[Any] = FastMCP("orders")

    @billing.tool(server)
    async def confirm(order: str, ctx: FastMCPContext) -> str | types.InputRequiredResult:
        return confirmed(order, ctx.request_state, ctx.input_responses)

    return server


Call = Callable[..., Awaitable[Any]]
Connect = Callable[[], AbstractAsyncContextManager[Client]]


@pytest.fixture
def priced(home: Settings) -> Settings:
    """The demo pricing table, and ``confirm`` at 0.004."""
    text = home.pricing_path.read_text()
    home.pricing_path.write_text(text + '\n[tools.confirm]\nprice = "0.004"\n')
    return home


@pytest.fixture(params=["mcp", "fastmcp"])
def connect(request: pytest.FixtureRequest, priced: Settings,
            verifier: Verifier) -> Iterator[Connect]:
    """The official client on the 2026-07-28 protocol, connected to the MCP SDK server (in
    process) or to the fastmcp server (streamable HTTP)."""
    if request.param == "mcp":
        yield lambda: Client(sdk_server(verifier), mode="2026-07-28", cache=None)
        return

    @asynccontextmanager
    async def over_http(url: str) -> AsyncIterator[Client]:
        async with httpx2.AsyncClient(timeout=60) as web, \
                Client(streamable_http_client(url, http_client=web), mode="2026-07-28",
                       cache=None) as client:
            yield client

    with serve(fastmcp_server(verifier).http_app()) as url:
        yield lambda: over_http(url)


def rounds(connect: Connect, token: str, script: Callable[[Call], Awaitable[Any]]) -> Any:
    """Run ``script`` with a function that calls ``confirm`` for order A-1 under a key."""

    async def run() -> Any:
        async with connect() as client:

            async def call(key: str, answers: types.InputResponses | None = None,
                           state: str | None = None) -> Any:
                return await client.session.call_tool(  # type: ignore[call-overload]
                    "confirm", {"order": "A-1"},
                    meta={TOKEN_META: token, IDEMPOTENCY_KEY_META: key},
                    input_responses=answers, request_state=state, allow_input_required=True)

            return await script(call)

    return anyio.run(run)


def test_a_keyed_call_answered_after_input_required_is_billed_once(
        connect: Connect, mint: Mint, engine: Engine) -> None:
    token = mint()

    async def script(call: Call) -> list[Any]:
        asked = await call("order-A-1")
        done = await call("order-A-1", YES, asked.request_state)
        again = await call("order-A-1", YES, asked.request_state)
        return [asked, done, again]

    asked, done, again = rounds(connect, token.token, script)
    assert isinstance(asked, types.InputRequiredResult)
    assert asked.input_requests == {"ship": QUESTION}
    assert done.content[0].text == "A-1: shipped"
    receipt = receipt_of(done)
    assert receipt["amountUsd"] == "0.004"
    # The completed round replayed with the same key and answers: its first result, no charge.
    assert (again.meta or {}).get(REPLAYED_META) is not None
    assert again.content[0].text == "A-1: shipped" and receipt_of(again) == receipt
    view = token_view(engine, token)
    assert (view.spent, view.held) == (usd("0.004"), 0)
    assert_ledger_sound(engine)


def test_a_call_abandoned_at_input_required_charges_nothing(
        connect: Connect, mint: Mint, engine: Engine) -> None:
    token = mint()

    async def script(call: Call) -> Any:
        return await call("order-B-1")

    assert isinstance(rounds(connect, token.token, script), types.InputRequiredResult)
    view = token_view(engine, token)
    assert (view.spent, view.held) == (0, 0)
    assert_ledger_sound(engine)


def test_other_answers_under_the_same_key_are_another_round_with_its_own_receipt(
        connect: Connect, mint: Mint, engine: Engine) -> None:
    token = mint()

    async def script(call: Call) -> list[Any]:
        state = (await call("order-C-1")).request_state
        return [await call("order-C-1", YES, state), await call("order-C-1", NO, state),
                await call("order-C-1", YES, state)]

    shipped, kept, replay = rounds(connect, token.token, script)
    assert shipped.content[0].text == "A-1: shipped" and kept.content[0].text == "A-1: kept"
    assert receipt_of(shipped)["receiptId"] != receipt_of(kept)["receiptId"]
    assert receipt_of(replay) == receipt_of(shipped)  # the first round's answers: replayed
    view = token_view(engine, token)
    assert (view.spent, view.held) == (usd("0.008"), 0)
    assert_ledger_sound(engine)


def test_a_round_that_asked_counts_as_input_required_in_the_metrics(
        connect: Connect, verifier: Verifier, mint: Mint, engine: Engine) -> None:
    """Each round that asked is voided in the ledger and counted ``input_required``, not
    ``voided``; the round that completes is the one captured, for what the ledger charged."""
    token = mint()
    scraper = metrics.serve(verifier.enable_metrics(), "127.0.0.1", 0)

    async def script(call: Call) -> None:
        asked = await call("order-D-1")
        await call("order-D-1", YES, asked.request_state)
        await call("order-D-1", YES, asked.request_state)  # a replay of the completed round
        await call("order-D-2")  # abandoned at input_required

    try:
        rounds(connect, token.token, script)
        got = scrape(f"http://127.0.0.1:{scraper.server_port}/metrics")
    finally:
        metrics.stop(scraper)
    with reading(engine) as conn:
        ledger = {status: (int(count), int(amount or 0)) for status, count, amount in conn.execute(
            select(calls.c.status, func.count(), func.sum(calls.c.amount))
            .where(calls.c.tool == "confirm").group_by(calls.c.status))}
    assert ledger == {"voided": (2, 0), "captured": (1, usd("0.004"))}

    def counted(outcome: str) -> float:
        return got.get(("mcpbill_calls_total", (("outcome", outcome), ("tool", "confirm"))), 0)

    assert counted("input_required") == ledger["voided"][0]
    assert counted("captured") == ledger["captured"][0]
    assert (counted("voided"), counted("replayed")) == (0, 1)
    assert got[("mcpbill_charged_micro_usdc_total", (("tool", "confirm"),))] == usd("0.004")
    assert got[("mcpbill_holds_open", ())] == 0


def test_a_round_that_asked_ends_its_span_as_input_required(
        priced: Settings, verifier: Verifier, mint: Mint) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    verifier.enable_tracing(Tracing(tracer_provider=provider))
    token = mint()

    async def script(call: Call) -> None:
        asked = await call("order-E-1")
        await call("order-E-1", YES, asked.request_state)

    rounds(lambda: Client(sdk_server(verifier), mode="2026-07-28", cache=None), token.token,
           script)
    provider.shutdown()
    outcomes = [(span.attributes or {}).get("mcpbill.outcome")
                for span in exporter.get_finished_spans() if span.name == "mcpbill.call"]
    assert outcomes == ["input_required", "captured"]

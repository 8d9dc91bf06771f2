"""A paid tool runs once and is billed once over MCP: retries with new request ids (MCP
2026-07-28 has no sessions), lost streams, replays after a revoke or an empty budget, calls in
flight, tools that outlive the hold timeout, and results too large to keep.

Each server here counts how often its tools really ran: a replay must never run one again.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import timedelta

import anyio
import httpx2
import pytest
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import MCPServer
from mcp_types import LATEST_PROTOCOL_VERSION, CallToolResult
from sqlalchemy import Engine, select

from mcpbill_cli.clock import utcnow
from mcpbill_cli.config import Settings
from mcpbill_cli.ledger.engine import reading
from mcpbill_cli.ledger.models import calls
from mcpbill_cli.mcp import IDEMPOTENCY_KEY_META, RECEIPT_META, TOKEN_META, Billing
from mcpbill_cli.reconcile import ReconcileOptions, Window, reconcile
from mcpbill_cli.verifier import Verifier

from .conftest import (
    Agent,
    Mint,
    assert_ledger_sound,
    receipt_of,
    refusal_of,
    revoke,
    serve,
    token_view,
    usd,
)

PRICE = usd("0.01")  # the sample table's default_price: these tools are not listed
REPLAYED_META = "dev.mcpbill/replayed"  # the wire name, pinned


class Runs:
    """How often each tool body really ran; ``gate``, when set, holds ``crunch`` running
    until the test opens it (``started`` says it is running)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.gate: threading.Event | None = None
        self.started = threading.Event()

    def ran(self, tool: str) -> int:
        with self.lock:
            self.counts[tool] += 1
            return self.counts[tool]


def build(verifier: Verifier, runs: Runs, *, slow: float = 0.0) -> MCPServer:
    billing = Billing(verifier)
    server: MCPServer = MCPServer("retries", extensions=[billing], log_level="WARNING")

    @billing.tool(server)
    def lookup(q: str) -> dict[str, object]:
        """A paid lookup."""
        return {"q": q, "run": runs.ran("lookup")}

    @billing.tool(server)
    def crunch(q: str) -> dict[str, object]:
        """A paid tool that takes ``slow`` seconds, or until the test opens its gate."""
        runs.started.set()
        if runs.gate is not None:
            assert runs.gate.wait(30), "the test never opened the gate"
        else:
            time.sleep(slow)
        return {"q": q, "run": runs.ran("crunch")}

    @billing.tool(server)
    def dump(size: int) -> str:
        """A paid tool with a large result."""
        runs.ran("dump")
        return "x" * size

    return server


@asynccontextmanager
async def http_agent(url: str, token: str) -> AsyncIterator[Agent]:
    """The real MCP client over streamable HTTP, the token in ``_meta``."""
    async with httpx2.AsyncClient() as web:
        async with Client(streamable_http_client(url, http_client=web)) as client:
            yield Agent(client, {TOKEN_META: token})


@pytest.fixture
def runs() -> Runs:
    return Runs()


@pytest.fixture
def served(home: Settings, engine: Engine, runs: Runs) -> Iterator[tuple[str, Verifier]]:
    verifier = Verifier.from_settings(home, engine=engine)
    with serve(build(verifier, runs, slow=1.5).streamable_http_app()) as url:
        yield url, verifier
    verifier.close()


def spent(engine: Engine, token: object) -> int:
    return token_view(engine, token).spent  # type: ignore[arg-type]


def test_a_retry_under_a_new_request_id_is_billed_once_and_never_runs_twice(
        served: tuple[str, Verifier], mint: Mint, engine: Engine, runs: Runs) -> None:
    url, _ = served
    token = mint(limit="0.05")

    async def scenario() -> tuple[str, list[CallToolResult]]:
        async with http_agent(url, token.token) as agent:
            first = await agent.call("lookup", {"q": "usdc"})
            again = await agent.call("lookup", {"q": "usdc"})  # a new JSON-RPC request id
        async with http_agent(url, token.token) as agent:  # a new connection, no session
            return agent.client.protocol_version, [first, again,
                                                   await agent.call("lookup", {"q": "usdc"})]

    version, (first, *retries) = anyio.run(scenario)
    assert version == LATEST_PROTOCOL_VERSION == "2026-07-28"
    for retry in retries:
        assert receipt_of(retry) == receipt_of(first)
        assert retry.structured_content == first.structured_content == {"q": "usdc", "run": 1}
        assert (retry.meta or {})[REPLAYED_META] is True
    assert REPLAYED_META not in (first.meta or {})
    assert runs.counts["lookup"] == 1
    assert spent(engine, token) == PRICE
    assert_ledger_sound(engine)


def test_a_call_resent_after_its_stream_was_lost_is_billed_once(
        served: tuple[str, Verifier], mint: Mint, engine: Engine, runs: Runs) -> None:
    """The client gives up reading (its stream is lost) while the tool still runs, then
    re-sends: it is told the call is in progress, and then gets the first run's result."""
    url, _ = served
    token = mint(limit="0.05")
    runs.gate = threading.Event()

    async def scenario() -> list[CallToolResult]:
        async with http_agent(url, token.token) as agent:
            with pytest.raises(Exception, match="[Tt]imed out|[Tt]imeout"):
                await agent.client.call_tool("crunch", {"q": "big"}, read_timeout_seconds=0.3,
                                             meta=agent.meta)  # type: ignore[arg-type]
            answers = [await agent.call("crunch", {"q": "big"})]  # the tool is still running
            runs.gate.set()  # type: ignore[union-attr]
            while answers[-1].is_error:
                await anyio.sleep(refusal_of(answers[-1])["retryAfterMs"] / 1000)
                answers.append(await agent.call("crunch", {"q": "big"}))
            return answers

    *waits, done = anyio.run(scenario)
    assert waits and all(refusal_of(w)["code"] == "CALL_IN_PROGRESS" for w in waits)
    assert done.structured_content == {"q": "big", "run": 1}
    assert (done.meta or {})[REPLAYED_META] is True
    assert runs.counts["crunch"] == 1
    assert spent(engine, token) == PRICE


def test_a_replay_after_revoke_is_refused_and_runs_nothing(
        served: tuple[str, Verifier], mint: Mint, engine: Engine, runs: Runs) -> None:
    url, _ = served
    token = mint(limit="0.05")
    key = {IDEMPOTENCY_KEY_META: "order-1"}

    async def scenario() -> list[CallToolResult]:
        async with http_agent(url, token.token) as agent:
            first = await agent.call("lookup", {"q": "a"}, **key)
            revoke(engine, token)
            return [first, await agent.call("lookup", {"q": "a"}, **key),
                    await agent.call("lookup", {"q": "a"})]

    first, *after = anyio.run(scenario)
    assert receipt_of(first)
    assert [refusal_of(result)["code"] for result in after] == ["TOKEN_REVOKED"] * 2
    assert runs.counts["lookup"] == 1
    assert spent(engine, token) == PRICE


def test_a_replay_after_the_budget_ran_out_returns_the_first_result_and_runs_nothing(
        served: tuple[str, Verifier], mint: Mint, engine: Engine, runs: Runs) -> None:
    url, _ = served
    token = mint(limit="0.01")  # one call's worth
    key = {IDEMPOTENCY_KEY_META: "order-1"}

    async def scenario() -> list[CallToolResult]:
        async with http_agent(url, token.token) as agent:
            return [await agent.call("lookup", {"q": "a"}, **key) for _ in range(5)] + [
                await agent.call("lookup", {"q": "b"})]

    first, *replays, new = anyio.run(scenario)
    for replay in replays:
        assert receipt_of(replay) == receipt_of(first)
        assert replay.structured_content == {"q": "a", "run": 1}
    assert refusal_of(new)["code"] == "BUDGET_EXCEEDED"
    assert runs.counts["lookup"] == 1
    assert spent(engine, token) == PRICE


def test_two_calls_in_flight_with_one_key_run_once_and_keep_their_hold(
        served: tuple[str, Verifier], mint: Mint, engine: Engine, runs: Runs) -> None:
    url, _ = served
    token = mint(limit="0.05")
    key = {IDEMPOTENCY_KEY_META: "order-1"}
    runs.gate = threading.Event()
    results: list[CallToolResult] = []

    async def one() -> None:
        async with http_agent(url, token.token) as agent:
            results.append(await agent.call("crunch", {"q": "a"}, **key))

    async def scenario() -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(one)
            while not runs.started.is_set():  # the first is running
                await anyio.sleep(0.01)
            await one()
            runs.gate.set()  # type: ignore[union-attr]

    anyio.run(scenario)
    refused, done = results
    assert refusal_of(refused)["code"] == "CALL_IN_PROGRESS"
    assert receipt_of(done)["amount"] == str(PRICE)
    assert runs.counts["crunch"] == 1
    assert spent(engine, token) == PRICE
    assert_ledger_sound(engine)


@pytest.mark.slow
def test_a_tool_that_outlives_the_hold_timeout_is_billed(
        home: Settings, engine: Engine, mint: Mint, runs: Runs) -> None:
    verifier = Verifier.from_settings(home, engine=engine, hold_timeout=2)
    token = mint(limit="0.05")

    async def scenario() -> CallToolResult:
        async with Client(build(verifier, runs, slow=4.5)) as client:
            return await Agent(client, {TOKEN_META: token.token}).call("crunch", {"q": "a"})

    try:
        result = anyio.run(scenario)
    finally:
        verifier.close()
    assert receipt_of(result)["amount"] == str(PRICE)
    assert spent(engine, token) == PRICE
    assert_ledger_sound(engine)


@pytest.mark.slow
def test_a_capture_refused_anyway_is_a_structured_refusal_that_reconcile_reports(
        home: Settings, engine: Engine, mint: Mint, runs: Runs) -> None:
    """If the hold lapses regardless (here nothing keeps it alive, as when the ledger was
    unreachable all the while the tool ran), the agent is told, not crashed, and not billed."""
    verifier = Verifier.from_settings(home, engine=engine, hold_timeout=1)
    verifier.keep_alive = lambda hold: None  # type: ignore[method-assign]
    token = mint(limit="0.05")
    started = utcnow()

    async def scenario() -> CallToolResult:
        async with Client(build(verifier, runs, slow=1.5)) as client:
            return await Agent(client, {TOKEN_META: token.token}).call("crunch", {"q": "a"})

    try:
        result = anyio.run(scenario)
    finally:
        verifier.close()
    error = refusal_of(result)
    assert (error["code"], error["state"]) == ("HOLD_NOT_ACTIVE", "timed out")
    assert runs.counts["crunch"] == 1 and spent(engine, token) == 0
    with reading(engine) as conn:
        call_id, status = conn.execute(select(calls.c.id, calls.c.status)).one()
    assert status == "expired"  # released at once, not left for a sweep
    report = reconcile(engine, ReconcileOptions(
        window=Window(started - timedelta(minutes=1), utcnow() + timedelta(minutes=1))))
    assert [(f.name, f.rows[0].key) for f in report.findings] == [("capture_refused", call_id)]


def test_a_result_too_large_to_keep_replays_as_duplicate_call_with_its_receipt(
        home: Settings, engine: Engine, mint: Mint, runs: Runs) -> None:
    verifier = Verifier.from_settings(home, engine=engine, result_cap=4096)
    token = mint(limit="0.05")

    async def scenario() -> list[CallToolResult]:
        async with Client(build(verifier, runs)) as client:
            agent = Agent(client, {TOKEN_META: token.token})
            return [await agent.call("dump", {"size": 5000}) for _ in range(2)] + [
                await agent.call("dump", {"size": 100}) for _ in range(2)]

    big, big_again, small, small_again = anyio.run(scenario)
    error = refusal_of(big_again)
    assert error["code"] == "DUPLICATE_CALL"
    assert error["receipt"] == receipt_of(big)
    assert small_again.content == small.content and (small_again.meta or {})[REPLAYED_META]
    assert (small_again.meta or {})[RECEIPT_META] == receipt_of(small)
    assert runs.counts["dump"] == 2
    assert spent(engine, token) == 2 * PRICE

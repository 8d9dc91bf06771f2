"""Paid calls the agent cuts off: it cancels the call (``notifications/cancelled``, or closing
the request's stream on 2026-07-28) or goes away mid-call. The agent receives nothing, so it is
charged nothing: the hold is voided, the upstream is told to stop, and no receipt is made.

The stdio upstream's standard input is copied to a file, so a test reads what the proxy told it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import Context, MCPServer
from mcp.shared.exceptions import MCPError
from mcp_types import METHOD_NOT_FOUND, CallToolResult
from sqlalchemy import Engine, select, text
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mcpbill_cli.config import Settings
from mcpbill_cli.ledger.engine import reading, writing
from mcpbill_cli.ledger.models import calls
from mcpbill_cli.mcp import TOKEN_META
from mcpbill_cli.pricing import save_pricing_text
from mcpbill_cli.proxy import Limits, Proxy, Upstream, UpstreamTarget, build_app
from mcpbill_cli.verifier import Verifier
from tests.mcp.conftest import Mint, assert_ledger_sound, receipt_of, serve, token_view, usd

from .conftest import EVERYTHING, NODE, PRICING
from .test_billing import assert_nothing_billed

LONG = "trigger-long-running-operation"
SLOW = {"duration": 20, "steps": 40}  # progress every half second, the result after 20 s
SETTLED_WITHIN = 10.0  # seconds: a cut-off call is voided well before the upstream would finish
MODES = ["legacy", "2026-07-28"]

# An agent in a process of its own: it starts the slow call and says so once it runs upstream.
AGENT = """
import json, sys, anyio, httpx2
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client

async def main(url, mode, tool, args, key, token):
    async def progress(done, total, message):
        print("running", flush=True)

    async with httpx2.AsyncClient(timeout=60) as web, Client(
            streamable_http_client(url, http_client=web), mode=mode, cache=None) as client:
        await client.call_tool(tool, json.loads(args), meta={key: token},
                               progress_callback=progress)

anyio.run(main, *sys.argv[1:])
"""


@pytest.fixture
def told(tmp_path: Path) -> Path:
    """Where the stdio upstream's standard input is copied."""
    return tmp_path / "upstream.in"


@pytest.fixture
def answered(tmp_path: Path) -> Path:
    """Where the stdio upstream's standard output is copied."""
    return tmp_path / "upstream.out"


@pytest.fixture
def deaf() -> bool:
    """Whether the upstream never hears a cancellation (parametrize to change): it answers."""
    return False


@pytest.fixture
def proxy(priced: Settings, verifier: Verifier, told: Path, answered: Path, deaf: bool,
          tmp_path: Path) -> Iterator[Proxy]:
    """The proxy in front of the reference server over stdio, its input copied to ``told`` and
    its output to ``answered``; served on ``proxy.url``."""
    deafness = "grep --line-buffered -v notifications/cancelled | " if deaf else ""
    command = (f'sh -c \'tee -a "{told}" | {deafness}"{NODE}" "{EVERYTHING}" stdio '
               f'| tee -a "{answered}"\'')
    with (tmp_path / "upstream.log").open("w") as errlog:
        upstream = Upstream(UpstreamTarget.parse(command=command, url=None), connect_timeout=30,
                            errlog=errlog)
        proxy = Proxy(verifier, upstream, Limits(call_timeout=60, max_concurrent=8))
        with serve(build_app(proxy)) as url:
            proxy.url = url  # type: ignore[attr-defined]
            yield proxy


@pytest.fixture
def proxy_url(proxy: Proxy) -> str:
    return str(proxy.url)  # type: ignore[attr-defined]


@pytest.mark.parametrize("mode", MODES)
def test_a_paid_call_the_agent_cancels_is_voided_and_the_upstream_told(
        proxy_url: str, mint: Mint, engine: Engine, told: Path, mode: str) -> None:
    token = mint()

    async def go() -> None:
        async with agent_on(proxy_url, mode) as client:
            async with running_call(client, token.token, SLOW):
                pass  # held, and running upstream: the client sends notifications/cancelled
            await settled(engine, token.claims.jti)

    anyio.run(go)
    assert_cut_off(engine, token, told)


@pytest.mark.parametrize("mode", MODES)
def test_a_paid_call_whose_agent_dies_is_voided_and_the_upstream_told(
        proxy_url: str, mint: Mint, engine: Engine, told: Path, mode: str) -> None:
    token = mint()
    command = [sys.executable, "-c", AGENT, proxy_url, mode, LONG, json.dumps(SLOW), TOKEN_META,
               token.token]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True) as agent:
        try:
            assert agent.stdout is not None
            assert agent.stdout.readline().strip() == "running"  # held, running upstream
        finally:
            agent.send_signal(signal.SIGKILL)  # no cancellation, no DELETE: sockets close
            agent.wait(30)
    anyio.run(settled, engine, token.claims.jti)
    assert_cut_off(engine, token, told)


@pytest.mark.parametrize("mode", MODES)
def test_a_paid_call_cancelled_while_its_hold_is_taken_is_voided(
        proxy: Proxy, mint: Mint, engine: Engine, mode: str) -> None:
    token = mint()

    async def go() -> None:
        async with agent_on(str(proxy.url), mode) as client:  # type: ignore[attr-defined]

            async def call() -> None:
                await client.call_tool(LONG, SLOW, meta={TOKEN_META: token.token})  # type: ignore[arg-type]
                raise AssertionError("the cancelled call was answered")

            with ledger_locked(engine):  # the hold waits for the lock
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(call)
                    while proxy.billing.in_flight == 0:
                        await anyio.sleep(0.05)
                    await anyio.sleep(1)  # the proxy is taking the hold
                    assert call_rows(engine, token.claims.jti) == []  # waiting for the lock
                    tasks.cancel_scope.cancel()
                await anyio.sleep(1)  # the cancellation reaches the proxy
            await settled(engine, token.claims.jti)  # the hold is taken, then voided

    anyio.run(go)
    assert call_rows(engine, token.claims.jti) == [
        {"tool": LONG, "status": "voided", "amount": None, "receipt": None}]
    assert_nothing_billed(engine, token)


@pytest.mark.parametrize("deaf", [True])
@pytest.mark.parametrize("mode", MODES)
def test_an_upstream_result_after_the_cancellation_is_not_charged(
        proxy_url: str, mint: Mint, engine: Engine, told: Path, answered: Path,
        mode: str) -> None:
    token = mint()

    async def go() -> None:
        async with agent_on(proxy_url, mode) as client:
            async with running_call(client, token.token, {"duration": 2, "steps": 4}):
                pass  # cancelled as soon as it runs upstream
            deadline = time.monotonic() + SETTLED_WITHIN
            while "Long running operation completed" not in answered.read_text():
                assert time.monotonic() < deadline, "the upstream never answered"
                await anyio.sleep(0.1)
            await anyio.sleep(1)  # the late result reaches the proxy (which drops it)

    anyio.run(go)
    assert call_rows(engine, token.claims.jti) == [
        {"tool": LONG, "status": "voided", "amount": None, "receipt": None}]
    assert_nothing_billed(engine, token)
    assert upstream_cancelled(told)  # the proxy told it; it never heard, and answered


@pytest.mark.parametrize("mode", MODES)
def test_a_cancellation_once_the_capture_started_is_too_late_and_a_retry_replays(
        proxy_url: str, mint: Mint, engine: Engine, told: Path, answered: Path,
        mode: str) -> None:
    token = mint()
    args = {"duration": 1, "steps": 2}

    async def go() -> CallToolResult:
        async with agent_on(proxy_url, mode) as client:
            with ExitStack() as lock:
                async with running_call(client, token.token, args):
                    lock.enter_context(ledger_locked(engine))  # held: the capture will wait
                    while "Long running operation completed" not in answered.read_text():
                        await anyio.sleep(0.1)
                    await anyio.sleep(1)  # the proxy is capturing
                    assert call_rows(engine, token.claims.jti)[0]["status"] == "held"
                await anyio.sleep(1)  # the cancellation reaches the proxy
            await settled(engine, token.claims.jti)
            return await client.call_tool(LONG, args, meta={TOKEN_META: token.token})  # type: ignore[arg-type]

    retried = anyio.run(go)
    assert [row["status"] for row in call_rows(engine, token.claims.jti)] == ["captured"]
    assert receipt_of(retried)["amountUsd"] == "0.005"  # the stored result, replayed
    assert token_view(engine, token).spent == usd("0.005")  # billed once
    messages = [json.loads(line) for line in told.read_text().splitlines() if line.strip()]
    assert [message["params"]["name"] for message in messages
            if message.get("method") == "tools/call"] == [LONG]  # the upstream ran it once


@pytest.mark.parametrize("point", ["hold", "upstream", "capture"])
def test_a_plain_task_cancel_at_each_step_of_a_paid_call_settles_its_hold_once(
        proxy: Proxy, mint: Mint, engine: Engine, answered: Path, told: Path,
        point: str) -> None:
    """The task handling a paid call is cancelled with a plain ``task.cancel()`` (no anyio
    scope: the shields around the ledger steps do not hold it back, and the ledger work goes on
    on its worker thread) while its hold waits for the ledger, while the upstream runs it, or
    while its capture waits for the ledger. The hold ends voided, or (the capture had started)
    captured once and replayed to a retry: never left held, never charged twice."""
    token = mint()
    step = Step(engine=engine, answered=answered, jti=token.claims.jti,
                handling=handling_tasks(proxy))
    args = {"duration": 2, "steps": 4}

    async def go() -> CallToolResult:
        async with agent_on(str(proxy.url), "legacy") as client:  # type: ignore[attr-defined]

            async def call() -> None:
                with suppress(MCPError):  # the cut-off handling may close the request's stream
                    await client.call_tool(LONG, args, meta={TOKEN_META: token.token},  # type: ignore[arg-type]
                                           progress_callback=step.progress)

            await step.cancelled_at(point, call, lambda: settled(engine, token.claims.jti))
        async with agent_on(str(proxy.url), "legacy") as client:  # type: ignore[attr-defined]
            return await client.call_tool(LONG, args, meta={TOKEN_META: token.token})  # type: ignore[arg-type]

    retried = anyio.run(go)
    messages = [json.loads(line) for line in told.read_text().splitlines() if line.strip()]
    ran = [message for message in messages if message.get("method") == "tools/call"]
    if point == "capture":  # too late to cancel: charged once, and the retry gets the receipt
        assert receipt_of(retried)["amountUsd"] == "0.005" and len(ran) == 1
        assert [row["status"] for row in call_rows(engine, token.claims.jti)] == ["captured"]
        assert token_view(engine, token).spent == usd("0.005")
    else:  # voided; the retry is a new call, held and captured on its own
        assert [row["status"] for row in call_rows(engine, token.claims.jti)] == [
            "voided", "captured"]
        assert token_view(engine, token).spent == usd("0.005")
    assert token_view(engine, token).held == 0
    assert_ledger_sound(engine)


@dataclass(kw_only=True)
class CutOff:
    """A call a test cuts off in the proxy: the proxy's ``handling`` tasks, ``running`` once
    the upstream reports progress, and the ``lock`` its ledger steps wait on."""

    handling: list[asyncio.Task[Any]]
    running: anyio.Event = field(default_factory=anyio.Event)
    lock: ExitStack = field(default_factory=ExitStack)

    async def progress(self, done: float, total: float | None, message: str | None) -> None:
        self.running.set()

    async def cancelled_at(self, point: str, call: Callable[[], Awaitable[None]],
                           settled: Callable[[], Awaitable[None]]) -> None:
        """Runs ``call`` and, once it is at ``point`` (a method of this step), cancels the
        proxy's task handling it with a plain ``task.cancel()``; then lets the ledger step it
        cut off go on, and waits for ``settled``."""
        with self.lock:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(call)
                await getattr(self, point)()
                self.handling[0].get_loop().call_soon_threadsafe(self.handling[0].cancel)
                await anyio.sleep(0.5)  # the cancellation lands
                self.lock.close()  # the ledger step it cut off goes on
                await settled()
                tasks.cancel_scope.cancel()


@dataclass(kw_only=True)
class Step(CutOff):
    """Where a paid call of LONG is in the proxy, for a test to cancel it there: each method
    returns once the call is at its step (``lock`` keeps the ledger locked when it must wait)."""

    engine: Engine
    answered: Path
    jti: str

    async def hold(self) -> None:
        """Its hold waits for the ledger."""
        self.lock.enter_context(ledger_locked(self.engine))
        while not self.handling:
            await anyio.sleep(0.05)
        await anyio.sleep(1)  # the hold is being taken
        assert call_rows(self.engine, self.jti) == []

    async def upstream(self) -> None:
        """The upstream runs it."""
        await self.running.wait()

    async def capture(self) -> None:
        """The upstream answered; its capture waits for the ledger."""
        await self.running.wait()
        self.lock.enter_context(ledger_locked(self.engine))
        while "Long running operation completed" not in self.answered.read_text():
            await anyio.sleep(0.1)
        await anyio.sleep(1)  # the proxy is capturing
        assert call_rows(self.engine, self.jti)[0]["status"] == "held"


def handling_tasks(proxy: Proxy) -> list[asyncio.Task[Any]]:
    """The tasks handling the proxy's paid calls, each noted as its call starts (the proxy's
    own ``_call`` runs unchanged inside)."""
    tasks: list[asyncio.Task[Any]] = []
    call = proxy.billing._call

    async def noting(ctx: Any, params: Any) -> Any:
        task = asyncio.current_task()
        assert task is not None
        tasks.append(task)
        return await call(ctx, params)

    proxy.billing._call = noting  # type: ignore[method-assign]
    return tasks


@asynccontextmanager
async def agent_on(url: str, mode: str) -> AsyncIterator[Client]:
    """The official client on the proxy at ``url``, in ``mode``."""
    async with httpx2.AsyncClient(timeout=60) as web, \
            Client(streamable_http_client(url, http_client=web), mode=mode, cache=None) as client:
        yield client


@asynccontextmanager
async def running_call(client: Client, token: str, args: dict[str, Any]) -> AsyncIterator[None]:
    """A paid call of LONG, entered once it runs upstream (its first progress came) and
    cancelled by the agent when the block ends; answering it fails the test."""
    running = anyio.Event()

    async def progress(progress: float, total: float | None, message: str | None) -> None:
        running.set()

    async def call() -> None:
        await client.call_tool(LONG, args, meta={TOKEN_META: token},  # type: ignore[arg-type]
                               progress_callback=progress)
        raise AssertionError("the cancelled call was answered")

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(call)
        await running.wait()
        yield
        tasks.cancel_scope.cancel()


@contextmanager
def ledger_locked(engine: Engine) -> Iterator[None]:
    """No hold, capture or x402 payment can be written until the block ends: SQLite's write
    lock (``BEGIN IMMEDIATE``), or on PostgreSQL a lock on the balances a hold or capture
    updates and on the payments an x402 reserve inserts (reads go on)."""
    with writing(engine) as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("LOCK TABLE accounts, x402_payments IN EXCLUSIVE MODE"))
        yield


async def settled(engine: Engine, jti: str) -> None:
    """Wait until the token's call is no longer held (at most SETTLED_WITHIN seconds)."""
    deadline = time.monotonic() + SETTLED_WITHIN
    while call_rows(engine, jti) == [] or call_rows(engine, jti)[0]["status"] == "held":
        assert time.monotonic() < deadline, f"still held: {call_rows(engine, jti)}"
        await anyio.sleep(0.1)


def call_rows(engine: Engine, jti: str) -> list[dict[str, Any]]:
    with reading(engine) as conn:
        rows = conn.execute(select(calls.c.tool, calls.c.status, calls.c.amount,
                                   calls.c.receipt).where(calls.c.jti == jti)).mappings()
        return [dict(row) for row in rows]


def assert_cut_off(engine: Engine, token: Any, told: Path) -> None:
    """One call, voided without a receipt, nothing billed; the upstream got the cancellation of
    the very request the proxy sent it."""
    assert call_rows(engine, token.claims.jti) == [
        {"tool": LONG, "status": "voided", "amount": None, "receipt": None}]
    assert_nothing_billed(engine, token)
    deadline = time.monotonic() + SETTLED_WITHIN
    while (cancelled := upstream_cancelled(told)) is None:
        assert time.monotonic() < deadline, "the upstream was not told: " + told.read_text()
        time.sleep(0.1)
    assert cancelled


def upstream_cancelled(told: Path) -> bool | None:
    """Whether the upstream got notifications/cancelled for its tools/call of LONG (None: not
    yet)."""
    messages = [json.loads(line) for line in told.read_text().splitlines() if line.strip()]
    called = [message["id"] for message in messages if message.get("method") == "tools/call"
              and message["params"]["name"] == LONG]
    assert len(called) == 1, messages
    cancels = [message["params"].get("requestId") for message in messages
               if message.get("method") == "notifications/cancelled"]
    return (called[0] in cancels) or None



class Heard:
    """A Python SDK server over streamable HTTP as the upstream, and what it heard: every
    JSON-RPC message posted to it (as the stdio upstream's input is copied) and the request ids
    of the calls whose handlers were cancelled. ``handshake`` makes it a 2025-11-25 server: it
    refuses ``server/discover``, so the proxy's client falls back to initialize and cancels
    with ``notifications/cancelled`` (on 2026-07-28 it closes the request's stream instead)."""

    def __init__(self, *, handshake: bool) -> None:
        self.handshake = handshake
        self.messages: list[dict[str, Any]] = []
        self.running: list[str] = []
        self.cancelled: list[str] = []

    def app(self) -> ASGIApp:
        """The server's app, noting each message posted to it."""
        app = self._server().streamable_http_app()

        async def heard(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http" or scope["method"] != "POST":
                return await app(scope, receive, send)
            body = await _body(receive)
            message = json.loads(body)
            self.messages.append(message)
            if self.handshake and message.get("method") == "server/discover":
                return await JSONResponse({"jsonrpc": "2.0", "id": message["id"], "error": {
                    "code": METHOD_NOT_FOUND, "message": "Method not found"}})(
                        scope, receive, send)
            return await app(scope, _replaying(body, receive), send)

        return heard

    def _server(self) -> MCPServer:
        """A server whose tool ``slow`` runs until cancelled, noting it."""
        server: MCPServer = MCPServer("heard")

        @server.tool()
        async def slow(ctx: Context) -> str:  # type: ignore[type-arg]
            self.running.append(str(ctx.request_id))
            try:
                await anyio.sleep(60)
            except anyio.get_cancelled_exc_class():
                self.cancelled.append(str(ctx.request_id))
                raise
            return "not cancelled"

        return server


async def _body(receive: Receive) -> bytes:
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    return body


def _replaying(body: bytes, receive: Receive) -> Receive:
    """``receive`` with ``body`` read already: it gives the body, then what comes (a
    disconnect)."""
    given = False

    async def replay() -> Message:
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


@pytest.fixture
def slow_priced(priced: Settings) -> Settings:
    """The proxy tests' pricing with the Python upstream's ``slow`` tool paid."""
    save_pricing_text(priced.pricing_path, PRICING + '\n[tools.slow]\nprice = "0.004"\n')
    return priced


@pytest.mark.parametrize("era", ["2025-11-25", "2026-07-28"])
@pytest.mark.parametrize("mode", MODES)
def test_a_paid_call_the_agent_cancels_is_cancelled_at_an_http_upstream(
        slow_priced: Settings, verifier: Verifier, mint: Mint, engine: Engine, mode: str,
        era: str) -> None:
    token = mint()
    heard = Heard(handshake=era == "2025-11-25")
    with serve(heard.app()) as upstream_url:
        upstream = Upstream(UpstreamTarget.parse(command=None, url=upstream_url),
                            connect_timeout=30)
        with serve(build_app(Proxy(verifier, upstream, Limits(call_timeout=60)))) as url:

            async def go() -> None:
                async with agent_on(url, mode) as client:

                    async def call() -> None:
                        await client.call_tool("slow", {}, meta={TOKEN_META: token.token})  # type: ignore[arg-type]
                        raise AssertionError("the cancelled call was answered")

                    async with anyio.create_task_group() as tasks:
                        tasks.start_soon(call)
                        while not heard.running:  # held, and running upstream
                            await anyio.sleep(0.05)
                        tasks.cancel_scope.cancel()
                    await settled(engine, token.claims.jti)
                    deadline = time.monotonic() + SETTLED_WITHIN
                    while not heard.cancelled:
                        assert time.monotonic() < deadline, f"not cancelled: {heard.messages}"
                        await anyio.sleep(0.05)

            anyio.run(go)
    assert call_rows(engine, token.claims.jti) == [
        {"tool": "slow", "status": "voided", "amount": None, "receipt": None}]
    assert_nothing_billed(engine, token)
    called = [message["id"] for message in heard.messages
              if message.get("method") == "tools/call"]
    assert len(called) == 1 and heard.cancelled == [str(called[0])]  # the proxy's request
    cancels = [message["params"]["requestId"] for message in heard.messages
               if message.get("method") == "notifications/cancelled"]
    assert cancels == (called if era == "2025-11-25" else [])  # 2026-07-28: its stream closed

"""Failures between the proxy and the upstream, and the proxy's own limits: whatever goes wrong,
a held call is voided and nothing is billed."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

import anyio
import httpx2
import pytest
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import CallToolResult
from sqlalchemy import Engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mcpbill_cli.config import Settings
from mcpbill_cli.mcp import TOKEN_META
from mcpbill_cli.proxy import Limits, Proxy, Upstream, UpstreamTarget, build_app
from mcpbill_cli.verifier import Verifier
from tests.mcp.conftest import (
    MCP_HEADERS,
    Mint,
    receipt_of,
    refusal_of,
    serve,
    token_view,
    usd,
)
from tests.mcp.test_http import free_port, wait_for_port

from .conftest import EVERYTHING, NODE, Running, agent
from .test_billing import assert_nothing_billed
from .test_cut_off import call_rows

LONG = "trigger-long-running-operation"


@pytest.fixture
def limits() -> Limits:
    """A short call timeout, one call in flight, 4 KiB requests."""
    return Limits(call_timeout=1.5, max_concurrent=1, max_request_bytes=4096)


def test_an_upstream_that_hangs_past_the_timeout_is_voided(
        running: Running, mint: Mint, engine: Engine) -> None:
    token = mint()

    async def go() -> CallToolResult:
        async with running.connect(token.token) as agent:
            return await agent.call(LONG, {"duration": 4, "steps": 1})

    error = refusal_of(anyio.run(go))
    assert error["code"] == "UPSTREAM_TIMEOUT" and error["tool"] == LONG
    assert_nothing_billed(engine, token)


def test_calls_over_the_concurrency_limit_are_refused_with_a_code(
        running: Running, mint: Mint, engine: Engine) -> None:
    token = mint()
    results: dict[str, CallToolResult] = {}

    async def go() -> None:
        started = anyio.Event()

        async def progress(done: float, total: float | None, message: str | None) -> None:
            started.set()

        async def first() -> None:
            async with running.connect(token.token) as agent:
                results["first"] = await agent.call(LONG, {"duration": 1, "steps": 4},
                                                    progress_callback=progress)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(first)
            await started.wait()  # the first call is in flight upstream
            async with running.connect(token.token) as agent:
                results["second"] = await agent.call("echo", {"message": "one too many"})

    anyio.run(go)
    error = refusal_of(results["second"])
    assert error["code"] == "PROXY_BUSY" and error["retryAfterMs"] > 0
    assert receipt_of(results["first"])["amountUsd"] == "0.005"
    assert token_view(engine, token).spent == usd("0.005")


@pytest.mark.parametrize("upstream_kind", ["http"], indirect=True)
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # no ledger work happens
def test_an_oversized_request_is_refused_before_anything_is_held(
        running: Running, mint: Mint, engine: Engine) -> None:
    token = mint()
    call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": "echo", "arguments": {"message": "x" * 5000},
        "_meta": {"dev.mcpbill/token": token.token}}}
    with httpx2.Client(headers=MCP_HEADERS, timeout=30) as web:
        refused = web.post(running.url, json=call)
    assert refused.status_code == 413
    error = refused.json()["error"]
    assert error["data"]["code"] == "REQUEST_TOO_LARGE" and error["data"]["limitBytes"] == 4096

    async def official() -> None:  # the official client is refused too, and says so
        async with running.connect(token.token) as agent:
            await agent.call("echo", {"message": "y" * 5000})

    with pytest.raises(Exception):  # noqa: B017, PT011 - whatever the client makes of a 413
        anyio.run(official)
    assert_nothing_billed(engine, token)


@pytest.mark.parametrize("upstream_kind", ["stdio"], indirect=True)
@pytest.mark.parametrize("limits", [Limits(call_timeout=30)], indirect=False)
def test_an_upstream_killed_mid_call_is_voided_and_restarted(
        running: Running, mint: Mint, engine: Engine) -> None:
    token = mint()
    assert running.pidfile is not None

    killed: list[int] = []

    async def go() -> tuple[CallToolResult, CallToolResult]:
        async def progress(done: float, total: float | None, message: str | None) -> None:
            if not killed:  # the call is running upstream: kill the upstream
                killed.append(upstream_pid(running.pidfile))  # type: ignore[arg-type]
                os.kill(killed[0], signal.SIGKILL)

        async with running.connect(token.token) as agent:
            cut = await agent.call(LONG, {"duration": 10, "steps": 20},
                                   progress_callback=progress)
            after = await agent.call("echo", {"message": "after the restart"})
        return cut, after

    cut, after = anyio.run(go)
    assert refusal_of(cut)["code"] == "UPSTREAM_UNAVAILABLE"
    for told in (str(running.pidfile), str(NODE), str(EVERYTHING)):  # the upstream's command
        assert told not in cut.model_dump_json(), told  # line is the operator's
    assert receipt_of(after)["amountUsd"] == "0.002"
    assert upstream_pid(running.pidfile) != killed[0] and running.proxy.upstream.connects == 2
    assert token_view(engine, token).spent == usd("0.002")  # the cut call cost nothing
    assert token_view(engine, token).held == 0


def upstream_pid(pidfile: Path, timeout: float = 30) -> int:
    """The latest stdio upstream's pid, once its shell has written it (it starts on the first
    request that needs it)."""
    deadline = time.monotonic() + timeout
    while not (pidfile.exists() and pidfile.read_text().strip()):
        assert time.monotonic() < deadline, f"the upstream never wrote {pidfile}"
        time.sleep(0.05)
    return int(pidfile.read_text().strip())



@pytest.mark.parametrize("limits", [Limits(call_timeout=30)], indirect=False)
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the ledger side is as above
def test_an_http_upstream_that_dies_mid_call_is_voided_and_reconnected(
        priced: Settings, verifier: Verifier, limits: Limits, mint: Mint, engine: Engine,
        tmp_path: Path) -> None:
    token = mint()
    port = free_port()
    first = start_everything_http(port)
    upstream = Upstream(UpstreamTarget.parse(command=None, url=f"http://127.0.0.1:{port}/mcp"),
                        connect_timeout=30)
    proxy = Proxy(verifier, upstream, limits)
    restarted: list[subprocess.Popen[bytes]] = []
    try:
        with serve(build_app(proxy)) as url:

            async def go() -> tuple[CallToolResult, CallToolResult]:
                killed = anyio.Event()

                async def progress(done: float, total: float | None,
                                   message: str | None) -> None:
                    if not killed.is_set():
                        first.kill()
                        first.wait(10)
                        killed.set()

                async with agent(url, token.token) as client:
                    cut = await client.call(LONG, {"duration": 10, "steps": 20},
                                            progress_callback=progress)
                    restarted.append(start_everything_http(port))
                    after = await client.call("echo", {"message": "after the reconnect"})
                return cut, after

            cut, after = anyio.run(go)
    finally:
        for server in (first, *restarted):
            server.kill()
            server.wait(10)
    assert refusal_of(cut)["code"] == "UPSTREAM_UNAVAILABLE"
    assert receipt_of(after)["amountUsd"] == "0.002"
    assert token_view(engine, token).spent == usd("0.002")
    assert token_view(engine, token).held == 0


def start_everything_http(port: int) -> subprocess.Popen[bytes]:
    server = subprocess.Popen([str(NODE), str(EVERYTHING), "streamableHttp"],
                              env={"PATH": "/usr/bin:/bin", "PORT": str(port)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, server)  # type: ignore[arg-type]
    return server



@pytest.mark.parametrize("path", ["plain", "httpx"])
@pytest.mark.parametrize("standalone", [True, False], ids=["standalone", "no-standalone"])
@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
def test_an_http_upstream_restarted_between_calls_is_reconnected_and_each_call_billed_once(
        priced: Settings, verifier: Verifier, mint: Mint, engine: Engine, mode: str,
        standalone: bool, path: str) -> None:
    """The upstream's standalone stream breaks as it dies: the proxy reconnects at once. Behind a
    front that offers no standalone stream, the proxy hears of the restart only from the
    restarted upstream's 400 to the old session's next request (it does not know the session):
    it opens a new session and sends that request again, the paid call under its hold. The
    legacy era's paid calls are posted by the proxy itself, on connections of its own or (a URL
    with credentials) with httpx."""
    token = mint()
    port = free_port()
    servers = [start_everything_http(port)]
    target = f"http://127.0.0.1:{port}/mcp"
    meta = {TOKEN_META: token.token}
    with ExitStack() as fronted:
        if not standalone:
            target = fronted.enter_context(serve(without_standalone_stream(target)))
        if path == "httpx":
            target = target.replace("http://", "http://user:secret@")
        upstream = Upstream(UpstreamTarget.parse(command=None, url=target), connect_timeout=30)
        paid, free, listed = restarted_between_calls(
            Proxy(verifier, upstream, Limits(call_timeout=30)), servers, port, mode, meta)
    assert receipt_of(paid)["amountUsd"] == "0.002"
    assert not free.is_error and "5" in str(free.content[0])
    assert "echo" in listed
    assert upstream.connects == 2  # one new session; every call after the restart used it
    assert [row["status"] for row in call_rows(engine, token.claims.jti)] == ["captured"] * 2
    assert token_view(engine, token).spent == usd("0.004")  # each echo once
    assert token_view(engine, token).held == 0


def restarted_between_calls(proxy: Proxy, servers: list[subprocess.Popen[bytes]], port: int,
                            mode: str, meta: dict[str, str]
                            ) -> tuple[CallToolResult, CallToolResult, list[str]]:
    """A paid echo, the upstream restarted on ``port``, then a paid echo, a free get-sum and
    tools/list through ``proxy``: their answers."""
    try:
        with serve(build_app(proxy)) as url:

            async def go() -> tuple[CallToolResult, CallToolResult, list[str]]:
                async with httpx2.AsyncClient(timeout=60) as web, \
                        Client(streamable_http_client(url, http_client=web), mode=mode,
                               cache=None) as client:
                    await client.call_tool("echo", {"message": "before"}, meta=meta)  # type: ignore[arg-type]
                    servers[0].kill()
                    servers[0].wait(10)
                    servers.append(start_everything_http(port))  # no session of ours in it
                    paid = await client.call_tool("echo", {"message": "after"}, meta=meta)  # type: ignore[arg-type]
                    free = await client.call_tool("get-sum", {"a": 2, "b": 3})
                    listed = await client.list_tools()
                return paid, free, [tool.name for tool in listed.tools]

            return anyio.run(go)
    finally:
        for server in servers:
            server.kill()
            server.wait(10)


def without_standalone_stream(url: str) -> Starlette:
    """The MCP endpoint at ``url`` behind a front that offers no standalone stream (a GET is
    answered 405, as the spec allows) and passes every other request on as it is."""

    async def forward(request: Request) -> Response:
        if request.method == "GET":
            return Response(status_code=405)
        headers = {name: value for name, value in request.headers.items()
                   if name not in ("host", "content-length")}
        async with httpx2.AsyncClient(timeout=60) as web:
            answer = await web.request(request.method, url, headers=headers,
                                       content=await request.body())
        kept = {name: value for name, value in answer.headers.items()
                if name not in ("content-length", "transfer-encoding", "content-encoding")}
        return Response(answer.content, status_code=answer.status_code, headers=kept)

    return Starlette(routes=[Route("/mcp", forward, methods=["GET", "POST", "DELETE"])])

"""Each way an endless message can reach the proxy is read up to its limit and no further: the
stream never ends, so a test that finishes at all shows it was cut off. The refusal is coded, a
paid call's hold is voided, and the proxy serves the next call, charged once."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import httpx2
import pytest
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult
from sqlalchemy import Engine
from starlette.types import ASGIApp, Receive, Scope, Send

from mcpbill_cli.config import Settings
from mcpbill_cli.metrics import PrometheusMetrics
from mcpbill_cli.pricing import save_pricing_text
from mcpbill_cli.proxy import Limits, Proxy, Upstream, UpstreamTarget, build_app
from mcpbill_cli.verifier import Verifier
from tests.mcp.conftest import (
    MCP_HEADERS,
    Mint,
    assert_ledger_sound,
    receipt_of,
    refusal_of,
    serve,
    token_view,
    usd,
)

from .conftest import PRICING, Running, agent
from .test_cut_off import _body, _replaying
from .test_response_limit import Flooding, assert_voided_then_charged

LIMIT = 16 * 1024
ENDLESS = Path(__file__).with_name("endless_stdio.py")


@pytest.fixture
def endless_priced(priced: Settings) -> Settings:
    save_pricing_text(priced.pricing_path, PRICING + '\n[tools.flood]\nprice = "0.004"\n'
                                                     '\n[tools.fits]\nprice = "0.001"\n')
    return priced


@contextmanager
def stdio_proxy(verifier: Verifier, metrics: PrometheusMetrics, *args: str) -> Iterator[str]:
    command = " ".join([sys.executable, str(ENDLESS), *args])
    upstream = Upstream(UpstreamTarget.parse(command=command, url=None))
    limits = Limits(call_timeout=30, max_response_bytes=LIMIT)
    with serve(build_app(Proxy(verifier, upstream, limits, metrics=metrics))) as url:
        yield url


@pytest.mark.parametrize(("order", "code"), [("id-first", "RESPONSE_TOO_LARGE"),
                                             ("id-last", "UPSTREAM_UNAVAILABLE")])
def test_an_endless_line_from_a_stdio_upstream_is_cut_off_and_the_child_restarted(
        endless_priced: Settings, verifier: Verifier, mint: Mint, engine: Engine, order: str,
        code: str) -> None:
    """A line that can be matched to its call (its id comes first) refuses that call
    RESPONSE_TOO_LARGE; one that cannot, UPSTREAM_UNAVAILABLE. Either way the child is
    restarted and the next call is charged once."""
    token = mint()
    metrics = PrometheusMetrics()

    async def go(url: str) -> tuple[CallToolResult, CallToolResult]:
        async with agent(url, token.token) as paying:
            with anyio.fail_after(25):
                flooded = await paying.call("flood")
            return flooded, await paying.call("fits")

    args = ("--id-last",) if order == "id-last" else ()
    with stdio_proxy(verifier, metrics, *args) as url:
        flooded, fitted = anyio.run(go, url)
    body = refusal_of(flooded)
    assert body["code"] == code and body["tool"] == "flood", body
    if code == "RESPONSE_TOO_LARGE":
        assert body["limitBytes"] == LIMIT and LIMIT < body["sizeBytes"] < LIMIT + 2 * 65536
        assert f"more than {body['sizeBytes']} bytes (cut off)" in body["message"], body
        assert_voided_then_charged(fitted, "0.001", engine, token, metrics, "flood")
    else:  # the child restarted: the next call relayed and charged, the first voided
        assert receipt_of(fitted)["amountUsd"] == "0.001"
        view = token_view(engine, token)
        assert (view.spent, view.held) == (usd("0.001"), 0)
        assert_ledger_sound(engine)


def test_an_endless_line_answering_another_request_is_refused(
        endless_priced: Settings, verifier: Verifier, mint: Mint) -> None:
    token = mint()

    async def go(url: str) -> tuple[MCPError, CallToolResult]:
        async with agent(url, token.token) as paying:
            with anyio.fail_after(25), pytest.raises(MCPError) as refused:
                await paying.client.read_resource("x")
            return refused.value, await paying.call("fits")

    with stdio_proxy(verifier, PrometheusMetrics()) as url:
        error, fitted = anyio.run(go, url)
    assert error.error.data["code"] == "RESPONSE_TOO_LARGE", error.error
    assert error.error.data["limitBytes"] == LIMIT
    assert not fitted.is_error


@pytest.mark.parametrize("upstream_kind", ["http"], indirect=True)
def test_an_endless_chunked_request_is_refused_while_read(
        running: Running, mint: Mint, engine: Engine) -> None:
    """A request body sent chunked has no length to check first: it is refused once what was
    read of it passes the limit, in the same shape as a declared one."""
    token = mint()

    def endless() -> Iterator[bytes]:
        yield (b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo", '
               b'"arguments": {"message": "')
        while True:
            yield b"x" * 65536

    with httpx2.Client(headers=MCP_HEADERS, timeout=30) as web:
        refused = web.post(running.url, content=endless())
    assert refused.status_code == 413
    error = refused.json()["error"]
    assert error["data"]["code"] == "REQUEST_TOO_LARGE" and error["data"]["limitBytes"] == 64 * 1024
    assert "cut off" in error["message"], error

    async def go() -> CallToolResult:
        async with running.connect(token.token) as paying:
            return await paying.call("echo", {"message": "fits"})

    assert receipt_of(anyio.run(go))["amountUsd"] == "0.002"
    view = token_view(engine, token)
    assert (view.spent, view.held) == (usd("0.002"), 0)


class ListFlooding(Flooding):
    """:class:`Flooding`, whose endless answer (in ``mode``) is to the first ``tools/list``
    (the agent's client lists the tools again to check a call's result)."""

    def app(self) -> ASGIApp:
        inner = super().app()

        async def flooding(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and scope["method"] == "POST":
                body = await _body(receive)
                message = json.loads(body)
                if message.get("method") == "tools/list" and not self.cut:
                    return await self._flood(str(message["id"]).encode(), receive, send)
                receive = _replaying(body, receive)
            return await inner(scope, receive, send)

        return flooding


@pytest.mark.parametrize(("mode", "piece"), [("event", 65536), ("json", 65536),
                                              ("event", 256), ("json", 256)])
def test_an_endless_answer_to_tools_list_is_cut_off_and_refused(
        endless_priced: Settings, verifier: Verifier, mint: Mint, engine: Engine,
        mode: str, piece: int) -> None:
    token = mint()
    flooding = ListFlooding(mode, piece)

    async def go(url: str) -> tuple[MCPError, CallToolResult]:
        async with agent(url, token.token) as paying:
            with anyio.fail_after(25), pytest.raises(MCPError) as refused:
                await paying.client.list_tools()
            with anyio.fail_after(10):
                while not flooding.cut:  # the upstream saw its connection closed
                    await anyio.sleep(0.01)
            return refused.value, await paying.call("fits")

    with serve(flooding.app()) as upstream_url:
        upstream = Upstream(UpstreamTarget.parse(command=None, url=upstream_url))
        limits = Limits(call_timeout=30, max_response_bytes=LIMIT)
        with serve(build_app(Proxy(verifier, upstream, limits))) as url:
            error, fitted = anyio.run(go, url)
    data = error.error.data
    assert data["code"] == "RESPONSE_TOO_LARGE" and data["limitBytes"] == LIMIT, data
    assert LIMIT < data["sizeBytes"] < LIMIT + 2 * 65536, data
    assert flooding.cut == 1
    assert receipt_of(fitted)["amountUsd"] == "0.001"
    view = token_view(engine, token)
    assert (view.spent, view.held) == (usd("0.001"), 0)
    assert_ledger_sound(engine)

"""`--max-response-bytes`: an upstream result over the limit is not relayed; a paid call is
voided and refused with RESPONSE_TOO_LARGE, counted in the proxy's metrics. A call the proxy
posts itself is cut off at the limit as it is read: an upstream that streams an endless answer
gets the same refusal, not a timeout, and its connection closed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult
from sqlalchemy import Engine
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from mcpbill_cli.config import Settings
from mcpbill_cli.metrics import PrometheusMetrics
from mcpbill_cli.pricing import save_pricing_text
from mcpbill_cli.proxy import Limits, Proxy, Upstream, UpstreamTarget, build_app
from mcpbill_cli.verifier import Verifier
from tests.mcp.conftest import (
    Mint,
    assert_ledger_sound,
    receipt_of,
    refusal_of,
    serve,
    token_view,
    usd,
)

from .conftest import PRICING, agent, stdio_target
from .test_cut_off import _body, _replaying

Limited = tuple[str, PrometheusMetrics]
LIMIT = 16 * 1024


@pytest.fixture
def response_limit() -> int:
    return LIMIT


@pytest.fixture
def limited(priced: Settings, verifier: Verifier, upstream_kind: str, response_limit: int,
            request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Limited]:
    """A proxy relaying results of at most ``response_limit`` bytes: (its URL, its metrics)."""
    target = (stdio_target(tmp_path / "upstream.pid") if upstream_kind == "stdio"
              else UpstreamTarget.parse(command=None,
                                        url=request.getfixturevalue("everything_http")))
    metrics = PrometheusMetrics()
    limits = Limits(call_timeout=30, max_response_bytes=response_limit)
    with (tmp_path / "upstream.log").open("w") as errlog:
        proxy = Proxy(verifier, Upstream(target, errlog=errlog), limits, metrics=metrics)
        with serve(build_app(proxy)) as url:
            yield url, metrics


def test_a_paid_result_over_the_limit_is_voided_and_refused(
        limited: Limited, mint: Mint, engine: Engine) -> None:
    url, metrics = limited
    token = mint()

    async def go() -> tuple[CallToolResult, CallToolResult]:
        async with agent(url, token.token) as client:
            big = await client.call("echo", {"message": "x" * (LIMIT + 100)})
            small = await client.call("echo", {"message": "fits"})
            return big, small

    big, small = anyio.run(go)
    body = refusal_of(big)
    assert body["code"] == "RESPONSE_TOO_LARGE" and body["limitBytes"] == LIMIT
    assert body["sizeBytes"] > LIMIT and body["tool"] == "echo"
    assert "x" * 100 not in str(big.content)  # the upstream's text never reached the agent
    assert_voided_then_charged(small, "0.002", engine, token, metrics, "echo")


def assert_voided_then_charged(next_result: CallToolResult, price: str, engine: Engine,
                               token: Any, metrics: PrometheusMetrics, tool: str) -> None:
    """The oversized call was voided and refused (counted), and the next call, relayed and
    charged ``price``, is the token's only spending."""
    assert receipt_of(next_result)["amountUsd"] == price  # the proxy goes on relaying
    view = token_view(engine, token)
    assert (view.spent, view.held) == (usd(price), 0)
    assert_ledger_sound(engine)
    registry = metrics.registry
    assert registry.get_sample_value("mcpbill_refusals_total", {
        "tool": tool, "code": "RESPONSE_TOO_LARGE"}) == 1
    assert registry.get_sample_value("mcpbill_calls_total", {
        "tool": tool, "outcome": "voided"}) == 1
    assert registry.get_sample_value("mcpbill_holds_open") == 0


@pytest.mark.parametrize("response_limit", [2048])
def test_a_limit_under_the_upstream_s_tool_list_still_relays_small_results(
        limited: Limited, mint: Mint, engine: Engine, response_limit: int) -> None:
    """The reference server's tools/list is over 2 KiB: small calls, paid and free, are
    relayed all the same (the proxy never lists the upstream's tools behind a call), and an
    oversized result is measured as itself. The agent's client does not check results against
    listed schemas (the SDK's check lists the tools, through the proxy, over its limit)."""
    url, _ = limited
    token = mint()

    async def unchecked(name: str, result: Any) -> None:
        return None

    async def go() -> tuple[CallToolResult, CallToolResult, CallToolResult]:
        async with agent(url, token.token) as client:
            client.client.session.validate_tool_result = unchecked  # type: ignore[method-assign]
            paid = await client.call("echo", {"message": "small"})
            free = await client.call("get-sum", {"a": 1, "b": 2})
            big = await client.call("echo", {"message": "x" * (2 * response_limit)})
            return paid, free, big

    paid, free, big = anyio.run(go)
    assert receipt_of(paid)["amountUsd"] == "0.002" and not free.is_error
    assert "3" in str(free.content)
    body = refusal_of(big)
    assert (body["code"], body["limitBytes"]) == ("RESPONSE_TOO_LARGE", response_limit)
    assert 2 * response_limit < body["sizeBytes"] < 3 * response_limit  # the echo's own size
    view = token_view(engine, token)
    assert (view.spent, view.held) == (usd("0.002"), 0)
    assert_ledger_sound(engine)


@pytest.mark.parametrize("upstream_kind", ["stdio"])
@pytest.mark.parametrize("response_limit", [4096])
def test_other_results_over_the_limit_are_refused_too(
        limited: Limited, response_limit: int) -> None:
    url, _ = limited

    async def go() -> tuple[int, MCPError]:
        async with agent(url, None) as client:
            prompt = await client.client.get_prompt("simple-prompt")  # small: relayed
            with pytest.raises(MCPError) as refused:
                await client.client.list_tools()  # the reference server's list is larger
            return len(prompt.messages), refused.value

    messages, error = anyio.run(go)
    assert messages > 0
    assert error.error.data["code"] == "RESPONSE_TOO_LARGE"
    assert error.error.data["limitBytes"] == response_limit


class Flooding:
    """The upstream (a Python SDK server of the 2025-11-25 era, whose calls the proxy posts
    itself): its tool ``fits`` answers; a call of ``flood`` is answered, in ``mode``, with a
    body that never ends, until the proxy closes the connection (counted in ``cut``): pieces of
    ``piece`` bytes, a pause between small ones, so that each reaches the proxy as a read of its
    own and a limit counted per read, not across them, would never be passed."""

    MODES = {  # status, content type, the answer's start (the rest is "x" without end)
        "event": (200, b"text/event-stream",
                  b'event: message\ndata: {"jsonrpc": "2.0", "id": "%s", "result": {"content": '
                  b'[{"type": "text", "text": "'),
        "json": (200, b"application/json",
                 b'{"jsonrpc": "2.0", "id": "%s", "result": {"content": [{"type": "text", '
                 b'"text": "'),
        "error": (500, b"text/plain", b"%s failed: "),
        "refused": (400, b"application/json",  # read by the HTTP client's hook, once
                    b'{"jsonrpc": "2.0", "id": "%s", "error": {"code": -32600, "message": "'),
    }

    def __init__(self, mode: str, piece: int = 65536) -> None:
        self.mode = mode
        self.piece = piece
        self.cut = 0
        server: MCPServer = MCPServer("flooding")

        @server.tool()
        def fits() -> str:
            return "fits"

        self._app = server.streamable_http_app()

    def app(self) -> ASGIApp:
        async def flooding(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http" or scope["method"] != "POST":
                return await self._app(scope, receive, send)
            body = await _body(receive)
            message = json.loads(body)
            if message.get("method") == "server/discover":  # the 2025-11-25 era
                return await JSONResponse({"jsonrpc": "2.0", "id": message["id"], "error": {
                    "code": types.METHOD_NOT_FOUND, "message": "Method not found"}})(
                        scope, receive, send)
            if message.get("method") == "tools/call" and message["params"]["name"] == "flood":
                return await self._flood(str(message["id"]).encode(), receive, send)
            return await self._app(scope, _replaying(body, receive), send)

        return flooding

    async def _flood(self, request_id: bytes, receive: Receive, send: Send) -> None:
        status, kind, start = self.MODES[self.mode]
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", kind)]})
        await send({"type": "http.response.body", "body": start % request_id,
                    "more_body": True})

        pause = 0 if self.piece >= 65536 else 0.001

        async def endless() -> None:
            while True:
                await send({"type": "http.response.body", "body": b"x" * self.piece,
                            "more_body": True})
                await anyio.sleep(pause)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(endless)
            while (await receive())["type"] != "http.disconnect":
                pass
            self.cut += 1
            tasks.cancel_scope.cancel()


@pytest.fixture
def floods_priced(priced: Settings) -> Settings:
    save_pricing_text(priced.pricing_path, PRICING + '\n[tools.flood]\nprice = "0.004"\n'
                                                     '\n[tools.fits]\nprice = "0.001"\n')
    return priced


@pytest.mark.parametrize(("mode", "piece"), [
    *((mode, 65536) for mode in sorted(Flooding.MODES)), ("event", 256), ("json", 256)])
@pytest.mark.parametrize("path", ["plain", "httpx"])
def test_an_endless_answer_is_cut_off_at_the_limit_voided_and_refused(
        floods_priced: Settings, verifier: Verifier, mint: Mint, engine: Engine, mode: str,
        piece: int, path: str) -> None:
    token = mint()
    flooding = Flooding(mode, piece)
    metrics = PrometheusMetrics()

    async def go() -> tuple[CallToolResult, CallToolResult]:
        async with agent(url, token.token) as paying:
            flooded = await paying.call("flood")
            with anyio.fail_after(10):
                while not flooding.cut:  # the upstream saw its connection closed
                    await anyio.sleep(0.01)
            return flooded, await paying.call("fits")

    with serve(flooding.app()) as upstream_url:
        if path == "httpx":  # credentials in the URL: posted with httpx, as httpx sends them
            upstream_url = upstream_url.replace("http://", "http://user:secret@")
        upstream = Upstream(UpstreamTarget.parse(command=None, url=upstream_url))
        limits = Limits(call_timeout=20, max_response_bytes=LIMIT)
        with serve(build_app(Proxy(verifier, upstream, limits, metrics=metrics))) as url:
            flooded, fitted = anyio.run(go)
    body = refusal_of(flooded)
    assert body["code"] == "RESPONSE_TOO_LARGE" and body["tool"] == "flood", body
    assert body["limitBytes"] == LIMIT and LIMIT < body["sizeBytes"] < 2 * LIMIT + 65536
    assert f"more than {body['sizeBytes']} bytes (cut off)" in body["message"], body
    assert flooding.cut == 1
    assert_voided_then_charged(fitted, "0.001", engine, token, metrics, "flood")

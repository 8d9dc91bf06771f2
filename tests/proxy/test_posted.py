"""Paid calls the proxy posts itself on an HTTP upstream's session
(:mod:`mcpbill_cli.proxy.posted`): what the upstream sends on the call's stream before its
answer is handled as the SDK's client would (progress relayed, a ``ping`` answered, a request
for a capability never declared refused), and the call is answered and billed once. The
upstream is a Python SDK server in the 2025-11-25 era (the one with sessions), which notes every
message posted to it."""

from __future__ import annotations

import json
from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp.server.mcpserver import Context, MCPServer
from mcp.shared.exceptions import MCPError
from mcp.shared.message import ServerMessageMetadata
from sqlalchemy import Engine
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from mcpbill_cli.config import Settings
from mcpbill_cli.pricing import save_pricing_text
from mcpbill_cli.proxy import Limits, Proxy, Upstream, UpstreamTarget, build_app
from mcpbill_cli.verifier import Verifier
from tests.mcp.conftest import Mint, assert_ledger_sound, receipt_of, serve, token_view, usd

from .conftest import PRICING, agent
from .test_cut_off import _body, _replaying


class Asking:
    """The upstream: its tool ``asks`` reports progress, pings the client and asks it for its
    roots (a capability the proxy's session never declared) on the call's own stream before it
    answers."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    def app(self) -> ASGIApp:
        app = self._server().streamable_http_app()

        async def noting(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http" or scope["method"] != "POST":
                return await app(scope, receive, send)
            body = await _body(receive)
            message = json.loads(body)
            self.messages.append(message)
            if message.get("method") == "server/discover":  # the 2025-11-25 era
                return await JSONResponse({"jsonrpc": "2.0", "id": message["id"], "error": {
                    "code": types.METHOD_NOT_FOUND, "message": "Method not found"}})(
                        scope, receive, send)
            return await app(scope, _replaying(body, receive), send)

        return noting

    def _server(self) -> MCPServer:
        server: MCPServer = MCPServer("asking")

        @server.tool()
        async def asks(ctx: Context) -> str:  # type: ignore[type-arg]
            on_the_call = ServerMessageMetadata(related_request_id=ctx.request_id)
            await ctx.report_progress(1, 2, "half")
            await ctx.session.send_request(types.PingRequest(), types.EmptyResult,
                                           metadata=on_the_call)
            try:
                await ctx.session.send_request(types.ListRootsRequest(), types.ListRootsResult,
                                               metadata=on_the_call)
            except MCPError as error:
                refused = error.error.code
            await ctx.report_progress(2, 2, "done")
            return f"pinged, roots refused {refused}"

        return server

    def answers(self) -> list[dict[str, Any]]:
        """The client's answers to the upstream's requests."""
        return [message for message in self.messages
                if "method" not in message and ("result" in message or "error" in message)]


@pytest.fixture
def asks_priced(priced: Settings) -> Settings:
    """The proxy tests' pricing with the Python upstream's ``asks`` tool paid."""
    save_pricing_text(priced.pricing_path, PRICING + '\n[tools.asks]\nprice = "0.004"\n')
    return priced


def test_a_posted_call_relays_progress_answers_a_ping_and_refuses_an_undeclared_request(
        asks_priced: Settings, verifier: Verifier, mint: Mint, engine: Engine) -> None:
    token = mint()
    asking = Asking()
    progress: list[tuple[float, float | None, str | None]] = []

    async def noted(done: float, total: float | None, message: str | None) -> None:
        progress.append((done, total, message))

    async def go() -> types.CallToolResult:
        async with agent(url, token.token) as paying:
            return await paying.call("asks", progress_callback=noted)

    with serve(asking.app()) as upstream_url:
        upstream = Upstream(UpstreamTarget.parse(command=None, url=upstream_url))
        with serve(build_app(Proxy(verifier, upstream, Limits(call_timeout=30)))) as url:
            result = anyio.run(go)
    assert not result.is_error, result
    assert result.content[0].text == f"pinged, roots refused {types.METHOD_NOT_FOUND}"  # type: ignore[union-attr]
    assert progress == [(1, 2, "half"), (2, 2, "done")]
    answers = asking.answers()
    assert [("result" in answer, answer.get("error", {}).get("code")) for answer in answers] \
        == [(True, None), (False, types.METHOD_NOT_FOUND)]
    called = [message for message in asking.messages if message.get("method") == "tools/call"]
    assert len(called) == 1  # posted once, by the proxy itself: its own request id
    assert str(called[0]["id"]).startswith("mcpbill-")
    assert receipt_of(result) is not None
    assert token_view(engine, token).spent == usd("0.004")
    assert_ledger_sound(engine)

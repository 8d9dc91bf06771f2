"""Elicitation in the modes the agent declared: the proxy declares both modes to the upstream
(the SDK's client has no way to declare fewer), so it answers an ``elicitation/create`` in a
mode the agent did not declare with -32602 itself, without asking the agent.

The reference server (over stdio, its standard input copied to a file so a test reads what the
proxy answered it) asks in URL mode (``trigger-url-elicitation``) and in form mode
(``trigger-elicitation-request``). The agent is the official client, whose capabilities are
rewritten on the wire to the modes a test declares: the client itself always declares both.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
from anyio.abc import ObjectReceiveStream, ObjectSendStream
from mcp.client import Client
from mcp.client.session import ClientRequestContext
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.message import SessionMessage
from sqlalchemy import Engine

from mcpbill_cli.config import Settings
from mcpbill_cli.mcp import TOKEN_META
from mcpbill_cli.pricing import save_pricing_text
from mcpbill_cli.proxy import Limits, Proxy, Upstream, UpstreamTarget, build_app
from mcpbill_cli.verifier import Verifier
from tests.mcp.conftest import Mint, assert_ledger_sound, receipt_of, serve, token_view, usd

from .conftest import EVERYTHING, NODE, PRICING
from .test_billing import assert_nothing_billed

URL_TOOL = "trigger-url-elicitation"
FORM_TOOL = "trigger-elicitation-request"
URL_ARGS = {"url": "https://example.com/connect", "message": "Connect your account."}
# An empty capability is form only, for backwards compatibility.
FORM_ONLY: list[dict[str, Any]] = [{}, {"form": {}}]


class Asked:
    """The agent's elicitation callback: accepts whatever it is asked, and keeps it."""

    def __init__(self) -> None:
        self.elicited: list[types.ElicitRequestParams] = []

    async def elicitation(self, context: ClientRequestContext,
                          params: types.ElicitRequestParams) -> types.ElicitResult:
        self.elicited.append(params)
        if params.mode == "url":
            return types.ElicitResult(action="accept")
        return types.ElicitResult(action="accept", content={"name": "Ada Lovelace"})

    def modes(self) -> list[str]:
        return [params.mode for params in self.elicited]


@pytest.fixture
def told(tmp_path: Path) -> Path:
    """Where the stdio upstream's standard input is copied."""
    return tmp_path / "upstream.in"


@pytest.fixture
def priced(home: Settings) -> Settings:
    """The proxy tests' pricing table, the URL-mode tool paid."""
    save_pricing_text(home.pricing_path, PRICING + f'\n[tools."{URL_TOOL}"]\nprice = "0.004"\n')
    return home


@pytest.fixture
def proxy_url(priced: Settings, verifier: Verifier, told: Path, tmp_path: Path) -> Iterator[str]:
    """The proxy in front of the reference server over stdio."""
    command = f'sh -c \'tee -a "{told}" | "{NODE}" "{EVERYTHING}" stdio\''
    with (tmp_path / "upstream.log").open("w") as errlog:
        upstream = Upstream(UpstreamTarget.parse(command=command, url=None), connect_timeout=30,
                            errlog=errlog)
        proxy = Proxy(verifier, upstream, Limits(call_timeout=30, max_concurrent=8))
        with serve(build_app(proxy)) as url:
            yield url


@asynccontextmanager
async def agent(url: str, asked: Asked, elicitation: dict[str, Any]) -> AsyncIterator[Client]:
    """The official client on the proxy, declaring ``elicitation`` as its capability."""
    async with httpx2.AsyncClient(timeout=60) as web, Client(
            declaring(streamable_http_client(url, http_client=web), elicitation),
            mode="legacy", cache=None, elicitation_callback=asked.elicitation) as client:
        yield client


@asynccontextmanager
async def declaring(transport: Any, elicitation: dict[str, Any]
                    ) -> AsyncIterator[tuple[Any, ObjectSendStream[SessionMessage]]]:
    """``transport`` with its initialize request's elicitation capability set to
    ``elicitation``."""
    async with transport as (read, write):
        send, receive = anyio.create_memory_object_stream[SessionMessage](0)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(_rewriting, receive, write, elicitation)
            async with send:
                yield read, send


async def _rewriting(receive: ObjectReceiveStream[SessionMessage], write: Any,
                     elicitation: dict[str, Any]) -> None:
    async with receive:
        async for message in receive:
            request = message.message
            if isinstance(request, types.JSONRPCRequest) and request.method == "initialize":
                assert request.params is not None
                request.params["capabilities"]["elicitation"] = elicitation
            await write.send(message)


def answered_errors(told: Path) -> list[dict[str, Any]]:
    """The JSON-RPC errors the proxy sent the upstream."""
    lines = (json.loads(line) for line in told.read_text().splitlines() if line.strip())
    return [line["error"] for line in lines if "error" in line and "method" not in line]


def text_of(result: types.CallToolResult) -> str:
    return " ".join(str(getattr(part, "text", "")) for part in result.content)


@pytest.mark.parametrize("elicitation", FORM_ONLY, ids=["empty", "form"])
def test_a_url_elicitation_is_refused_for_a_form_only_agent_and_forms_still_reach_it(
        proxy_url: str, mint: Mint, engine: Engine, told: Path,
        elicitation: dict[str, Any]) -> None:
    token, asked = mint(), Asked()

    async def go() -> tuple[types.CallToolResult, types.CallToolResult]:
        async with agent(proxy_url, asked, elicitation) as client:
            url = await client.call_tool(URL_TOOL, URL_ARGS, meta={TOKEN_META: token.token})  # type: ignore[arg-type]
            form = await client.call_tool(FORM_TOOL, {})
            return url, form

    url, form = anyio.run(go)
    assert asked.modes() == ["form"]  # never asked the URL-mode one
    errors = answered_errors(told)
    assert [error["code"] for error in errors] == [types.INVALID_PARAMS]
    assert "url mode" in errors[0]["message"]
    assert url.is_error  # the upstream's own answer to the refusal, voided like any error
    assert_nothing_billed(engine, token)
    assert not form.is_error and "Ada Lovelace" in text_of(form)


def test_a_url_only_agent_is_asked_in_url_mode_and_never_for_a_form(
        proxy_url: str, mint: Mint, engine: Engine, told: Path) -> None:
    token, asked = mint(), Asked()

    async def go() -> tuple[types.CallToolResult, types.CallToolResult]:
        async with agent(proxy_url, asked, {"url": {}}) as client:
            url = await client.call_tool(URL_TOOL, URL_ARGS, meta={TOKEN_META: token.token})  # type: ignore[arg-type]
            form = await client.call_tool(FORM_TOOL, {})
            return url, form

    url, form = anyio.run(go)
    assert asked.modes() == ["url"]
    assert asked.elicited[0].url == URL_ARGS["url"]  # type: ignore[union-attr]
    assert not url.is_error and "completed the URL elicitation" in text_of(url)
    assert receipt_of(url)["amountUsd"] == "0.004"
    assert token_view(engine, token).spent == usd("0.004")
    assert_ledger_sound(engine)
    assert [error["code"] for error in answered_errors(told)] == [types.INVALID_PARAMS]
    assert form.is_error  # the reference server's answer to a refused form

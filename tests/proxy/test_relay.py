"""What the upstream sends back through the proxy, with the reference server as the upstream and
the official client as the agent: sampling, elicitation and roots asked of the agent during its
call (its answer returned to the upstream), the upstream's log, resource updates and list
changes relayed, each agent through an upstream session of its own (tests/proxy/test_sessions.py
runs several agents at once).
These need the 2025-11-25 era (the initialize handshake); a 2026-07-28 agent has no channel for
them, and a paid call that needed one is voided."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
from mcp.client import Client
from mcp.client.session import ClientRequestContext
from mcp.client.streamable_http import streamable_http_client
from sqlalchemy import Engine

from mcpbill_cli.mcp import TOKEN_META
from tests.mcp.conftest import Mint, assert_ledger_sound, receipt_of, token_view, usd

from .conftest import Running

ROOT_URI = "file:///agent/project"
RESOURCES_CHANGED = "notifications/resources/list_changed"


class Asked:
    """The agent's side: answers the upstream's requests and keeps what it was told."""

    def __init__(self) -> None:
        self.sampled: list[types.CreateMessageRequestParams] = []
        self.elicited: list[types.ElicitRequestParams] = []
        self.roots_asked = 0
        self.logs: list[types.LoggingMessageNotificationParams] = []
        self.updated: list[str] = []
        self.update = anyio.Event()
        self.lists_changed: list[str] = []
        self.list_change = anyio.Event()

    async def sampling(self, context: ClientRequestContext,
                       params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        self.sampled.append(params)
        return types.CreateMessageResult(role="assistant", model="agent-model",
                                         content=types.TextContent(type="text",
                                                                   text="sampled by the agent"))

    async def elicitation(self, context: ClientRequestContext,
                          params: types.ElicitRequestParams) -> types.ElicitResult:
        self.elicited.append(params)
        return types.ElicitResult(action="accept", content={"name": "Ada Lovelace"})

    async def roots(self, context: ClientRequestContext) -> types.ListRootsResult:
        self.roots_asked += 1
        return types.ListRootsResult(roots=[types.Root(uri=ROOT_URI, name="project")])

    async def logging(self, params: types.LoggingMessageNotificationParams) -> None:
        self.logs.append(params)

    async def message(self, message: Any) -> None:
        if isinstance(message, types.ResourceUpdatedNotification):
            self.updated.append(str(message.params.uri))
            self.update.set()
        elif isinstance(message, types.ResourceListChangedNotification
                        | types.ToolListChangedNotification):
            self.lists_changed.append(message.method)
            self.list_change.set()


@asynccontextmanager
async def asked_agent(url: str, asked: Asked, mode: str = "legacy") -> AsyncIterator[Client]:
    async with httpx2.AsyncClient(timeout=60) as web, Client(
            streamable_http_client(url, http_client=web), mode=mode, cache=None,
            sampling_callback=asked.sampling, elicitation_callback=asked.elicitation,
            list_roots_callback=asked.roots, logging_callback=asked.logging,
            message_handler=asked.message) as client:
        yield client


def text_of(result: types.CallToolResult) -> str:
    return str(result.content[0].text)  # type: ignore[union-attr]


def test_sampling_is_asked_of_the_paying_agent_and_the_call_billed(
        running: Running, mint: Mint, engine: Engine) -> None:
    token, asked = mint(), Asked()

    async def go() -> types.CallToolResult:
        async with asked_agent(running.url, asked) as client:
            return await client.call_tool("trigger-sampling-request",
                                          {"prompt": "a haiku on ledgers", "maxTokens": 20},
                                          meta={TOKEN_META: token.token})  # type: ignore[arg-type]

    result = anyio.run(go)
    assert len(asked.sampled) == 1 and asked.sampled[0].max_tokens == 20
    assert "a haiku on ledgers" in str(asked.sampled[0].messages[0].content)
    assert "sampled by the agent" in text_of(result) and "agent-model" in text_of(result)
    assert receipt_of(result)["amountUsd"] == "0.003"
    assert token_view(engine, token).spent == usd("0.003")
    assert_ledger_sound(engine)


def test_elicitation_and_roots_are_answered_by_the_agent(running: Running) -> None:
    asked = Asked()

    async def go() -> tuple[types.CallToolResult, types.CallToolResult]:
        async with asked_agent(running.url, asked) as client:
            elicited = await client.call_tool("trigger-elicitation-request", {})
            roots = await client.call_tool("get-roots-list", {})
            return elicited, roots

    elicited, roots = anyio.run(go)
    assert len(asked.elicited) == 1
    assert "Please provide inputs" in asked.elicited[0].message  # type: ignore[union-attr]
    assert not elicited.is_error and "Ada Lovelace" in str(elicited.content)
    assert asked.roots_asked >= 1
    assert not roots.is_error and ROOT_URI in text_of(roots)


@pytest.mark.filterwarnings("ignore:resources/(un)?subscribe is removed")
def test_resource_updates_and_the_upstreams_log_reach_the_subscriber(running: Running) -> None:
    asked = Asked()

    async def go() -> str:
        async with asked_agent(running.url, asked) as client:
            uri = str((await client.list_resources()).resources[0].uri)
            await client.subscribe_resource(uri)
            await client.call_tool("toggle-subscriber-updates", {})  # one update right away
            with anyio.fail_after(10):
                await asked.update.wait()
            await client.call_tool("toggle-subscriber-updates", {})  # and no more
            await client.unsubscribe_resource(uri)
            return uri

    uri = anyio.run(go)
    assert asked.updated[0] == uri
    assert any(f"Received Subscribe Resource request for URI: {uri}" in str(log.data)
               for log in asked.logs)


def test_a_list_change_reaches_the_agent_whose_upstream_session_changed(running: Running) -> None:
    asked, other_asked = Asked(), Asked()

    async def go() -> tuple[list[str], list[str]]:
        async with asked_agent(running.url, other_asked) as other, \
                asked_agent(running.url, asked) as client:
            await other.list_tools()  # the other agent has its own upstream session
            made = await client.call_tool("gzip-file-as-resource", {  # registers a resource
                "name": "hello.txt.gz", "data": "data:text/plain;base64,aGVsbG8=",
                "outputType": "resourceLink"})
            assert not made.is_error, made
            with anyio.fail_after(10):
                while RESOURCES_CHANGED not in asked.lists_changed:
                    await anyio.sleep(0.05)
            mine = [str(r.name) for r in (await client.list_resources()).resources]
            theirs = [str(r.name) for r in (await other.list_resources()).resources]
            return mine, theirs

    mine, theirs = anyio.run(go)
    assert "hello.txt.gz" in mine and "hello.txt.gz" not in theirs
    assert RESOURCES_CHANGED not in other_asked.lists_changed


def test_a_2026_agent_has_no_channel_so_a_paid_sampling_call_is_voided(
        running: Running, mint: Mint, engine: Engine) -> None:
    token, asked = mint(), Asked()

    async def go() -> types.CallToolResult:
        async with asked_agent(running.url, asked, mode="2026-07-28") as client:
            return await client.call_tool("trigger-sampling-request",
                                          {"prompt": "no channel", "maxTokens": 5},
                                          meta={TOKEN_META: token.token})  # type: ignore[arg-type]

    result = anyio.run(go)
    assert result.is_error and asked.sampled == []
    view = token_view(engine, token)
    assert (view.spent, view.held) == (0, 0)
    assert_ledger_sound(engine)

"""One upstream session per agent session: several agents on the proxy at once, the reference
server behind it (stdio: a child per agent session; HTTP: a client session per agent session),
each agent the official client in the 2025-11-25 era (the one with sessions).

What the upstream asks during an agent's call is asked of that agent alone, even with both
agents' calls in flight; an agent's log level and subscriptions are its own, and a restarted
child or a reconnected HTTP session gets them back; the cap on upstream sessions refuses the
next agent with PROXY_SESSIONS_FULL; an agent that ends its session, or lets it idle out, ends
its upstream session (a stdio child exits)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
from mcp.client import Client
from mcp.client.session import ClientRequestContext
from mcp.shared.exceptions import MCPError
from sqlalchemy import Engine

from mcpbill_cli.config import Settings
from mcpbill_cli.mcp import TOKEN_META
from mcpbill_cli.proxy import Limits, Proxy, Upstream, UpstreamTarget, build_app
from mcpbill_cli.proxy import upstream as upstream_module
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
from tests.mcp.test_http import free_port

from .conftest import Running
from .test_failures import start_everything_http, upstream_pid
from .test_relay import Asked, asked_agent, text_of

QUIET_LEVELS = {"error", "critical", "alert", "emergency"}
NOTICE_AND_UP = {"notice", "warning", *QUIET_LEVELS}


class Both:
    """Holds each agent's answer until both agents were asked: proof that both agents' calls
    were at the upstream at once."""

    def __init__(self) -> None:
        self.arrived = 0
        self.together = anyio.Event()

    async def arrive(self) -> None:
        self.arrived += 1
        if self.arrived == 2:
            self.together.set()
        with anyio.move_on_after(20):
            await self.together.wait()


class Named(Asked):
    """An agent that answers the upstream in its own name, with roots of its own."""

    def __init__(self, name: str, both: Both) -> None:
        super().__init__()
        self.name = name
        self.both = both
        self.root = f"file:///agents/{name}"

    async def sampling(self, context: ClientRequestContext,
                       params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        self.sampled.append(params)
        await self.both.arrive()
        return types.CreateMessageResult(
            role="assistant", model=f"model-of-{self.name}",
            content=types.TextContent(type="text", text=f"sampled by {self.name}"))

    async def elicitation(self, context: ClientRequestContext,
                          params: types.ElicitRequestParams) -> types.ElicitResult:
        self.elicited.append(params)
        await self.both.arrive()
        return types.ElicitResult(action="accept", content={"name": self.name})

    async def roots(self, context: ClientRequestContext) -> types.ListRootsResult:
        self.roots_asked += 1
        return types.ListRootsResult(roots=[types.Root(uri=self.root, name=self.name)])


def pair() -> tuple[Named, Named, Both]:
    both = Both()
    return Named("ada", both), Named("grace", both), both


def test_two_agents_in_flight_are_each_asked_their_own_sampling_and_billed(
        running: Running, mint: Mint, engine: Engine) -> None:
    ada, grace, both = pair()
    tokens = {ada.name: mint(), grace.name: mint()}
    results: dict[str, types.CallToolResult] = {}

    async def call(agent: Named) -> None:
        async with asked_agent(running.url, agent) as client:
            prompt = {"prompt": f"a haiku for {agent.name}", "maxTokens": 20}
            results[agent.name] = await client.call_tool(
                "trigger-sampling-request", prompt,
                meta={TOKEN_META: tokens[agent.name].token})  # type: ignore[arg-type]

    async def go() -> None:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(call, ada)
            tasks.start_soon(call, grace)

    anyio.run(go)
    assert both.together.is_set()
    for agent, other in ((ada, grace), (grace, ada)):
        assert len(agent.sampled) == 1
        assert f"a haiku for {agent.name}" in str(agent.sampled[0].messages[0].content)
        assert f"sampled by {agent.name}" in text_of(results[agent.name])
        assert f"sampled by {other.name}" not in text_of(results[agent.name])
        assert receipt_of(results[agent.name])["amountUsd"] == "0.003"
        assert token_view(engine, tokens[agent.name]).spent == usd("0.003")
    assert_ledger_sound(engine)


def test_two_agents_in_flight_are_each_asked_their_own_elicitation_and_roots(
        running: Running) -> None:
    ada, grace, both = pair()
    results: dict[str, tuple[types.CallToolResult, types.CallToolResult]] = {}

    async def call(agent: Named, client: Client) -> None:
        elicited = await client.call_tool("trigger-elicitation-request", {})
        results[agent.name] = elicited, await client.call_tool("get-roots-list", {})

    async def go() -> None:
        async with asked_agent(running.url, ada) as first, \
                asked_agent(running.url, grace) as second, anyio.create_task_group() as tasks:
            tasks.start_soon(call, ada, first)
            tasks.start_soon(call, grace, second)

    anyio.run(go)
    assert both.together.is_set()
    for agent, other in ((ada, grace), (grace, ada)):
        elicited, roots = results[agent.name]
        assert len(agent.elicited) == 1 and agent.roots_asked >= 1
        assert not elicited.is_error and agent.name in str(elicited.content)
        assert other.name not in str(elicited.content)
        assert agent.root in text_of(roots) and other.root not in text_of(roots)


@pytest.mark.filterwarnings("ignore:The roots capability is deprecated")
def test_an_agents_roots_change_reaches_its_upstream_session(running: Running) -> None:
    ada, _, _ = pair()

    async def go() -> tuple[str, str]:
        async with asked_agent(running.url, ada) as client:
            before = text_of(await client.call_tool("get-roots-list", {}))
            asked, ada.root = ada.roots_asked, "file:///agents/ada/elsewhere"
            await client.send_roots_list_changed()  # the upstream asks for the roots again
            with anyio.fail_after(10):
                while ada.roots_asked == asked:
                    await anyio.sleep(0.05)
            return before, text_of(await client.call_tool("get-roots-list", {}))

    before, after = anyio.run(go)
    assert "file:///agents/ada" in before and "elsewhere" not in before
    assert "file:///agents/ada/elsewhere" in after


@pytest.mark.filterwarnings("ignore:resources/(un)?subscribe is removed",
                            "ignore:The logging capability is deprecated")
def test_one_agents_log_level_and_subscriptions_leave_the_other_alone(running: Running) -> None:
    quiet, chatty = Asked(), Asked()

    async def go() -> str:
        async with asked_agent(running.url, quiet) as q, asked_agent(running.url, chatty) as c:
            uri = str((await q.list_resources()).resources[0].uri)
            await q.set_logging_level("error")  # the upstream logs each (un)subscribe at info
            await q.subscribe_resource(uri)
            await c.subscribe_resource(uri)
            await c.unsubscribe_resource(uri)  # ends chatty's subscription, not quiet's
            await c.call_tool("toggle-subscriber-updates", {})  # updates of subscribed resources
            await q.call_tool("toggle-subscriber-updates", {})
            with anyio.fail_after(10):
                await quiet.update.wait()
                while not any("Unsubscribe" in str(log.data) for log in chatty.logs):
                    await anyio.sleep(0.05)
            for client in (q, c):  # and no more updates
                await client.call_tool("toggle-subscriber-updates", {})
            return uri

    uri = anyio.run(go)
    assert quiet.updated and set(quiet.updated) == {uri}
    assert chatty.updated == []
    assert any(f"Received Subscribe Resource request for URI: {uri}" in str(log.data)
               for log in chatty.logs)
    assert all(log.level in QUIET_LEVELS for log in quiet.logs)


@pytest.mark.parametrize("upstream_kind", ["stdio"], indirect=True)
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # nothing is billed
@pytest.mark.filterwarnings("ignore:resources/(un)?subscribe is removed",
                            "ignore:The logging capability is deprecated")
def test_a_restarted_upstream_child_gets_back_the_agents_subscriptions_and_log_level(
        running: Running) -> None:
    asked = Asked()
    assert running.pidfile is not None

    async def go() -> tuple[list[str], int, int]:
        async with asked_agent(running.url, asked) as client:
            kept, dropped, other = [str(resource.uri)
                                    for resource in (await client.list_resources()).resources[:3]]
            await client.set_logging_level("notice")  # the upstream logs each (un)subscribe at info
            await client.subscribe_resource(dropped)  # first: a child subscribed to both would
            await client.subscribe_resource(kept)  # send dropped's update before kept's
            await client.unsubscribe_resource(dropped)
            killed = upstream_pid(running.pidfile)  # type: ignore[arg-type]
            os.kill(killed, signal.SIGKILL)
            while alive(killed):
                await anyio.sleep(0.05)
            told = len(asked.logs)
            await client.list_resources()  # the agent's next request, on a new child
            await client.subscribe_resource(other)  # logged at info: below the agent's level
            await client.unsubscribe_resource(other)
            for tool in ("toggle-subscriber-updates", "toggle-simulated-logging"):  # a log
                assert not (await client.call_tool(tool, {})).is_error  # at a random level
            with anyio.fail_after(30):  # every 5 s
                await asked.update.wait()
                while len(asked.logs) == told:
                    await anyio.sleep(0.05)
            for tool in ("toggle-subscriber-updates", "toggle-simulated-logging"):
                await client.call_tool(tool, {})
            return [kept, dropped, other], told, killed

    (kept, dropped, other), told, killed = anyio.run(go)
    assert upstream_pid(running.pidfile) != killed and running.proxy.upstream.connects == 2
    assert asked.updated and set(asked.updated) == {kept}
    after = asked.logs[told:]
    assert after and all(log.level in NOTICE_AND_UP for log in after)
    assert not any(other in str(log.data) for log in asked.logs)


@pytest.mark.parametrize("max_sessions", [1])
def test_an_agent_session_over_the_cap_is_refused_until_one_ends(
        running: Running, mint: Mint, engine: Engine) -> None:
    token = mint()

    async def go() -> tuple[MCPError, types.CallToolResult, types.CallToolResult]:
        async with asked_agent(running.url, Asked()) as second:
            async with asked_agent(running.url, Asked()) as first:
                await first.list_tools()  # the one upstream session is first's
                with pytest.raises(MCPError) as listed:
                    await second.list_tools()
                refused = await second.call_tool("echo", {"message": "no room"},
                                                 meta={TOKEN_META: token.token})  # type: ignore[arg-type]
                async with running.connect(token.token) as sessionless:  # 2026-07-28: not counted
                    assert receipt_of(await sessionless.call("echo", {"message": "shared"}))
            with anyio.fail_after(10):  # first's session ended: so did its upstream session
                while running.proxy.upstream.sessions:
                    await anyio.sleep(0.05)
            served = await second.call_tool("echo", {"message": "room now"},
                                            meta={TOKEN_META: token.token})  # type: ignore[arg-type]
            return listed.value, refused, served

    listed, refused, served = anyio.run(go)
    assert listed.error.data["code"] == "PROXY_SESSIONS_FULL"  # type: ignore[index]
    assert refusal_of(refused)["code"] == "PROXY_SESSIONS_FULL"
    assert refusal_of(refused)["limit"] == 1
    assert receipt_of(served)["amountUsd"] == "0.002"
    view = token_view(engine, token)
    assert (view.spent, view.held) == (usd("0.004"), 0)  # the shared call and the served one
    assert_ledger_sound(engine)


@pytest.mark.parametrize("upstream_kind", ["stdio"], indirect=True)
@pytest.mark.parametrize("limits", [Limits(session_idle_timeout=1.0)], indirect=False)
def test_an_idle_agent_session_ends_and_stops_its_upstream_child(running: Running) -> None:
    with httpx2.Client(timeout=30) as web:  # a bare agent: no standalone stream held open
        session = {"mcp-session-id": post(web, running.url, {}, "initialize", {
            "protocolVersion": "2025-11-25", "capabilities": {},
            "clientInfo": {"name": "idle-agent", "version": "1"}}).headers["mcp-session-id"],
            "mcp-protocol-version": "2025-11-25"}
        post(web, running.url, session, "notifications/initialized")
        assert "echo" in post(web, running.url, session, "tools/list").text
        pid = upstream_pid(running.pidfile)  # type: ignore[arg-type]
        assert running.proxy.upstream.sessions == 1
        wait_until_stopped(running, pid)
        assert post(web, running.url, session, "tools/list").status_code == 404  # ended


def post(web: httpx2.Client, url: str, session: dict[str, str], method: str,
         params: dict[str, Any] | None = None) -> httpx2.Response:
    """One JSON-RPC message (a request when it has params or is not a notification)."""
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if not method.startswith("notifications/"):
        message.update(id=1, params=params or {})
    return web.post(url, json=message, headers={
        **session, "accept": "application/json, text/event-stream"})


@pytest.mark.parametrize("upstream_kind", ["stdio"], indirect=True)
def test_an_agent_ending_its_session_stops_its_upstream_child(running: Running) -> None:
    assert running.pidfile is not None

    async def go() -> int:
        async with asked_agent(running.url, Asked()) as client:
            await client.list_tools()
            pid = upstream_pid(running.pidfile)  # type: ignore[arg-type]
            assert alive(pid) and running.proxy.upstream.sessions == 1
        return pid

    wait_until_stopped(running, anyio.run(go))


def wait_until_stopped(running: Running, pid: int) -> None:
    deadline = time.monotonic() + 15
    while alive(pid) or running.proxy.upstream.sessions:
        assert time.monotonic() < deadline, f"the upstream child {pid} outlived its session"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class RestartableEverything:
    """The reference server over streamable HTTP on a port of its own, restarted in place by
    :meth:`restart` (killed, and a new one on the same port that knows no session of ours)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.servers = [start_everything_http(self.port)]

    @property
    def restarts(self) -> int:
        return len(self.servers) - 1

    def restart(self) -> None:
        self.servers[-1].kill()
        self.servers[-1].wait(10)
        self.servers.append(start_everything_http(self.port))

    def close(self) -> None:
        for server in self.servers:
            server.kill()
            server.wait(10)


@contextmanager
def proxied_http_upstream(verifier: Verifier
                          ) -> Iterator[tuple[str, Upstream, RestartableEverything]]:
    """A proxy in front of a restartable reference server: the proxy's URL, its upstream and
    the server."""
    everything = RestartableEverything()
    upstream = Upstream(UpstreamTarget.parse(command=None, url=everything.url),
                        connect_timeout=30)
    try:
        with serve(build_app(Proxy(verifier, upstream))) as url:
            yield url, upstream, everything
    finally:
        everything.close()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # as in test_failures
@pytest.mark.filterwarnings("ignore:resources/(un)?subscribe is removed",
                            "ignore:The logging capability is deprecated")
def test_a_reconnected_http_upstream_gets_back_the_agents_subscriptions_and_log_level(
        priced: Settings, verifier: Verifier, mint: Mint, engine: Engine) -> None:
    token, asked = mint(), Asked()
    with proxied_http_upstream(verifier) as (url, upstream, everything):

        async def go() -> tuple[list[str], types.CallToolResult, int]:
            async def progress(done: float, total: float | None,
                               message: str | None) -> None:
                if not everything.restarts:  # the call is at the upstream: it dies,
                    everything.restart()  # another takes its port, knowing no session of ours

            async with asked_agent(url, asked) as client:
                kept, other = [str(resource.uri) for resource
                               in (await client.list_resources()).resources[:2]]
                await client.set_logging_level("notice")
                await client.subscribe_resource(kept)
                cut = await client.call_tool(
                    "trigger-long-running-operation", {"duration": 10, "steps": 20},
                    progress_callback=progress,
                    meta={TOKEN_META: token.token})  # type: ignore[arg-type]
                told = len(asked.logs)
                await client.list_resources()  # the agent's next request: reconnected
                await client.subscribe_resource(other)  # logged at info: below the level
                await client.unsubscribe_resource(other)
                for tool in ("toggle-subscriber-updates", "toggle-simulated-logging"):
                    assert not (await client.call_tool(tool, {})).is_error
                with anyio.fail_after(30):
                    await asked.update.wait()
                    while len(asked.logs) == told:
                        await anyio.sleep(0.05)
                for tool in ("toggle-subscriber-updates", "toggle-simulated-logging"):
                    await client.call_tool(tool, {})
                return [kept, other], cut, told

        (kept, other), cut, told = anyio.run(go)
    assert refusal_of(cut)["code"] == "UPSTREAM_UNAVAILABLE" and upstream.connects == 2
    assert asked.updated and set(asked.updated) == {kept}
    after = asked.logs[told:]
    assert after and all(log.level in NOTICE_AND_UP for log in after)
    assert not any(other in str(log.data) for log in asked.logs)
    assert token_view(engine, token).spent == 0


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # nothing is billed
@pytest.mark.filterwarnings("ignore:resources/(un)?subscribe is removed")
def test_an_idle_agent_hears_from_a_restarted_http_upstream_with_its_subscriptions_back(
        priced: Settings, verifier: Verifier) -> None:
    """The agent sends nothing while the upstream restarts: the proxy reconnects when the
    upstream's standalone stream breaks, and the new upstream session asks the agent for its
    roots (as a new session does, 350 ms in) and logs that it got them, on that agent's
    standalone stream; its subscription is back without any request of the agent's."""
    asked = Asked()
    with proxied_http_upstream(verifier) as (url, upstream, everything):

        async def go() -> tuple[str, int]:
            async with asked_agent(url, asked) as client:
                uri = str((await client.list_resources()).resources[0].uri)
                await client.subscribe_resource(uri)
                with anyio.fail_after(30):
                    while roots_logged(asked) < 1:
                        await anyio.sleep(0.05)
                everything.restart()  # the agent is idle from here on; no session of
                # ours in the new server
                with anyio.fail_after(30):
                    while asked.roots_asked < 2 or roots_logged(asked) < 2:
                        await anyio.sleep(0.05)
                connects = upstream.connects
                assert not (await client.call_tool("toggle-subscriber-updates", {})).is_error
                with anyio.fail_after(30):
                    await asked.update.wait()
                await client.call_tool("toggle-subscriber-updates", {})
                return uri, connects

        uri, connects = anyio.run(go)
    assert connects == 2 and upstream.connects == 2  # reconnected before the agent's next call
    assert asked.updated and set(asked.updated) == {uri}  # subscribed again by the proxy


def roots_logged(asked: Asked) -> int:
    """How many times the upstream logged that it got the agent's roots (once per session)."""
    return sum("Roots updated" in str(log.data) for log in asked.logs)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # nothing is billed
def test_a_silent_http_upstream_keeps_its_session(
        priced: Settings, verifier: Verifier, everything_http: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An upstream that sends nothing on its standalone stream for longer than the HTTP read
    timeout has not gone away: the stream stays open on the same upstream session, and what the
    upstream sends on it later still reaches the agent."""
    monkeypatch.setattr(upstream_module, "HTTP_TIMEOUT", httpx2.Timeout(30.0, read=0.5))
    upstream = Upstream(UpstreamTarget.parse(command=None, url=everything_http),
                        connect_timeout=30)
    asked = Asked()

    async def go() -> None:
        async with asked_agent(url, asked) as client:
            await client.list_resources()
            await anyio.sleep(3)  # silence: six read timeouts' worth
            told = len(asked.logs)
            assert not (await client.call_tool("toggle-simulated-logging", {})).is_error
            with anyio.fail_after(15):  # a log at once on the standalone stream, then every 5 s
                while len(asked.logs) == told:
                    await anyio.sleep(0.05)
            await client.call_tool("toggle-simulated-logging", {})

    with serve(build_app(Proxy(verifier, upstream))) as url:
        anyio.run(go)
    assert upstream.connects == 1

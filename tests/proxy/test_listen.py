"""``subscriptions/listen`` through the proxy: a 2026-07-28 agent's stream of the upstream's
changes (the reference server speaks 2025-11-25: the proxy subscribes it to the resources the
stream names and turns its notifications into the stream's events)."""

from __future__ import annotations

import os
import signal

import anyio
import pytest
from mcp.shared.subscriptions import ResourcesListChanged, ResourceUpdated, ServerEvent

from .conftest import Running
from .test_failures import upstream_pid
from .test_relay import Asked, asked_agent
from .test_sessions import alive


@pytest.mark.parametrize("upstream_kind", ["stdio"], indirect=True)
def test_a_2026_agent_hears_of_updates_and_list_changes_on_its_listen_stream(
        running: Running) -> None:

    async def go() -> tuple[str, list[ServerEvent], list[str]]:
        events: list[ServerEvent] = []
        async with asked_agent(running.url, Asked(), mode="2026-07-28") as client:
            uri = str((await client.list_resources()).resources[0].uri)
            async with client.listen(resources_list_changed=True,
                                     resource_subscriptions=[uri]) as stream:
                await client.call_tool("toggle-subscriber-updates", {})  # one update now
                made = await client.call_tool("gzip-file-as-resource", {  # a new resource
                    "name": "heard.txt.gz", "data": "data:text/plain;base64,aGVsbG8=",
                    "outputType": "resourceLink"})
                assert not made.is_error, made
                with anyio.fail_after(10):
                    async for event in stream:
                        events.append(event)
                        if {ResourceUpdated(uri=uri), ResourcesListChanged()} <= set(events):
                            break
                await client.call_tool("toggle-subscriber-updates", {})  # and no more
            names = [str(r.name) for r in (await client.list_resources()).resources]
            return uri, events, names

    uri, events, names = anyio.run(go)
    assert ResourceUpdated(uri=uri) in events and ResourcesListChanged() in events
    assert "heard.txt.gz" in names


@pytest.mark.parametrize("upstream_kind", ["stdio"], indirect=True)
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # nothing is billed
def test_a_listen_stream_hears_of_updates_again_after_the_shared_child_restarts(
        running: Running) -> None:
    assert running.pidfile is not None

    async def go() -> tuple[str, list[ServerEvent], int]:
        events: list[ServerEvent] = []
        async with asked_agent(running.url, Asked(), mode="2026-07-28") as client:
            uri = str((await client.list_resources()).resources[0].uri)
            async with client.listen(resource_subscriptions=[uri]) as stream:
                killed = upstream_pid(running.pidfile)  # type: ignore[arg-type]
                os.kill(killed, signal.SIGKILL)  # the shared session's child
                while alive(killed):
                    await anyio.sleep(0.05)
                await client.list_resources()  # served by a new child
                assert not (await client.call_tool("toggle-subscriber-updates", {})).is_error
                with anyio.fail_after(15):  # one update now, then every 5 s
                    async for event in stream:
                        events.append(event)
                        if ResourceUpdated(uri=uri) in events:
                            break
                await client.call_tool("toggle-subscriber-updates", {})  # and no more
            return uri, events, killed

    uri, events, killed = anyio.run(go)
    assert ResourceUpdated(uri=uri) in events
    assert upstream_pid(running.pidfile) != killed and running.proxy.upstream.connects == 2

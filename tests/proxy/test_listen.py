"""``subscriptions/listen`` through the proxy: a 2026-07-28 agent's stream of the upstream's
changes (the reference server speaks 2025-11-25: the proxy subscribes it to the resources the
stream names and turns its notifications into the stream's events)."""

from __future__ import annotations

import anyio
import pytest
from mcp.shared.subscriptions import ResourcesListChanged, ResourceUpdated, ServerEvent

from .conftest import Running
from .test_relay import Asked, asked_agent


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

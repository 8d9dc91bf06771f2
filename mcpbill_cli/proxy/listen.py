"""``subscriptions/listen`` through the proxy: a 2026-07-28 agent's stream of the upstream's
changes.

A 2026-07-28 agent has no session with the proxy; its requests share one upstream session
(:meth:`~mcpbill_cli.proxy.upstream.Upstream.shared`). That session's notifications of list
changes (tools, resources, prompts) and of resource updates are published on :attr:`bus`, and
the SDK's :class:`~mcp.server.subscriptions.ListenHandler` streams to each listening agent the
events it asked for. The shared upstream session is subscribed to a resource while one listen
stream or more names it, and unsubscribed when the last one ends, whatever era the upstream
speaks (``resources/subscribe`` is sent as a plain request, as for agents of the handshake
era). A new connection of the shared session (its child restarted, its HTTP session reopened)
is subscribed again to the resources the open streams name before any request reaches it.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import mcp_types as types
from mcp.client import Client
from mcp.client.session import IncomingMessage
from mcp.server.context import ServerRequestContext
from mcp.server.subscriptions import (
    InMemorySubscriptionBus,
    ListenHandler,
    PromptsListChanged,
    ResourcesListChanged,
    ResourceUpdated,
    ServerEvent,
    ToolsListChanged,
)

from mcpbill_cli.proxy.upstream import resend

__all__ = ["Listening"]

log = logging.getLogger("mcpbill.proxy")

Context = ServerRequestContext[Any, Any]
# Sends a request (resources/subscribe or unsubscribe) to the shared upstream session.
Send = Callable[[Context, Any], Awaitable[Any]]
# The upstream's list-changed notifications, and the listen streams' event for each.
LIST_CHANGED: dict[type[Any], ServerEvent] = {
    types.ToolListChangedNotification: ToolsListChanged(),
    types.ResourceListChangedNotification: ResourcesListChanged(),
    types.PromptListChangedNotification: PromptsListChanged()}


class Listening:
    """The listen streams of 2026-07-28 agents (see the module docstring)."""

    def __init__(self, send: Send) -> None:
        self.bus = InMemorySubscriptionBus()
        self.handler = ListenHandler(self.bus)
        self._send = send
        self._streams: dict[str, set[str]] = {}  # resource uri -> the listen streams on it

    def client_options(self) -> dict[str, Any]:
        """The shared upstream session's client options: its notifications come here."""
        return {"message_handler": self.notified}

    async def replay(self, client: Client) -> None:
        """Subscribe the shared session's new connection to the resources streams name."""
        await resend(client, [types.SubscribeRequest(params=types.SubscribeRequestParams(uri=uri))
                              for uri in list(self._streams)])

    async def notified(self, message: IncomingMessage) -> None:
        """A notification of the shared upstream session, published for the listen streams."""
        if isinstance(message, types.ResourceUpdatedNotification):
            if str(message.params.uri) in self._streams:
                await self.bus.publish(ResourceUpdated(uri=str(message.params.uri)))
        elif type(message) in LIST_CHANGED:
            await self.bus.publish(LIST_CHANGED[type(message)])

    async def listen(self, ctx: Context, params: types.SubscriptionsListenRequestParams
                     ) -> types.SubscriptionsListenResult:
        """One agent's stream, until it closes it; its resources subscribed upstream meanwhile."""
        stream, uris = uuid.uuid4().hex, list(params.notifications.resource_subscriptions or ())
        try:
            for uri in uris:
                if not self._streams.get(uri):  # the first stream on it: subscribe upstream
                    await self._send(ctx, types.SubscribeRequest(
                        params=types.SubscribeRequestParams(uri=uri)))
                self._streams.setdefault(uri, set()).add(stream)
            return await self.handler(ctx, params)
        finally:
            with anyio.CancelScope(shield=True):
                for uri in uris:
                    await self._leave(ctx, uri, stream)

    async def _leave(self, ctx: Context, uri: str, stream: str) -> None:
        streams = self._streams.get(uri, set())
        streams.discard(stream)
        if streams:
            return
        self._streams.pop(uri, None)
        try:  # the last stream on it: unsubscribe upstream
            await self._send(ctx, types.UnsubscribeRequest(
                params=types.UnsubscribeRequestParams(uri=uri)))
        except Exception as error:  # noqa: BLE001 - the stream is over either way
            log.warning("unsubscribing the upstream from %s: %s", uri, error)

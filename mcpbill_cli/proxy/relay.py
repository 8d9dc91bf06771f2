"""What flows from the upstream back to the agents: server-to-client requests made during a
call, log messages and resource updates.

The proxy holds one connection to the upstream for all agents, so the upstream cannot say
which agent a message is for; the relay decides:

- ``sampling/createMessage``, ``elicitation/create`` and ``roots/list`` are asked of the agent
  whose request is in flight at the upstream, on that request's own stream, and the agent's
  answer (or its error) goes back to the upstream. With no request in flight, or several at
  once, the proxy cannot tell whose they are: the upstream gets an error and no agent is asked
  (an agent's sampling or elicitation is never shown another agent's request).
- ``notifications/message`` (the upstream's log) goes, by the same rule, to the agent whose
  request is in flight, on that request's stream; otherwise it is dropped.
- ``notifications/resources/updated`` goes to every agent that subscribed to the resource
  (``resources/subscribe``); the upstream is subscribed while one agent or more is, and
  unsubscribed when the last one leaves.
- ``notifications/tools/list_changed`` (and of resources and prompts) goes to every agent
  session the proxy has served (the latest ``MAX_SESSIONS``), on its standalone stream: the
  upstream's lists are the same for all agents.

All of this needs the 2025-11-25 era (the initialize handshake): a 2026-07-28 agent has no
session and no channel on which a server asks it anything during a call, so it is answered as
an agent that does not support sampling, elicitation or roots, gets no log relayed, and cannot
subscribe.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import mcp_types as types
from mcp.client.session import ClientRequestContext, IncomingMessage
from mcp.server.context import ServerRequestContext
from mcp.server.session import ServerSession
from mcp.shared.exceptions import MCPError
from mcp.shared.message import ServerMessageMetadata
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

__all__ = ["Relay"]

log = logging.getLogger("mcpbill.proxy")

Context = ServerRequestContext[Any, Any]
SESSION_HEADER = "mcp-session-id"
_R = TypeVar("_R", bound=types.Result)
MAX_SESSIONS = 1024  # agent sessions told of list changes; the oldest are forgotten
LIST_CHANGED = (types.ToolListChangedNotification, types.ResourceListChangedNotification,
                types.PromptListChangedNotification)


class Relay:
    """Routes the upstream's requests and notifications to agents (see the module docstring)."""

    def __init__(self) -> None:
        self._in_flight: dict[int, Context] = {}
        self._subscribers: dict[str, dict[str, ServerSession]] = {}  # uri -> session id -> agent
        self._sessions: dict[str, ServerSession] = {}  # session id -> agent, oldest first

    @contextmanager
    def during(self, ctx: Context) -> Iterator[None]:
        """While an agent's request is at the upstream: what the upstream asks is for it."""
        key = id(ctx)
        self._in_flight[key] = ctx
        self._remember(ctx)
        try:
            yield
        finally:
            self._in_flight.pop(key, None)

    def _remember(self, ctx: Context) -> None:
        """Keep the agent's session (2025-11-25 era) to tell it of list changes."""
        session_id = _session_id_of(ctx)
        if session_id is None:
            return
        self._sessions.pop(session_id, None)
        self._sessions[session_id] = ctx.session
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.pop(next(iter(self._sessions)))

    def client_options(self) -> dict[str, Any]:
        """The upstream client's callbacks: it declares sampling, elicitation and roots, so the
        upstream offers the tools that use them."""
        return {"sampling_callback": self.sampling, "elicitation_callback": self.elicitation,
                "list_roots_callback": self.roots, "message_handler": self.notified}

    # --- the upstream asks --------------------------------------------------------------------

    async def sampling(self, context: ClientRequestContext, params: types.CreateMessageRequestParams
                       ) -> types.CreateMessageResult | types.ErrorData:
        request = types.CreateMessageRequest(params=params)
        return await self._ask(request, types.CreateMessageResult)

    async def elicitation(self, context: ClientRequestContext, params: types.ElicitRequestParams
                          ) -> types.ElicitResult | types.ErrorData:
        return await self._ask(types.ElicitRequest(params=params), types.ElicitResult)

    async def roots(self, context: ClientRequestContext) -> types.ListRootsResult | types.ErrorData:
        return await self._ask(types.ListRootsRequest(), types.ListRootsResult)

    async def _ask(self, request: Any, result_type: type[_R]) -> _R | types.ErrorData:
        """Ask the one agent whose request is in flight, on that request's stream."""
        ctx = self._caller()
        method = request.method
        if ctx is None:
            return types.ErrorData(code=types.INVALID_REQUEST, message=(
                f"{method}: the proxy relays it only during one agent's request "
                f"({len(self._in_flight)} in flight)"))
        if _modern(ctx):
            return types.ErrorData(code=types.INVALID_REQUEST, message=(
                f"{method}: the agent speaks {ctx.protocol_version}, which has no channel for it"))
        try:
            return await ctx.session.send_request(
                request, result_type,
                metadata=ServerMessageMetadata(related_request_id=ctx.request_id))
        except MCPError as error:  # the agent's refusal, as the agent gave it
            return error.error

    def _caller(self) -> Context | None:
        if len(self._in_flight) != 1:
            return None
        return next(iter(self._in_flight.values()))

    # --- the upstream tells -------------------------------------------------------------------

    async def notified(self, message: IncomingMessage) -> None:
        """A notification from the upstream (progress is relayed by the call itself)."""
        if isinstance(message, types.LoggingMessageNotification):
            await self._log(message)
        elif isinstance(message, types.ResourceUpdatedNotification):
            await self._updated(message)
        elif isinstance(message, LIST_CHANGED):
            await self._list_changed(message)

    async def _log(self, message: types.LoggingMessageNotification) -> None:
        ctx = self._caller()
        if ctx is None or _modern(ctx):
            return
        await _quietly(ctx.session.send_notification(message, related_request_id=ctx.request_id))

    async def _updated(self, message: types.ResourceUpdatedNotification) -> None:
        uri = str(message.params.uri)
        for session_id, session in list(self._subscribers.get(uri, {}).items()):
            if not await _quietly(session.send_notification(message)):
                self._subscribers.get(uri, {}).pop(session_id, None)  # that agent is gone

    async def _list_changed(self, message: Any) -> None:
        for session_id, session in list(self._sessions.items()):
            if not await _quietly(session.send_notification(message)):
                self._sessions.pop(session_id, None)  # that agent is gone

    # --- subscriptions ------------------------------------------------------------------------

    def subscribe(self, ctx: Context, uri: str) -> bool:
        """Record the agent's subscription; True when it is the first for ``uri`` (the upstream
        is to be subscribed)."""
        subscribers = self._subscribers.setdefault(uri, {})
        first = not subscribers
        subscribers[_session_id(ctx)] = ctx.session
        return first

    def unsubscribe(self, ctx: Context, uri: str) -> bool:
        """Forget the agent's subscription; True when no agent is left on ``uri``."""
        subscribers = self._subscribers.get(uri, {})
        if subscribers.pop(_session_id(ctx), None) is None:
            return False
        if subscribers:
            return False
        self._subscribers.pop(uri, None)
        return True


def _session_id_of(ctx: Context) -> str | None:
    """The agent's session (2025-11-25 era); a 2026-07-28 agent has none."""
    if ctx.request is None or _modern(ctx):
        return None
    session_id = ctx.request.headers.get(SESSION_HEADER)
    return str(session_id) if session_id else None


def _session_id(ctx: Context) -> str:
    """The agent's session, to subscribe with."""
    session_id = _session_id_of(ctx)
    if session_id is None:
        raise MCPError(types.INVALID_REQUEST, "resources/subscribe needs a session: connect "
                                              "with the 2025-11-25 protocol (initialize)")
    return str(session_id)


def _modern(ctx: Context) -> bool:
    return ctx.protocol_version in MODERN_PROTOCOL_VERSIONS


async def _quietly(sending: Any) -> bool:
    """Send a notification; an agent that went away is not the upstream's problem."""
    try:
        await sending
    except Exception as error:  # noqa: BLE001 - a gone agent, a closed stream
        log.debug("relay to an agent failed: %s", error)
        return False
    return True

"""What flows from an agent's upstream session back to that agent: server-to-client requests,
log messages, resource updates and list changes.

Each agent session has an upstream session of its own (:mod:`mcpbill_cli.proxy.sessions`), so
whatever the upstream asks or tells on it is for that one agent; the relay only picks the
agent's channel:

- ``sampling/createMessage``, ``elicitation/create`` and ``roots/list`` are asked of the agent,
  and its answer (or its error) goes back to the upstream; ``notifications/message`` (the
  upstream's log, at the level the agent set) is relayed the same way. While exactly one of the
  agent's requests is at the upstream they go on that request's stream (the upstream asks during
  a call, and an agent that opened no standalone stream still gets them); otherwise on the
  agent's standalone stream.
- ``notifications/resources/updated`` (for the agent's own subscriptions) and
  ``notifications/tools/list_changed`` (and of resources and prompts) go on the agent's
  standalone stream.

The upstream session declares what the agent declared at initialize: sampling (with its
sub-capabilities), elicitation and roots only when the agent has them, so the upstream offers
the tools that use them to exactly the agents that can answer.

Elicitation has two modes, ``form`` and ``url``, and the agent declares those it handles
(``capabilities.elicitation.form`` / ``.url``; an empty ``elicitation: {}`` is form only, for
backwards compatibility). The SDK's client (mcp 2.3.0) declares both modes whenever it has an
elicitation callback and has no public option to declare fewer (only its private
``_build_capabilities`` decides), so the upstream is told the agent handles both even when it
declared one, and may offer it tools that need the other. The relay makes up for it: an
``elicitation/create`` in a mode the agent did not declare is answered with the spec's error,
-32602 (Invalid params), without asking the agent. The upstream sees that error as the agent's
refusal; the agent's call goes on and is billed as the upstream then answers it.
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

__all__ = ["Relay", "elicitation_modes"]

log = logging.getLogger("mcpbill.proxy")

Context = ServerRequestContext[Any, Any]
_R = TypeVar("_R", bound=types.Result)
TOLD = (types.ResourceUpdatedNotification, types.ToolListChangedNotification,
        types.ResourceListChangedNotification, types.PromptListChangedNotification)


class Relay:
    """Routes what one agent's upstream session asks and tells to that agent (see the module
    docstring); ``session`` is any of the agent's request sessions, for its standalone stream."""

    def __init__(self, session: ServerSession,
                 capabilities: types.ClientCapabilities | None) -> None:
        self._session = session
        self._capabilities = capabilities or types.ClientCapabilities()
        self._modes = elicitation_modes(self._capabilities)
        self._in_flight: dict[int, Context] = {}

    @contextmanager
    def during(self, ctx: Context) -> Iterator[None]:
        """While one of the agent's requests is at the upstream."""
        key = id(ctx)
        self._in_flight[key] = ctx
        try:
            yield
        finally:
            self._in_flight.pop(key, None)

    def client_options(self) -> dict[str, Any]:
        """The upstream client's callbacks, for the capabilities the agent declared."""
        options: dict[str, Any] = {"message_handler": self.notified}
        if self._capabilities.sampling is not None:
            options.update(sampling_callback=self.sampling,
                           sampling_capabilities=self._capabilities.sampling)
        if self._capabilities.elicitation is not None:
            options["elicitation_callback"] = self.elicitation
        if self._capabilities.roots is not None:
            options["list_roots_callback"] = self.roots
        return options

    # --- the upstream asks --------------------------------------------------------------------

    async def sampling(self, context: ClientRequestContext, params: types.CreateMessageRequestParams
                       ) -> types.CreateMessageResult | types.ErrorData:
        request = types.CreateMessageRequest(params=params)
        return await self._ask(request, types.CreateMessageResult)

    async def elicitation(self, context: ClientRequestContext, params: types.ElicitRequestParams
                          ) -> types.ElicitResult | types.ErrorData:
        if params.mode not in self._modes:  # the upstream was told of both modes, see above
            log.debug("refused a %s mode elicitation the agent did not declare", params.mode)
            return types.ErrorData(code=types.INVALID_PARAMS, message=(
                f"the client did not declare {params.mode} mode elicitation"))
        return await self._ask(types.ElicitRequest(params=params), types.ElicitResult)

    async def roots(self, context: ClientRequestContext) -> types.ListRootsResult | types.ErrorData:
        return await self._ask(types.ListRootsRequest(), types.ListRootsResult)

    async def _ask(self, request: Any, result_type: type[_R]) -> _R | types.ErrorData:
        session, related = self._channel()
        metadata = ServerMessageMetadata(related_request_id=related) if related else None
        try:
            return await session.send_request(request, result_type, metadata=metadata)
        except MCPError as error:  # the agent's refusal as it gave it, or no channel to ask on
            return error.error

    def _channel(self) -> tuple[ServerSession, types.RequestId | None]:
        """The request at the upstream when there is exactly one, else the standalone stream."""
        if len(self._in_flight) == 1:
            ctx = next(iter(self._in_flight.values()))
            return ctx.session, ctx.request_id
        return self._session, None

    # --- the upstream tells -------------------------------------------------------------------

    async def notified(self, message: IncomingMessage) -> None:
        """A notification from the upstream (progress is relayed by the call itself)."""
        if isinstance(message, types.LoggingMessageNotification):
            session, related = self._channel()
            await _quietly(session.send_notification(message, related_request_id=related))
        elif isinstance(message, TOLD):
            await _quietly(self._session.send_notification(message))


def elicitation_modes(capabilities: types.ClientCapabilities) -> frozenset[str]:
    """The elicitation modes a client declared: none without the capability, form alone for an
    empty one (the spec's reading of a client older than the modes)."""
    declared = capabilities.elicitation
    if declared is None:
        return frozenset()
    modes = frozenset(mode for mode, given in (("form", declared.form), ("url", declared.url))
                      if given is not None)
    return modes or frozenset({"form"})


async def _quietly(sending: Any) -> None:
    """Send a notification; an agent that went away is not the upstream's problem."""
    try:
        await sending
    except Exception as error:  # noqa: BLE001 - a gone agent, a closed stream
        log.debug("relay to an agent failed: %s", error)

"""Which upstream session serves an agent's request.

An agent on the 2025-11-25 protocol has a session with the proxy (``Mcp-Session-Id``, opened
by initialize): its first request that reaches the upstream opens an upstream session of its
own (:meth:`Upstream.open <mcpbill_cli.proxy.upstream.Upstream.open>`, refused
PROXY_SESSIONS_FULL at the cap), with a :class:`~mcpbill_cli.proxy.relay.Relay` that declares
the agent's capabilities and relays what the upstream asks and tells to that agent. The
upstream session closes with the agent's session: a DELETE, the idle timeout, or the proxy's
shutdown (the SDK unwinds the connection's exit stack then).

What the agent set on its upstream session, its log level (``logging/setLevel``) and its
resource subscriptions (``resources/subscribe``, less what it unsubscribed), is kept
(:class:`Kept`) once the upstream accepted it, and set again on each new connection of that
session (a stdio child restarted, an HTTP session reopened) before the agent's next request
reaches it: the agent keeps getting the updates and the log it asked for.

A 2026-07-28 agent has no session: each of its requests stands alone, and no server-to-client
request, log or list change can reach it outside its own request. Its requests all share one
upstream session that declares no sampling, elicitation or roots (the upstream offers none of
the tools that need them) and whose notifications go nowhere; progress still reaches the call
that asked for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import mcp_types as types
from mcp.client import Client
from mcp.server.connection import Connection
from mcp.server.context import ServerRequestContext

from mcpbill_cli.proxy.relay import Relay
from mcpbill_cli.proxy.upstream import Link, Upstream, resend

__all__ = ["AgentSession", "Kept", "agent_session", "has_session", "opened_session"]

Context = ServerRequestContext[Any, Any]
STATE_KEY = "mcpbill.proxy.upstream"  # the agent's AgentSession, in its connection's state


@dataclass
class Kept:
    """What an agent set on its upstream session that a new connection would not know: its
    log level and the resources it is subscribed to (in the order it subscribed)."""

    level: types.LoggingLevel | None = None
    subscriptions: dict[str, None] = field(default_factory=dict)

    def subscribed(self, uri: str) -> None:
        self.subscriptions[uri] = None

    def unsubscribed(self, uri: str) -> None:
        self.subscriptions.pop(uri, None)

    def leveled(self, level: types.LoggingLevel) -> None:
        self.level = level

    async def replay(self, client: Client) -> None:
        """Set it all again on ``client``'s new connection (see
        :func:`~mcpbill_cli.proxy.upstream.resend`), the level first: the upstream's log of the
        subscriptions is then at the agent's level."""
        requests: list[Any] = []
        if self.level is not None:
            requests.append(types.SetLevelRequest(
                params=types.SetLevelRequestParams(level=self.level)))
        requests.extend(types.SubscribeRequest(params=types.SubscribeRequestParams(uri=uri))
                        for uri in list(self.subscriptions))
        await resend(client, requests)


@dataclass(frozen=True)
class AgentSession:
    """The upstream session serving an agent, the relay back to it (None: the shared session
    of the agents without one) and what the agent set on it."""

    link: Link
    relay: Relay | None
    kept: Kept = field(default_factory=Kept)

    @contextmanager
    def during(self, ctx: Context) -> Iterator[None]:
        """While the agent's request is at the upstream: what the upstream asks is for it."""
        if self.relay is None:
            yield
            return
        with self.relay.during(ctx):
            yield


def agent_session(upstream: Upstream, ctx: Context) -> AgentSession:
    """The agent's upstream session, opened on its first request (PROXY_SESSIONS_FULL at the
    cap; the next request tries again)."""
    connection = _connection(ctx)
    if connection.session_id is None:
        return AgentSession(upstream.shared(), None)
    opened = opened_session(ctx)
    if opened is not None:
        return opened
    relay, kept = Relay(ctx.session, connection.client_capabilities), Kept()
    link = upstream.open(relay.client_options(), kept.replay)
    opened = connection.state[STATE_KEY] = AgentSession(link, relay, kept)
    connection.exit_stack.push_async_callback(upstream.close, link)
    return opened


def opened_session(ctx: Context) -> AgentSession | None:
    """The agent's upstream session if its requests opened one."""
    opened = _connection(ctx).state.get(STATE_KEY)
    return opened if isinstance(opened, AgentSession) else None


def has_session(ctx: Context) -> bool:
    """Whether the agent has a session with the proxy (the 2025-11-25 era)."""
    return _connection(ctx).session_id is not None


def _connection(ctx: Context) -> Connection:
    # The SDK gives a low-level handler the request's ServerSession, which holds the agent's
    # Connection: its state and exit stack are where per-connection data and cleanup belong.
    connection: Connection = ctx.session._connection
    return connection

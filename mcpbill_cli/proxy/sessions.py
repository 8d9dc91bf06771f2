"""Which upstream session serves an agent's request.

An agent on the 2025-11-25 protocol has a session with the proxy (``Mcp-Session-Id``, opened
by initialize): its first request that reaches the upstream opens an upstream session of its
own (:meth:`Upstream.open <mcpbill_cli.proxy.upstream.Upstream.open>`, refused
PROXY_SESSIONS_FULL at the cap), with a :class:`~mcpbill_cli.proxy.relay.Relay` that declares
the agent's capabilities and relays what the upstream asks and tells to that agent. The
upstream session closes with the agent's session: a DELETE, the idle timeout, or the proxy's
shutdown (the SDK unwinds the connection's exit stack then).

A 2026-07-28 agent has no session: each of its requests stands alone, and no server-to-client
request, log or list change can reach it outside its own request. Its requests all share one
upstream session that declares no sampling, elicitation or roots (the upstream offers none of
the tools that need them) and whose notifications go nowhere; progress still reaches the call
that asked for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from mcp.server.connection import Connection
from mcp.server.context import ServerRequestContext

from mcpbill_cli.proxy.relay import Relay
from mcpbill_cli.proxy.upstream import Link, Upstream

__all__ = ["AgentSession", "agent_session", "has_session", "opened_session"]

Context = ServerRequestContext[Any, Any]
STATE_KEY = "mcpbill.proxy.upstream"  # the agent's AgentSession, in its connection's state


@dataclass(frozen=True)
class AgentSession:
    """The upstream session serving an agent, and the relay back to it (None: the shared
    session of the agents without one)."""

    link: Link
    relay: Relay | None

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
    relay = Relay(ctx.session, connection.client_capabilities)
    link = upstream.open(relay.client_options())
    opened = connection.state[STATE_KEY] = AgentSession(link, relay)
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

"""The proxy's MCP server: the SDK's low-level ``Server`` whose handlers forward to the upstream.

``tools/call`` is billed (:mod:`mcpbill_cli.proxy.billing`); ``tools/list`` gets each tool's
price in its ``_meta``, and ``ttlMs`` / ``cacheScope`` (``"private"`` while some tenant has
prices of its own; never longer or more shared than the upstream's own hints); resources,
prompts, completion and the log level pass through untouched, each to the agent's own upstream
session (:mod:`mcpbill_cli.proxy.sessions`). The SDK
serves both protocol eras downstream (2026-07-28 and the initialize handshake) and its client
negotiates with the upstream, so each side speaks its own version.

:func:`build_app` wraps it in a Starlette app: the streamable HTTP endpoint at ``/mcp``, a
request size limit refused with REQUEST_TOO_LARGE, and a lifespan that supervises the upstream
sessions and, on shutdown, closes them and voids the holds of calls cut off.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import mcp_types as types
from mcp.client import Client
from mcp.server import Server
from mcp.server._otel import OpenTelemetryMiddleware
from mcp.server.context import ServerRequestContext
from mcp.shared.exceptions import MCPDeprecationWarning, MCPError
from mcp_types import CONNECTION_CLOSED, INTERNAL_ERROR, REQUEST_TIMEOUT
from starlette.applications import Starlette
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mcpbill_cli.errors import (
    BillingError,
    ProxySessionsFull,
    RequestTooLarge,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from mcpbill_cli.mcp.wire import LIST_TTL_MS, PRICE_META, check_list_ttl, list_hints, narrowed
from mcpbill_cli.mcp.x402 import extension_binding_middleware
from mcpbill_cli.pricing import quote
from mcpbill_cli.proxy.billing import Limits, ProxyBilling, forwarded_meta, over_limit, too_large
from mcpbill_cli.proxy.listen import Listening
from mcpbill_cli.proxy.plain import TooLarge
from mcpbill_cli.proxy.posted import ENVELOPE_BYTES
from mcpbill_cli.proxy.sessions import Kept, agent_session, has_session, opened_session
from mcpbill_cli.proxy.upstream import SessionUnknown, Upstream
from mcpbill_cli.verifier import Verifier
from mcpbill_cli.x402.accept import Acceptor

if TYPE_CHECKING:
    from mcpbill_cli.metrics import PrometheusMetrics

__all__ = ["Proxy", "build_app"]

log = logging.getLogger("mcpbill.proxy")

_T = TypeVar("_T")
Context = ServerRequestContext[Any, Any]


class Proxy:
    """The billing proxy in front of ``upstream``: an MCP server (:attr:`server`) and its
    billing (:attr:`billing`)."""

    def __init__(self, verifier: Verifier, upstream: Upstream, limits: Limits | None = None,
                 *, resource: str | None = None, bearer: bool | None = None,
                 metrics: PrometheusMetrics | None = None, tracing: bool = False,
                 name: str = "mcpbill-proxy", list_ttl_ms: int = LIST_TTL_MS,
                 acceptor: Acceptor | None = None) -> None:
        self.verifier = verifier
        if metrics is not None:  # recorded by the verifier's call path and by the billing
            verifier.enable_metrics(metrics)
        if tracing:  # an mcpbill.call span per tools/call (mcpbill_cli.tracing)
            verifier.enable_tracing()
        self.list_ttl_ms = check_list_ttl(list_ttl_ms)
        self.upstream = upstream
        self.limits = limits or Limits()
        upstream.max_message_bytes = self.limits.max_response_bytes + ENVELOPE_BYTES
        self.billing = ProxyBilling(verifier, upstream, self.limits, resource=resource,
                                    bearer=bearer, acceptor=acceptor)
        self._schemas: dict[str, dict[str, Any]] = {}
        self.listening = Listening(self._send_shared)
        upstream.shared_options = self.listening.client_options()
        upstream.shared_replay = self.listening.replay
        with warnings.catch_warnings():  # logging/setLevel: deprecated by 2026-07-28, relayed
            warnings.simplefilter("ignore", MCPDeprecationWarning)  # for the era that has it
            self.server: Server[Any] = Server(
                name, get_tool_input_schema=self._schemas.get,
                on_list_tools=self._list_tools, on_call_tool=self.billing.call_tool,
                on_list_resources=self._list_resources,
                on_list_resource_templates=self._list_resource_templates,
                on_read_resource=self._read_resource, on_subscribe_resource=self._subscribe,
                on_unsubscribe_resource=self._unsubscribe, on_list_prompts=self._list_prompts,
                on_get_prompt=self._get_prompt, on_completion=self._complete,
                on_set_logging_level=self._set_logging_level,
                on_roots_list_changed=self._roots_list_changed,
                on_subscriptions_listen=self.listening.listen)
        if verifier.tracing is None:
            self.server.middleware = _untraced(self.server.middleware)
        if acceptor is not None:  # x402's extension binding for the agents that advertise it
            self.server.middleware.append(extension_binding_middleware())

    def list_hints(self) -> dict[str, Any]:
        """The ``ttlMs`` and ``cacheScope`` of the proxy's ``tools/list`` (see
        :func:`~mcpbill_cli.mcp.wire.list_hints`)."""
        return list_hints(self.verifier.pricing_table(), self.list_ttl_ms)

    # --- handlers ---------------------------------------------------------------------------------

    async def _list_tools(self, ctx: Context,
                          params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        """The upstream's tools, each with its price in ``_meta`` (none for a tool the table
        cannot price: its calls are refused PRICE_UNKNOWN)."""
        cursor, meta = _page(params)
        listed = await self._relay(ctx, lambda c: c.list_tools(cursor=cursor, meta=meta))
        table = self.verifier.pricing_table()
        tools = []
        for tool in listed.tools:
            self._schemas[tool.name] = dict(tool.input_schema)
            try:
                price = quote(table, tool.name).to_dict()
            except BillingError:
                tools.append(tool)
                continue
            tools.append(tool.model_copy(update={"meta": {**(tool.meta or {}), PRICE_META: price}}))
        if self.verifier.metrics is not None:  # real tools: their refusals keep their label
            self.verifier.metrics.listed(self._schemas)
        return listed.model_copy(update={"tools": tools, **self._hints_over(listed)})

    def _hints_over(self, listed: types.ListToolsResult) -> dict[str, Any]:
        """Our cache hints as result fields, bounded by the upstream's when it sent any."""
        hints = self.list_hints()
        if {"ttl_ms", "cache_scope"} & listed.model_fields_set:
            hints = narrowed(hints, listed.ttl_ms, listed.cache_scope)
        return {"ttl_ms": hints["ttlMs"], "cache_scope": hints["cacheScope"]}

    async def _list_resources(self, ctx: Context, params: types.PaginatedRequestParams | None
                              ) -> types.ListResourcesResult:
        cursor, meta = _page(params)
        return await self._relay(ctx, lambda c: c.list_resources(cursor=cursor, meta=meta))

    async def _list_resource_templates(self, ctx: Context,
                                       params: types.PaginatedRequestParams | None
                                       ) -> types.ListResourceTemplatesResult:
        cursor, meta = _page(params)
        return await self._relay(ctx, lambda c: c.list_resource_templates(cursor=cursor, meta=meta))

    async def _read_resource(self, ctx: Context, params: types.ReadResourceRequestParams
                             ) -> types.ReadResourceResult:
        meta = forwarded_meta(params.meta)
        return await self._relay(ctx, lambda c: c.read_resource(str(params.uri),
                                                           meta=meta))  # type: ignore[arg-type]

    async def _list_prompts(self, ctx: Context, params: types.PaginatedRequestParams | None
                            ) -> types.ListPromptsResult:
        cursor, meta = _page(params)
        return await self._relay(ctx, lambda c: c.list_prompts(cursor=cursor, meta=meta))

    async def _get_prompt(self, ctx: Context, params: types.GetPromptRequestParams
                          ) -> types.GetPromptResult:
        meta = forwarded_meta(params.meta)
        return await self._relay(ctx, lambda c: c.get_prompt(
            params.name, params.arguments, meta=meta))  # type: ignore[arg-type]

    async def _complete(self, ctx: Context, params: types.CompleteRequestParams
                        ) -> types.CompleteResult:
        context = params.context.arguments if params.context is not None else None
        return await self._relay(ctx, lambda c: c.complete(
            params.ref, {params.argument.name: params.argument.value}, context))

    async def _subscribe(self, ctx: Context, params: types.SubscribeRequestParams
                         ) -> types.EmptyResult:
        """The agent's upstream session subscribes, so its updates reach this agent alone."""
        return await self._to_session(ctx, types.SubscribeRequest(
            params=types.SubscribeRequestParams(uri=params.uri)),
            lambda kept: kept.subscribed(str(params.uri)))

    async def _unsubscribe(self, ctx: Context, params: types.UnsubscribeRequestParams
                           ) -> types.EmptyResult:
        return await self._to_session(ctx, types.UnsubscribeRequest(
            params=types.UnsubscribeRequestParams(uri=params.uri)),
            lambda kept: kept.unsubscribed(str(params.uri)))

    async def _set_logging_level(self, ctx: Context, params: types.SetLevelRequestParams
                                 ) -> types.EmptyResult:
        """The level of the upstream's log sent to this agent (its upstream session's)."""
        return await self._to_session(ctx, types.SetLevelRequest(
            params=types.SetLevelRequestParams(level=params.level)),
            lambda kept: kept.leveled(params.level))

    async def _to_session(self, ctx: Context, request: Any,
                          keep: Callable[[Kept], None]) -> types.EmptyResult:
        """A request that changes the agent's upstream session, which a 2026-07-28 agent does
        not have; once the upstream accepted it, ``keep`` notes it for a new connection of the
        session (:class:`~mcpbill_cli.proxy.sessions.Kept`). Sent as a plain request: the SDK's
        helpers warn that 2026-07-28 removed these methods, and the proxy relays them for the
        agents of the era that has them."""
        if not has_session(ctx):
            raise MCPError(types.INVALID_REQUEST, f"{ctx.method} needs a session: connect with "
                                                  "the 2025-11-25 protocol (initialize)")
        done = await self._relay(ctx, lambda client: client.session.send_request(
            request, types.EmptyResult))
        opened = opened_session(ctx)
        if opened is not None:  # it is: the request went to it
            keep(opened.kept)
        return done

    async def _send_shared(self, ctx: Context, request: Any) -> types.EmptyResult:
        """A request of the listen streams to the shared upstream session (2026-07-28 agents')."""
        return await self._relay(ctx, lambda client: client.session.send_request(
            request, types.EmptyResult))

    async def _roots_list_changed(self, ctx: Context,
                                  params: types.NotificationParams | None) -> None:
        """Tell the agent's upstream session, if it has one (else it has not asked yet)."""
        opened = opened_session(ctx)
        client = opened.link.current if opened is not None else None
        if client is not None:
            await client.session.send_notification(types.RootsListChangedNotification())

    async def _relay(self, ctx: Context, request: Callable[[Client], Awaitable[_T]]) -> _T:
        """A request other than ``tools/call``, forwarded as is to the agent's upstream session;
        the upstream's JSON-RPC error is the agent's, and a proxy failure is one too, with the
        mcpbill error in its data (a result over ``--max-response-bytes`` is RESPONSE_TOO_LARGE,
        an agent session over the cap PROXY_SESSIONS_FULL). A request the upstream refused for
        a session it lost (it restarted) is sent again on a new one (:meth:`Link.call
        <mcpbill_cli.proxy.upstream.Link.call>`)."""
        try:
            session = agent_session(self.upstream, ctx)
            client = await session.link.client()
        except (ProxySessionsFull, UpstreamUnavailable) as error:
            raise _rpc_error(INTERNAL_ERROR, error) from None
        timeout = self.limits.call_timeout
        try:
            with anyio.fail_after(timeout), session.during(ctx):
                result = await session.link.call(client, request)
        except TooLarge as error:  # cut off while read
            raise _rpc_error(INTERNAL_ERROR, over_limit(
                error.size, self.limits.max_response_bytes, cut_off=True)) from None
        except TimeoutError:
            raise _rpc_error(REQUEST_TIMEOUT, UpstreamTimeout(
                f"the upstream did not answer within {timeout:g} s",
                timeoutSeconds=timeout)) from None
        except (SessionUnknown, UpstreamUnavailable) as error:
            raise _rpc_error(INTERNAL_ERROR, UpstreamUnavailable(
                f"the upstream lost this agent's session and could not be reconnected "
                f"({error}): retry", upstream=self.upstream.target.describe())) from None
        except MCPError as error:
            if error.code != CONNECTION_CLOSED:
                raise
            session.link.broken(client)
            raise _rpc_error(INTERNAL_ERROR, UpstreamUnavailable(
                f"the upstream connection closed ({error}); the proxy is reconnecting: retry",
                upstream=self.upstream.target.describe())) from None
        oversized = too_large(result, self.limits.max_response_bytes)
        if oversized is not None:
            raise _rpc_error(INTERNAL_ERROR, oversized)
        return result


def _untraced(middleware: list[Any]) -> list[Any]:
    """``middleware`` without the SDK's OpenTelemetry span per message. An untraced proxy
    exports no spans (``mcpbill proxy`` sets a tracer provider up only with ``--trace``), so that
    span would be work on every request (started, its attributes built, the agent's trace
    context parsed) that nothing records."""
    return [layer for layer in middleware if not isinstance(layer, OpenTelemetryMiddleware)]


def _page(params: types.PaginatedRequestParams | None) -> tuple[str | None, Any]:
    if params is None:
        return None, None
    return params.cursor, forwarded_meta(params.meta)


def _rpc_error(code: int, error: BillingError) -> MCPError:
    return MCPError(code, f"{error.code}: {error.agent_message}", data=error.for_agent())


# --- the HTTP app ---------------------------------------------------------------------------------


def build_app(proxy: Proxy, *, host: str = "127.0.0.1", path: str = "/mcp") -> Starlette:
    """The proxy as an ASGI app: ``path`` serves streamable HTTP; ``host`` is where it listens
    (a loopback host turns on the SDK's DNS rebinding protection)."""
    limit = proxy.limits.max_request_bytes
    inner = proxy.server.streamable_http_app(
        streamable_http_path=path, host=host, max_request_body_size=limit,
        session_idle_timeout=proxy.limits.session_idle_timeout)
    manager = proxy.server.session_manager

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tasks:
            await tasks.start(proxy.upstream.run)
            try:
                async with manager.run():
                    yield
            finally:
                voided = await proxy.billing.void_open()
                if voided:
                    log.warning("shutdown: voided %d holds of calls cut off", voided)
                tasks.cancel_scope.cancel()

    app = Starlette(routes=list(inner.routes), lifespan=lifespan)
    app.add_middleware(_SizeLimit, limit=limit)
    return app


class _SizeLimit:
    """Refuse a request whose body is over ``limit`` bytes with 413 and the coded
    REQUEST_TOO_LARGE as a JSON-RPC error: at once when its ``Content-Length`` says so, else (a
    chunked body) once what was read of it passes the limit, nothing more of it read. The SDK's
    own limit cuts a chunked body off at the same size, but answers a plain-text 413 and keeps
    the connection, so an agent still sending an endless body never gets it; this answer closes
    the connection. A body with a ``Content-Length`` is framed by it and not counted again."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is None:
            await self._counted(scope, receive, send)
        elif declared.isdigit() and int(declared) > self.limit:
            await self._refuse(f"{int(declared)} bytes", int(declared), send)
        else:
            await self.app(scope, receive, send)

    async def _counted(self, scope: Scope, receive: Receive, send: Send) -> None:
        read = 0

        async def counting() -> Message:
            nonlocal read
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > self.limit:
                    raise _Overflow(read)
            return message

        try:
            await self.app(scope, counting, send)
        except _Overflow as overflow:  # the body is read before anything is answered
            await self._refuse(f"more than {overflow.size} bytes (cut off)", overflow.size, send)

    async def _refuse(self, size_text: str, size: int, send: Send) -> None:
        error = RequestTooLarge(f"the request body is {size_text}, over this proxy's limit of "
                                f"{self.limit} bytes; nothing was forwarded or held",
                                limitBytes=self.limit, sizeBytes=size)
        body = json.dumps({"jsonrpc": "2.0", "id": None, "error": {
            "code": types.INVALID_REQUEST, "message": f"{error.code}: {error.message}",
            "data": error.to_dict()}}).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class _Overflow(Exception):  # noqa: N818 - the agent's request body, as read
    """A request body over the limit after ``size`` bytes read."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size

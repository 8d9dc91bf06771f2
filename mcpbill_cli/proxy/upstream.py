"""The MCP server behind the proxy: one upstream session per agent session, each a client
connection kept open and reopened when it breaks.

A stdio upstream is a child process the proxy starts (``--upstream-cmd``): each agent session
gets a child of its own. An HTTP upstream is a streamable HTTP URL (``--upstream``): each agent
session gets a client session of its own. Upstream state that lives per connection (a
subscription, a log level, cached roots, the capabilities the client declared) is then the
agent's alone, and whatever the upstream asks or tells on a connection is for that one agent.

:class:`Upstream` keeps these connections (:class:`Link`), at most ``max_sessions`` at once
(the next agent session is refused PROXY_SESSIONS_FULL until one ends), plus one shared link
for requests that come without a session (the 2026-07-28 era), which does not count. Each link
runs in its own task of :meth:`Upstream.run` (the SDK's client must be entered and left in the
same task), reconnects, restarting a stdio child, whenever the child exits, an HTTP upstream's
standalone stream is lost (:class:`_WatchingStandalone`), a call reports the connection broken
or the client itself fails, restores on the new connection what its agent set on the old one
(:class:`Link`), and is closed (the child exits, the HTTP session is deleted) by
:meth:`Upstream.close` when its agent session ends. Handlers get the live client from
:meth:`Link.client`, waiting for a reconnect at most ``connect_timeout`` seconds. On an HTTP
upstream a ``tools/call`` is posted by the proxy itself where it can be
(:mod:`mcpbill_cli.proxy.posted`) on the client's session: on connections of its own for a
plain ``http://`` upstream (:mod:`mcpbill_cli.proxy.plain`), else on the client's HTTP client.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial
from typing import Any, NoReturn, TextIO, TypeVar

import anyio
import httpx2
import mcp_types as types
from anyio.abc import ObjectReceiveStream, TaskGroup, TaskStatus
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import MCP_SESSION_ID, streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import CONNECTION_CLOSED

from mcpbill_cli.errors import InvalidInput, ProxySessionsFull, UpstreamUnavailable
from mcpbill_cli.proxy.plain import CONNECT_SECONDS, READ_SECONDS, TooLarge
from mcpbill_cli.proxy.posted import DRAIN_SECONDS, ENVELOPE_BYTES, POSTED, Wire
from mcpbill_cli.proxy.stdio import OVERSIZED, bounded_stdio, child_environment
from mcpbill_cli.redaction import redact
from mcpbill_cli.urls import http_url_problem

__all__ = ["Link", "Replay", "SessionUnknown", "Upstream", "UpstreamTarget", "resend"]

log = logging.getLogger("mcpbill.proxy")

RECONNECT_DELAYS = (0.0, 0.2, 0.5, 1.0, 2.0, 5.0)  # seconds before each reconnect, then the last
MAX_SESSIONS = 64  # upstream sessions open at once (one per agent session), by default
MAX_MESSAGE_BYTES = 4 * 1024 * 1024 + ENVELOPE_BYTES  # the proxy's default response limit
SESSIONS_RETRY_MS = 1000
# The SDK's own client timeouts: a response stream may stay open for minutes.
HTTP_TIMEOUT = httpx2.Timeout(CONNECT_SECONDS, read=READ_SECONDS)
# How much of a request's SSE stream is read after its answer, to keep the connection
# (_Draining; for at most DRAIN_SECONDS, as the proxy's own calls do).
DRAIN_BYTES = 64 * 1024
# Restores on a new connection what its agent set on the one before (see Link).
Replay = Callable[[Client], Awaitable[None]]
# A new client; the connection calls its argument when it ends on its own (a stdio child exits,
# an HTTP upstream's standalone stream is lost).
Connect = Callable[[Callable[[], None]], Client]
_T = TypeVar("_T")


class SessionUnknown(Exception):  # noqa: N818 - what the upstream said, not a failure of ours
    """The upstream answered a request that it does not know the session it came on (it
    restarted since): the request never ran there."""


@dataclass
class Sending:
    """One request on its way to an HTTP upstream (set by :func:`_noticing_lost_sessions`):
    whether the upstream refused it for an unknown session before it accepted any request of
    it (the SDK's client may post more than one, e.g. ``tools/list`` for a result's schema);
    only then did nothing of it run."""

    session_unknown: bool = False
    accepted: bool = False
    cut_off: int | None = None  # the bytes read of its answer, cut off at the limit


# The request the current task is sending. The SDK's transport posts each request in the
# contextvars of the task that sent it, so the response hook finds it here.
_SENDING: ContextVar[Sending | None] = ContextVar("mcpbill_proxy_sending", default=None)


@dataclass(frozen=True)
class UpstreamTarget:
    """Where the upstream is: a command line to run over stdio, or a streamable HTTP URL."""

    command: tuple[str, ...] = ()
    url: str | None = None
    env: dict[str, str] | None = None

    @classmethod
    def parse(cls, *, command: str | None, url: str | None,
              env: dict[str, str] | None = None) -> UpstreamTarget:
        """Exactly one of ``command`` (split like a shell would) and ``url``."""
        if (command is None) == (url is None):
            raise InvalidInput("give exactly one upstream: --upstream URL (streamable HTTP) or "
                               "--upstream-cmd \"CMD ARGS\" (a stdio server to run)",
                               field="upstream")
        if url is not None:
            _check_url(url)
            return cls(url=url)
        try:
            words = tuple(shlex.split(command or ""))
        except ValueError as error:  # an unbalanced quote, a lone escape at the end
            raise InvalidInput(f"--upstream-cmd {command!r} cannot be split into words as a "
                               f"shell would ({error}): check its quotes",
                               field="upstream-cmd") from None
        if not words:
            raise InvalidInput("--upstream-cmd is empty", field="upstream-cmd")
        return cls(command=words, env=env)

    def check_runnable(self) -> None:
        """INVALID_INPUT now, when the command's program cannot be run (not on ``PATH``, not
        executable), rather than on each agent's first request."""
        if not self.command:
            return
        path = child_environment(self.env).get("PATH", os.defpath)
        if shutil.which(self.command[0], path=path) is None:
            raise InvalidInput(f"--upstream-cmd: cannot run {self.command[0]!r}: no such "
                               "executable (on PATH, or at that path)", field="upstream-cmd")

    def describe(self) -> str:
        return self.url if self.url is not None else shlex.join(self.command)


class Upstream:
    """The upstream's sessions, one per agent session: see the module docstring."""

    def __init__(self, target: UpstreamTarget, *, connect_timeout: float = 30.0,
                 max_sessions: int = MAX_SESSIONS, errlog: TextIO | None = None) -> None:
        self.target = target
        self.connect_timeout = connect_timeout
        self.max_sessions = max_sessions
        self.connects = 0  # connections opened so far, all links (a restart counts again)
        self._errlog = errlog
        self._links: set[Link] = set()  # the agent sessions' links
        self._shared: Link | None = None
        self.shared_options: dict[str, Any] = {}  # the shared session's client options
        self.shared_replay: Replay | None = None  # and what it sets on each new connection
        # The most bytes of one message the upstream sends that are read (see bounded_stdio).
        self.max_message_bytes = MAX_MESSAGE_BYTES
        self._tasks: TaskGroup | None = None

    @property
    def sessions(self) -> int:
        """Agent sessions with an upstream session open."""
        return len(self._links)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run the links until cancelled (the proxy's lifespan); they all close with it."""
        async with anyio.create_task_group() as tasks:
            self._tasks = tasks
            task_status.started()
            try:
                await anyio.sleep_forever()
            finally:
                self._tasks = None

    def open(self, client_options: dict[str, Any], replay: Replay | None = None) -> Link:
        """A new upstream session for an agent session, with the client's callbacks for that
        agent and what to ``replay`` on each of its connections; PROXY_SESSIONS_FULL when
        ``max_sessions`` are open."""
        if len(self._links) >= self.max_sessions:
            raise ProxySessionsFull(
                f"the proxy has {len(self._links)} upstream sessions open, its limit; retry "
                "once an agent session ends (or reuse an open one)",
                limit=self.max_sessions, retryAfterMs=SESSIONS_RETRY_MS)
        link = self._start(client_options, replay)
        self._links.add(link)
        return link

    def shared(self) -> Link:
        """The one upstream session for requests without an agent session (no callbacks: the
        upstream is told of no sampling, elicitation or roots)."""
        if self._shared is None:
            self._shared = self._start(self.shared_options, self.shared_replay)
        return self._shared

    async def close(self, link: Link) -> None:
        """End an agent session's upstream session (a stdio child exits) and free its place."""
        self._links.discard(link)
        await link.close()

    def _start(self, client_options: dict[str, Any], replay: Replay | None = None) -> Link:
        if self._tasks is None:
            raise UpstreamUnavailable("the proxy is not running (or is shutting down)",
                                      upstream=self.target.describe())
        link = Link(self.target, self._client(client_options), self.connect_timeout,
                    on_connect=self._connected, replay=replay)
        self._tasks.start_soon(link.run)
        return link

    def _connected(self) -> None:
        self.connects += 1

    def _client(self, client_options: dict[str, Any]) -> Connect:
        # A proxy relays listings, never caches them.
        options: dict[str, Any] = {"cache": None, **client_options}
        if self.target.url is not None:
            url = self.target.url

            limit = self.max_message_bytes

            def connect(ended: Callable[[], None]) -> Client:
                wire = Wire(url, options, heard=_heard)
                return wire.bind(Client(_http(url, ended, wire, limit), **options))

            return connect
        parameters = StdioServerParameters(command=self.target.command[0],
                                           args=list(self.target.command[1:]),
                                           env=self.target.env)
        errlog, limit = self._errlog or sys.stderr, self.max_message_bytes
        return lambda ended: Client(_watching(bounded_stdio(parameters, limit, errlog), ended),
                                    **options)


def _check_url(url: str) -> None:
    """INVALID_INPUT for an ``--upstream`` it cannot send to: refused at start, not on each
    agent's first request."""
    problem = http_url_problem(url)
    if problem is not None:
        raise InvalidInput(f"--upstream must be an http(s) URL with a host, not {redact(url)!r} "
                           f"({problem})", field="upstream")


def relay_results_as_they_come(client: Client) -> None:
    """Turn off the SDK client's check of each ``tools/call`` result against the tool's output
    schema, on this upstream session: a relay passes results on, and the agent's own client
    checks them against the schema it listed. The check also lists the upstream's tools, on
    the call's path, for any tool not listed yet on this session: a ``tools/list`` the agent
    never asked for, as large as the upstream's catalogue (over a small
    ``--max-response-bytes``, every call failed with RESPONSE_TOO_LARGE). Set on the
    session, the SDK's only switch for it being its method."""
    async def relayed(name: str, result: Any) -> None:
        return None

    client.session.validate_tool_result = relayed  # type: ignore[method-assign]


async def resend(client: Client, requests: list[Any]) -> None:
    """Send ``requests`` (each answered with an empty result) on a new connection, to set what
    was set on the one before: one the upstream refuses now is logged and skipped; a connection
    that closes raises, and is reopened. Plain requests, as the agent's own were (the SDK's
    helpers warn that 2026-07-28 removed these methods)."""
    for request in requests:
        try:
            await client.session.send_request(request, types.EmptyResult)
        except MCPError as error:
            if error.code == CONNECTION_CLOSED:
                raise
            log.warning("the upstream refused to restore %s: %s", request.method, error)


@asynccontextmanager
async def _http(url: str, ended: Callable[[], None], wire: Wire, limit: int
                ) -> AsyncIterator[tuple[Any, Any]]:
    """The SDK's streamable HTTP transport, on an HTTP client of its own that notes an unknown
    session in the answer to a request (the SDK's client keeps the status to itself), calls
    ``ended`` when the upstream's standalone stream is lost (:class:`_WatchingStandalone`),
    reads each answer up to ``limit`` bytes (:class:`_Bounded`) and is ``wire``'s, for the calls
    the proxy posts itself (:mod:`mcpbill_cli.proxy.posted`)."""
    transport = _WatchingStandalone(ended, wire, limit)
    async with httpx2.AsyncClient(timeout=HTTP_TIMEOUT, transport=transport,
                                  event_hooks={"response": [_noticing_lost_sessions]}) as http:
        wire.http = http
        try:
            async with streamable_http_client(url, http_client=http) as streams:
                yield streams
        finally:
            wire.close()


async def _noticing_lost_sessions(response: httpx2.Response) -> None:
    """Note on the request being sent (:data:`_SENDING`) that the upstream does not know the
    session it was posted on: 404 (the spec's answer), or 400 whose
    JSON-RPC error names the session (the reference server's: "Bad Request: No valid session ID
    provided"). Any other answer is left to the SDK. The status is looked at first: the request's
    JSON is parsed only for an answer that settles something."""
    sending = _SENDING.get()
    if sending is None or sending.accepted or response.request.extensions.get(POSTED):
        return  # a call the wire posted: it tells _heard itself, see mcpbill_cli.proxy.posted
    status = response.status_code
    if (response.is_success or status in (400, 404)) and _posts_request(response.request):
        try:
            _heard(status, await response.aread() if status == 400 else b"")
        except httpx2.StreamError:  # a refusal over the limit (_Bounded): it says nothing
            _heard(status, b"")


def _heard(status: int, body: bytes) -> None:
    """Note on the request being sent (:data:`_SENDING`) what the answer to it, posted on a
    session, settles: accepted (2xx), or the session unknown to the upstream (see
    :func:`_noticing_lost_sessions`). Told directly by a ``tools/call`` the wire posted
    (:mod:`mcpbill_cli.proxy.posted`)."""
    sending = _SENDING.get()
    if sending is None or sending.accepted:
        return
    if 200 <= status < 300:
        sending.accepted = True
    elif status == 404 or (status == 400 and _names_session(body)):
        sending.session_unknown = True


def _posts_request(request: httpx2.Request) -> bool:
    """Whether ``request`` posts a JSON-RPC request on a session: its answer is then the
    request's own. Not a GET that resumes the stream of a request the upstream accepted: that
    request may have run before the upstream went away."""
    if request.method != "POST" or MCP_SESSION_ID not in request.headers:
        return False
    try:
        return "id" in json.loads(request.content)
    except (ValueError, TypeError):
        return False


def _names_session(body: bytes) -> bool:
    """Whether a JSON-RPC error ``body`` says its trouble is the session."""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(message, str) and "session" in message.lower()


class _WatchingStandalone(httpx2.AsyncBaseTransport):
    """One HTTP connection's transport, watching its standalone stream: the GET on which the
    upstream sends what answers no request (list changes, resource updates, its log, its own
    requests). An agent that sends nothing hears from the upstream on it alone, and a call that
    finds the session gone (:meth:`Link.call`) never comes. So once that stream was open, it
    breaking (the upstream went away), or its reopening failing or being refused (404, or 400:
    the upstream restarted and lost the session) calls ``ended``: the link reconnects at once
    and its agent's subscriptions are set again. The SDK's own reopening of a stream that ended
    cleanly is left to it, and so is an upstream that offers no standalone stream (405). The
    stream has no read timeout: an upstream with nothing to tell is not gone (and the SDK's
    client gives the stream up after two failures)."""

    def __init__(self, ended: Callable[[], None], wire: Wire, limit: int) -> None:
        self._transport = httpx2.AsyncHTTPTransport()
        self._ended = ended
        self._wire = wire
        self._limit = limit
        self._opened = False

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        if not _standalone(request):
            response = await self._transport.handle_async_request(request)
            self._wire.noted(response)
            if not request.extensions.get(POSTED):  # else read up to the limit by the wire
                _bound(response, self._limit)
            return _drained(response)
        request.extensions["timeout"] = {**request.extensions.get("timeout", {}), "read": None}
        try:
            response = await self._transport.handle_async_request(request)
        except httpx2.TransportError:
            self._lost()
            raise
        if response.is_success:
            self._opened = True
            _bound(response, self._limit)
            response.stream = _Breaking(response.stream, self._ended)
        elif response.status_code in (400, 404):
            self._lost()
        return response

    def _lost(self) -> None:
        if self._opened:  # a stream never opened is not lost: no reconnecting in a loop
            self._ended()

    async def aclose(self) -> None:
        await self._transport.aclose()


class _Breaking(httpx2.AsyncByteStream):
    """A response body that calls ``broke`` when reading it fails (not when it ends cleanly)."""

    def __init__(self, stream: Any, broke: Callable[[], None]) -> None:
        self._stream = stream
        self._broke = broke

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._stream:
                yield chunk
        except httpx2.TransportError:
            self._broke()
            raise

    async def aclose(self) -> None:
        await self._stream.aclose()


def _bound(response: httpx2.Response, limit: int) -> None:
    """Read ``response``'s body, or each SSE event of it, up to ``limit`` bytes (see
    :class:`_Bounded`)."""
    sse = response.headers.get("content-type", "").startswith("text/event-stream")
    response.stream = _Bounded(response.stream, limit, sse=sse, sending=_SENDING.get())


EVENT_ENDS = (b"\n\n", b"\r\r", b"\r\n\r\n")  # the blank lines that end an SSE event


class _Bounded(httpx2.AsyncByteStream):
    """A response body read up to ``limit`` bytes, or each event of an SSE stream: past it,
    nothing more is read, the request being sent notes it (:attr:`Sending.cut_off`: the
    caller gets RESPONSE_TOO_LARGE, see :meth:`Link.call`) and reading fails the way the SDK's
    client answers a broken body, its request resolved at once: an SSE stream with
    :class:`_EventTooLarge` (on the standalone stream too, which is then reopened, see
    :class:`_WatchingStandalone`), a JSON body with :class:`_BodyTooLarge`.

    The SDK's client reads an answer whole before it parses it (an SSE event too, however
    long), so without this an upstream answering any request with an endless body would grow
    the proxy's memory until the call times out. An event ends at a blank line (LF LF, CR CR or
    CRLF CRLF, which may be cut between two reads: the last bytes of one are looked at again
    with the next). Counting costs 1 to 3 µs of CPU per answer (measured here, a 2 KB JSON
    body or SSE answer read through it and without), and only on requests other than the calls
    the wire posts, whose reading is bounded by the wire itself."""

    def __init__(self, stream: Any, limit: int, *, sse: bool, sending: Sending | None) -> None:
        self._stream = stream
        self._limit = limit
        self._sse = sse
        self._sending = sending

    async def __aiter__(self) -> AsyncIterator[bytes]:
        size, edge = 0, b""
        async for chunk in self._stream:
            if self._sse:
                seen = edge + chunk
                ends = max((seen.rfind(blank) + len(blank) for blank in EVENT_ENDS
                            if blank in seen), default=0)  # past the last event's end
                size = len(seen) - ends if ends else size + len(chunk)
                edge = seen[-3:]
            else:
                size += len(chunk)
            if size > self._limit:
                self._over(size)
            yield chunk

    def _over(self, size: int) -> NoReturn:
        if self._sending is not None:
            self._sending.cut_off = size
        raise (_EventTooLarge if self._sse else _BodyTooLarge)(
            f"an answer over the limit after {size} bytes")

    async def aclose(self) -> None:
        await self._stream.aclose()


class _EventTooLarge(httpx2.SSEError):
    """An SSE event over the limit (:class:`_Bounded`)."""


class _BodyTooLarge(httpx2.StreamError):
    """A response body over the limit (:class:`_Bounded`)."""


def _drained(response: httpx2.Response) -> httpx2.Response:
    """``response``, its body read to the end before it is closed when it is an SSE stream
    (:class:`_Draining`)."""
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        response.stream = _Draining(response.stream)
    return response


class _Draining(httpx2.AsyncByteStream):
    """An SSE response body that, closed before its end, reads the rest first (at most
    DRAIN_BYTES, for at most DRAIN_SECONDS), so its connection goes back to the pool.

    The SDK's client closes a request's SSE stream as soon as the answer came, while the
    upstream is about to end it: closing a response not read to its end closes its connection
    too, and every call would open a new one (a TCP connect and close per call, on both sides:
    about 0.5 ms of the proxy's CPU per call, measured here). A stream that goes on is closed
    as before."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._chunks: AsyncIterator[bytes] | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self._chunks = self._stream.__aiter__()
        async for chunk in self._chunks:
            yield chunk

    async def aclose(self) -> None:
        try:
            if self._chunks is not None:
                await _drain(self._chunks)
        finally:
            await self._stream.aclose()


async def _drain(chunks: AsyncIterator[bytes]) -> None:
    """Read what is left of ``chunks`` (see :class:`_Draining`); a failure to read it only
    costs the connection."""
    left = DRAIN_BYTES
    with anyio.move_on_after(DRAIN_SECONDS), suppress(httpx2.TransportError):
        async for chunk in chunks:
            left -= len(chunk)
            if left < 0:
                return


def _standalone(request: httpx2.Request) -> bool:
    """Whether ``request`` opens the standalone stream of a session: a GET on it that resumes no
    request's stream (those are sent on behalf of a request, see :data:`_SENDING`)."""
    return (request.method == "GET" and MCP_SESSION_ID in request.headers
            and _SENDING.get() is None)


@asynccontextmanager
async def _watching(transport: AbstractAsyncContextManager[tuple[Any, Any]],
                    ended: Callable[[], None]) -> AsyncIterator[tuple[Any, Any]]:
    """A stdio transport whose end (the child exited, or closed its stdout) calls ``ended``: the
    link restarts the child then, before the agent's next request finds it gone."""
    async with transport as (read, write):
        yield _Watched(read, ended), write


class _Watched(ObjectReceiveStream[Any]):
    """A read stream that calls ``ended`` at its end of stream (not when closed on our side)."""

    def __init__(self, stream: ObjectReceiveStream[Any], ended: Callable[[], None]) -> None:
        self._stream = stream
        self._ended = ended

    async def receive(self) -> Any:
        try:
            return await self._stream.receive()
        except anyio.EndOfStream:
            self._ended()
            raise

    async def aclose(self) -> None:
        await self._stream.aclose()


def _cut_off(error: Exception) -> int | None:
    """The bytes read of an answer cut off at the limit, if ``error`` stands for one (see
    :func:`~mcpbill_cli.proxy.stdio.bounded_stdio`)."""
    if not isinstance(error, MCPError) or error.code != OVERSIZED:
        return None
    data = error.error.data
    size = data.get("sizeBytes") if isinstance(data, dict) else None
    return size if isinstance(size, int) else None


class Link:
    """One upstream session, supervised: opened by :meth:`run`, reopened when it breaks, ended
    by :meth:`close`.

    A new connection starts without the state its agent set on the one before (a restarted
    child knows nothing of it): ``replay`` restores that state on each connection before any
    caller gets it, so the agent's next request finds its upstream session as it left it. A
    connection that breaks during the replay is reopened like any other."""

    def __init__(self, target: UpstreamTarget, connect: Connect,
                 connect_timeout: float, *, on_connect: Callable[[], None],
                 replay: Replay | None = None) -> None:
        self.target = target
        self.connect_timeout = connect_timeout
        self._connect = connect
        self._on_connect = on_connect
        self._replay = replay
        self._client: Client | None = None
        self._connected = anyio.Event()
        self._broken = anyio.Event()
        self._scope = anyio.CancelScope()
        self._closed = anyio.Event()

    async def run(self) -> None:
        """Keep a connection open until closed; reconnect (with a growing delay) when it breaks
        or cannot be opened."""
        try:
            with self._scope:
                await self._keep_open()
        finally:
            self._closed.set()

    async def close(self) -> None:
        """Close the connection and wait until it is closed (a stdio child has exited)."""
        self._scope.cancel()
        await self._closed.wait()

    async def _keep_open(self) -> None:
        failures = 0
        while True:
            delay = RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS) - 1)]
            await anyio.sleep(delay)
            try:
                broken = self._broken = anyio.Event()
                async with self._connect(partial(self._ended, broken)) as client:
                    relay_results_as_they_come(client)
                    if self._replay is not None:
                        with anyio.fail_after(self.connect_timeout):
                            await self._replay(client)
                    self._client = client
                    self._on_connect()
                    failures = 0
                    self._connected.set()
                    await broken.wait()
            except Exception as error:  # noqa: BLE001 - any failure of the link means reconnect
                failures += 1
                log.warning("upstream %s failed: %s", self.target.describe(), error)
            finally:
                self._drop()

    @property
    def current(self) -> Client | None:
        """The live client, or None while (re)connecting."""
        return self._client

    async def client(self) -> Client:
        """The live client, waiting for a (re)connect; UPSTREAM_UNAVAILABLE after
        ``connect_timeout`` seconds without one."""
        if (client := self._client) is not None:  # connected: no timeout scope to set up
            return client
        with anyio.move_on_after(self.connect_timeout):
            while (client := self._client) is None:
                await self._connected.wait()
            return client
        raise UpstreamUnavailable(
            f"the upstream {self.target.describe()} is not reachable (no connection within "
            f"{self.connect_timeout:g} s)", upstream=self.target.describe())

    async def call(self, client: Client, request: Callable[[Client], Awaitable[_T]]) -> _T:
        """``request`` on ``client`` (from :meth:`client`). When the upstream answers that it does
        not know the session (it restarted), the link reconnects, replaying its agent's state,
        and the request is sent once more on the new session: it never ran on the old one, so
        a paid call, too, runs once. :class:`SessionUnknown` if the new session is refused as
        well; UPSTREAM_UNAVAILABLE if no new connection comes within ``connect_timeout``."""
        try:
            return await self._send(client, request)
        except SessionUnknown:
            log.warning("upstream %s no longer knows its session (restarted?): reconnecting "
                        "and sending the request again", self.target.describe())
        return await self._send(await self.client(), request)

    async def _send(self, client: Client, request: Callable[[Client], Awaitable[_T]]) -> _T:
        """``request`` on ``client``; SessionUnknown (the connection dropped) if the upstream
        refused it for an unknown session, whatever error the SDK made of that answer;
        TooLarge if its answer was cut off at the limit (see bounded_stdio)."""
        sending = Sending()
        token = _SENDING.set(sending)
        try:
            return await request(client)
        except Exception as error:
            if (size := sending.cut_off or _cut_off(error)) is not None:
                raise TooLarge(size) from None
            if not sending.session_unknown:
                raise
            self.broken(client)
            raise SessionUnknown(f"the upstream {self.target.describe()} does not know the "
                                 f"session ({error})") from error
        finally:
            _SENDING.reset(token)

    def broken(self, client: Client) -> None:
        """A call found ``client``'s connection broken: drop it and reconnect (once, however
        many calls report it)."""
        if client is self._client:
            self._drop()  # calls from now on wait for the new connection
            self._broken.set()

    def _ended(self, broken: anyio.Event) -> None:
        """The connection ``broken`` stands for ended on its own: reconnect now, so that the
        next call waits for the new connection instead of failing on this one, and what the
        upstream tells its agent comes on the new one."""
        if broken is self._broken and not broken.is_set():
            log.warning("upstream %s went away; reconnecting", self.target.describe())
            self._drop()
            broken.set()

    def _drop(self) -> None:
        if self._client is not None:
            self._connected = anyio.Event()  # before _client is cleared: waiters wait anew
            self._client = None

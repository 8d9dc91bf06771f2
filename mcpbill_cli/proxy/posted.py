"""A ``tools/call`` posted straight on an HTTP upstream's session, without the SDK's client.

The SDK's client spends about twice the CPU of one plain POST on a call (its writer task, a task
per request, memory streams, its SSE reader's generators left to the loop's finalizer, two
validations of the result): measured against the reference server here, 2.2 to 3.4 ms per call
against 1.3 ms. The proxy makes every paid call it forwards, so it posts a call itself when it
can: the handshake is over (the session's ``Mcp-Session-Id`` noted from the upstream's answer
to it, :meth:`Wire.noted`; its protocol version from the SDK's client), and the session cannot
ask its agent anything (it declared no sampling, elicitation or roots), so the only messages on
the call's stream are notifications and the answer. Otherwise, and for every other request,
the SDK's client does it.

What the SDK's client would do, it does: progress to the call's progress callback, other
notifications to the session's message handler, a ``ping`` answered, any other request of the
upstream refused (it was told of no capability that needs one); a JSON-RPC error raised as
:class:`MCPError`, a broken stream as ``CONNECTION_CLOSED``, and a call cancelled (the agent
went away, the timeout) told to the upstream with ``notifications/cancelled``. An answer that
refuses the session (the upstream restarted) is told to ``heard``, as the HTTP client's response
hook tells it of the SDK's requests (:meth:`Link.call <mcpbill_cli.proxy.upstream.Link.call>`):
by the wire itself, once it read the body up to the limit (the hook reads a 400's whole).

An answer is read up to the size the proxy relays (``limit``, plus :data:`ENVELOPE_BYTES` for
its JSON-RPC message and SSE framing): a body, or one event of the call's stream, that goes
past it raises :class:`~mcpbill_cli.proxy.plain.TooLarge` then, unread further, its connection
closed; an endless or enormous answer costs the proxy neither its memory nor the call's timeout.

A plain ``http://`` upstream reached directly is posted to on connections the wire keeps itself
(:mod:`mcpbill_cli.proxy.plain`: a fifth of httpx's CPU per call); any other, with the SDK's
client's own HTTP client."""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from weakref import finalize

import anyio
import httpx2
import mcp_types as types
from mcp.client import Client
from mcp.client.streamable_http import MCP_SESSION_ID
from mcp.shared.dispatcher import ProgressFnT
from mcp.shared.exceptions import MCPError
from mcp.shared.inbound import MCP_PROTOCOL_VERSION_HEADER
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import ValidationError

from mcpbill_cli.proxy.plain import (
    FAILURES,
    READ_SECONDS,
    Connections,
    Exchange,
    TooLarge,
    direct,
)

__all__ = ["TooLarge", "Wire", "wire_of"]

log = logging.getLogger("mcpbill.proxy")

DRAIN_SECONDS = 0.05  # how long the rest of a call's stream is read once it answered
CANCEL_SECONDS = 5.0  # how long telling the upstream of a cancelled call may take
# What an answer's bytes may hold beyond its result: the JSON-RPC message around it, SSE framing.
ENVELOPE_BYTES = 1024
# The extension that marks a call the wire posts with the HTTP client: the HTTP client's
# response hook leaves its answer to the wire, which tells ``heard`` itself.
POSTED = "mcpbill.posted"
ASKING = ("sampling_callback", "elicitation_callback", "list_roots_callback")
_IDS = itertools.count(1)
# Each client's wire, by the client's id while it lives (a Client is a dataclass: unhashable).
_WIRES: dict[int, Wire] = {}
Handler = Callable[[Any], Awaitable[None]]
# Told the status and body of the answer to a call posted on a session (the body only when the
# status is not 200): the upstream's response hook for the SDK's requests.
Heard = Callable[[int, bytes], None]


class Wire:
    """What posting a call on one HTTP connection's session takes: its HTTP client, the
    session's headers (once the SDK's client sent them), its notifications' handler, and the
    connections it keeps itself for a plain HTTP upstream (see the module docstring)."""

    def __init__(self, url: str, client_options: Mapping[str, Any],
                 heard: Heard | None = None) -> None:
        self.url = url
        self.http: httpx2.AsyncClient | None = None
        self.session: str | None = None
        self.headers: dict[str, str] | None = None
        self.heard = heard
        self.plain = Connections(url) if direct(url) else None
        self._head = b""
        self.handler: Handler | None = client_options.get("message_handler")
        self.asks = any(client_options.get(name) is not None for name in ASKING)

    def bind(self, client: Client) -> Client:
        """``client``, whose calls this wire may post (:func:`wire_of`)."""
        _WIRES[id(client)] = self
        finalize(client, _WIRES.pop, id(client), None)
        return client

    def noted(self, response: httpx2.Response) -> None:
        """Keep the session's id from the upstream's answer to the handshake (``initialize``):
        the SDK's client has read it before the handshake is over."""
        if self.session is None:
            self.session = response.headers.get(MCP_SESSION_ID)

    def ready(self, version: str | None) -> bool:
        """Whether calls can be posted on the session, of protocol ``version``: once its
        handshake is over, in the era that has one (2026-07-28 requests carry the client's
        identity in each call's ``_meta``: the SDK's client makes those). An upstream that
        gives no session id (a stateless one) is posted to without one."""
        if self.headers is None and version is not None \
                and version not in MODERN_PROTOCOL_VERSIONS:
            self.headers = {"accept": "application/json, text/event-stream",
                            "content-type": "application/json",
                            MCP_PROTOCOL_VERSION_HEADER: version}
            if self.session is not None:
                self.headers[MCP_SESSION_ID] = self.session
            if self.plain is not None:
                self._head = self.plain.head(self.headers)
        return self.headers is not None and self.http is not None and not self.asks

    async def call_tool(self, name: str, arguments: dict[str, Any],
                        meta: dict[str, Any] | None, progress: ProgressFnT | None,
                        limit: int) -> types.CallToolResult:
        """``tools/call`` of ``name`` on the session, its result read up to ``limit`` bytes
        (see the module docstring)."""
        request_id = f"mcpbill-{next(_IDS)}"
        params: dict[str, Any] = {"name": name, "arguments": arguments}
        if progress is not None:
            meta = {**(meta or {}), "progressToken": request_id}
        if meta:
            params["_meta"] = meta
        try:
            answer = await self._post({"jsonrpc": "2.0", "id": request_id,
                                       "method": "tools/call", "params": params},
                                      request_id, progress, limit + ENVELOPE_BYTES)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True), anyio.move_on_after(CANCEL_SECONDS):
                await self._tell({"jsonrpc": "2.0", "method": "notifications/cancelled",
                                  "params": {"requestId": request_id,
                                             "reason": "the proxy's call was cancelled"}})
            raise
        if "error" in answer:
            error = answer["error"]
            raise MCPError(error.get("code", types.INTERNAL_ERROR), error.get("message", ""),
                           error.get("data"))
        return types.CallToolResult.model_validate(answer.get("result"))

    def close(self) -> None:
        """Close the connections the wire keeps (its HTTP client is closed with the SDK's)."""
        if self.plain is not None:
            self.plain.close()

    async def _post(self, message: dict[str, Any], request_id: str,
                    progress: ProgressFnT | None, limit: int) -> dict[str, Any]:
        if self.plain is not None:
            return await self._post_plain(self.plain, json.dumps(message).encode(), request_id,
                                          progress, limit)
        assert self.http is not None and self.headers is not None  # noqa: S101 - see wire_of
        try:
            async with self.http.stream("POST", self.url, content=json.dumps(message),
                                        headers=self.headers, extensions={POSTED: True}
                                        ) as response:
                return await self._answered(
                    response.status_code, response.headers.get("content-type", ""),
                    lambda: _gathered(response, limit),
                    lambda: self._streamed(response, request_id, progress, limit))
        except (httpx2.TransportError, httpx2.StreamError) as error:
            raise MCPError(types.CONNECTION_CLOSED, f"the upstream's stream broke: {error}"
                           ) from error

    async def _answered(self, status: int, kind: str, whole: Callable[[], Awaitable[bytes]],
                        streamed: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        """The answer of ``status`` and content type ``kind``, its body read ``whole`` (up to
        the limit) or ``streamed`` as SSE; ``heard`` is told what it settles."""
        if status != 200:
            refused = await whole()
            self._heard(status, refused)
            return _refused(status, refused)
        self._heard(status, b"")
        if kind.startswith("application/json"):
            answer: dict[str, Any] = json.loads(await whole())
            return answer
        if kind.startswith("text/event-stream"):
            return await streamed()
        raise MCPError(types.INVALID_REQUEST, f"unexpected content type {kind!r}")

    async def _streamed(self, response: httpx2.Response, request_id: str,
                        progress: ProgressFnT | None, limit: int) -> dict[str, Any]:
        """The answer on the call's SSE stream, what comes before it taken as it comes; the
        stream is then read to its end (for DRAIN_SECONDS at most), so that its connection
        goes back to the pool."""
        answer: dict[str, Any] | None = None
        events = _Events(limit)
        with anyio.CancelScope() as rest:
            async for chunk in response.aiter_bytes():
                if answer is None:  # else the rest, read to keep the connection
                    answer = await self._answer_in(events.feed(chunk), request_id, progress)
                    if answer is not None:
                        rest.deadline = anyio.current_time() + DRAIN_SECONDS
            if answer is None:  # the stream ended: its last line with it
                answer = await self._answer_in(events.end(), request_id, progress)
        if answer is None:
            raise MCPError(types.CONNECTION_CLOSED, "the upstream's stream ended without an "
                                                    "answer")
        return answer

    async def _post_plain(self, plain: Connections, body: bytes, request_id: str,
                          progress: ProgressFnT | None, limit: int) -> dict[str, Any]:
        """:meth:`_post` on a connection the wire keeps; a failed connection is
        ``CONNECTION_CLOSED``, as httpx's transport errors are."""
        try:
            exchange = await plain.exchange()
        except (*FAILURES, TimeoutError) as error:
            raise _broke(error) from error
        try:
            return await self._exchanged(exchange, body, request_id, progress, limit)
        except FAILURES as error:
            raise _broke(error) from error
        finally:
            exchange.release()

    async def _exchanged(self, exchange: Exchange, body: bytes, request_id: str,
                         progress: ProgressFnT | None, limit: int) -> dict[str, Any]:
        with anyio.CancelScope() as waiting:
            exchange.timed(waiting)
            await exchange.request(self._head, body)
        if waiting.cancelled_caught:
            raise _silent()
        return await self._answered(exchange.status, exchange.headers.get("content-type", ""),
                                    lambda: _whole(exchange, limit),
                                    lambda: self._events(exchange, request_id, progress, limit))

    async def _events(self, exchange: Exchange, request_id: str,
                      progress: ProgressFnT | None, limit: int) -> dict[str, Any]:
        """:meth:`_streamed`, on a connection the wire keeps."""
        answer: dict[str, Any] | None = None
        events = _Events(limit)
        with anyio.CancelScope() as rest:
            exchange.timed(rest)
            while (chunk := await exchange.chunk()) is not None:
                if answer is None:  # else the rest, read to keep the connection
                    answer = await self._answer_in(events.feed(chunk), request_id, progress)
                    if answer is not None:
                        exchange.until = anyio.current_time() + DRAIN_SECONDS
            if answer is None:  # the stream ended: its last line with it
                answer = await self._answer_in(events.end(), request_id, progress)
        if answer is None:
            raise _silent() if rest.cancelled_caught else MCPError(
                types.CONNECTION_CLOSED, "the upstream's stream ended without an answer")
        return answer

    async def _answer_in(self, messages: list[dict[str, Any]], request_id: str,
                         progress: ProgressFnT | None) -> dict[str, Any] | None:
        """The call's answer among ``messages``, those before it taken as they come."""
        for message in messages:
            if message.get("id") == request_id and "method" not in message:
                return message
            await self._take(message, request_id, progress)
        return None

    def _heard(self, status: int, body: bytes) -> None:
        if self.heard is not None and self.session is not None:  # posted on its session
            self.heard(status, body)

    async def _take(self, message: dict[str, Any], request_id: str,
                    progress: ProgressFnT | None) -> None:
        """A message on the call's stream that is not its answer."""
        method, params = message.get("method"), message.get("params") or {}
        if method is None:
            return
        if "id" in message:  # a request: the session declared nothing to ask of it
            await self._tell(_reply(message["id"], method))
        elif method == "notifications/progress" and params.get("progressToken") == request_id:
            if progress is not None:
                await progress(params["progress"], params.get("total"), params.get("message"))
        elif self.handler is not None:
            try:
                notification = types.server_notification_adapter.validate_python(message)
            except ValidationError:
                log.warning("the upstream sent an invalid %s notification", method)
                return
            await self.handler(notification)

    async def _tell(self, message: dict[str, Any]) -> None:
        """Post a notification or a reply; its answer says nothing the call needs."""
        assert self.http is not None and self.headers is not None  # noqa: S101 - see wire_of
        try:
            await self.http.post(self.url, content=json.dumps(message), headers=self.headers)
        except httpx2.TransportError as error:
            log.debug("could not tell the upstream %s: %s", message.get("method"), error)


def wire_of(client: Client) -> Wire | None:
    """The wire ``client``'s calls can be posted on, if they can be (see the module
    docstring)."""
    wire = _WIRES.get(id(client))
    return wire if wire is not None and wire.ready(client.session.protocol_version) else None


def _refused(status: int, body: bytes) -> dict[str, Any]:
    """A JSON-RPC error for an answer that is not 200: the upstream's own, else as the SDK's
    client reads the status."""
    try:
        answer = json.loads(body)
        if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
            return answer
    except ValueError:
        pass
    if status == 404:
        return {"error": {"code": types.INVALID_REQUEST, "message": "Session terminated"}}
    if status == 202:
        return {"error": {"code": types.INVALID_REQUEST,
                          "message": "server answered a request with 202 Accepted"}}
    return {"error": {"code": types.INTERNAL_ERROR,
                      "message": "Server returned an error response"}}


def _message(data: str) -> dict[str, Any]:
    """An SSE event's JSON-RPC message; {} for anything else (the priming event of a stream
    that can be resumed has no data)."""
    try:
        message = json.loads(data)
    except ValueError:
        return {}
    return message if isinstance(message, dict) else {}


class _Events:
    """The JSON-RPC messages of an SSE stream's events, from its bytes as they come: a line ends
    with LF, CRLF or CR, an event at a blank line, its ``data:`` lines joined (as httpx's
    ``aiter_lines`` reads the lines). An event whose bytes so far (its data and the line being
    read) are over ``limit`` raises :class:`TooLarge`."""

    def __init__(self, limit: float = math.inf) -> None:
        self._limit = limit
        self._pending: list[bytes] = []  # the line being read, in the pieces it came in
        self._pending_size = 0
        self._data: list[str] = []
        self._size = 0  # bytes of the event's data lines so far

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        if b"\n" not in chunk and b"\r" not in chunk and not (
                self._pending and self._pending[-1].endswith(b"\r")):  # the line goes on:
            self._pending.append(chunk)  # its pieces are joined once it ends, not per piece
            self._pending_size += len(chunk)
            self._check([])
            return []
        lines = b"".join((*self._pending, chunk)).splitlines(keepends=True)
        # a last line without its LF may be a CRLF cut in two: it waits for the next chunk
        last = lines.pop() if lines and not lines[-1].endswith(b"\n") else b""
        self._pending, self._pending_size = ([last], len(last)) if last else ([], 0)
        messages = []
        for raw in lines:
            line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
            if line.startswith("data:"):
                self._data.append(line[5:].removeprefix(" "))
                self._size += len(raw)
            elif not line and self._data:
                messages.append(_message("\n".join(self._data)))
                self._data, self._size = [], 0
        self._check(messages)
        return messages

    def _check(self, messages: list[dict[str, Any]]) -> None:
        if not messages and self._size + self._pending_size > self._limit:  # else taken first
            raise TooLarge(self._size + self._pending_size)

    def end(self) -> list[dict[str, Any]]:
        """What the stream's last line, ended by the end of the stream, completes."""
        return self.feed(b"\n") if self._pending else []


async def _whole(exchange: Exchange, limit: int) -> bytes:
    """The rest of an answer's body, each read given READ_SECONDS; TooLarge past ``limit``."""
    with anyio.CancelScope() as reading:
        exchange.timed(reading)
        return await exchange.read(limit)
    raise _silent()


async def _gathered(response: httpx2.Response, limit: int) -> bytes:
    """The rest of ``response``'s body (httpx's ``aread``); TooLarge past ``limit``."""
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > limit:
            raise TooLarge(len(body))
    return bytes(body)


def _broke(error: BaseException) -> MCPError:
    return MCPError(types.CONNECTION_CLOSED, f"the upstream's stream broke: {error!r}")


def _silent() -> MCPError:
    return MCPError(types.CONNECTION_CLOSED, f"the upstream's stream broke: nothing read in "
                                             f"{READ_SECONDS:g} s")


def _reply(request_id: Any, method: str) -> dict[str, Any]:
    if method == "ping":
        return {"jsonrpc": "2.0", "id": request_id, "result": {}}
    return {"jsonrpc": "2.0", "id": request_id, "error": {
        "code": types.METHOD_NOT_FOUND, "message": f"{method} is not supported by this client"}}


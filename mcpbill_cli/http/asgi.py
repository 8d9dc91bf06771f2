"""ASGI plumbing of a billed request: its body read up front, its response held back.

A billed endpoint's response is buffered whole, so that nothing reaches the client before the
call is captured (or voided): a status line that left could not be taken back when a capture
or a settlement fails. Both buffers have a size limit.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from mcpbill_cli.errors import RequestTooLarge

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class ClientGone(Exception):
    """The client disconnected before its request body arrived: nobody to answer."""


@dataclass(frozen=True)
class BufferedRequest:
    """A billed request, its body read whole."""

    method: str
    path: str
    query: str
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    client: str
    scheme: str = "http"

    @property
    def url(self) -> str:
        """The URL the client asked for (the resource an x402 payment pays for)."""
        host = self.header("host") or "localhost"
        return f"{self.scheme}://{host}{self.path}" + (f"?{self.query}" if self.query else "")

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), ``None`` when absent or empty."""
        wanted = name.lower().encode("latin-1")
        for key, value in self.headers:
            if key.lower() == wanted:
                return value.decode("latin-1").strip() or None
        return None

    def arguments(self) -> dict[str, str]:
        """What identifies this request for the verifier's dedupe window and its idempotency
        key: the same method, path, query and body again, sent with the same credentials of
        the application's own (``Authorization``, ``Cookie``), is the same call.

        A replay does not run the endpoint, so its own authorization is not checked again: a
        request with other credentials is another call (a derived key) or a conflict (an
        ``Idempotency-Key``), never a replay of a response made for someone else."""
        credentials = hashlib.sha256()
        for key, value in self.headers:
            if key.lower() in (b"authorization", b"cookie"):
                credentials.update(key.lower() + b":" + value + b"\n")
        return {"method": self.method, "path": self.path, "query": self.query,
                "body": hashlib.sha256(self.body).hexdigest(),
                "credentials": credentials.hexdigest()}


async def read_request(scope: Scope, receive: Receive, limit: int) -> BufferedRequest:
    """Read the request body whole; REQUEST_TOO_LARGE past ``limit`` bytes, ClientGone when the
    client left first."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(f"the request body is larger than {limit} bytes, the most "
                                  "this billed route reads", limitBytes=limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    client = scope.get("client")
    return BufferedRequest(
        method=scope["method"], path=scope["path"],
        query=scope.get("query_string", b"").decode("latin-1"),
        headers=tuple((bytes(k), bytes(v)) for k, v in scope.get("headers", [])),
        body=b"".join(chunks), client=str(client[0]) if client else "",
        scheme=str(scope.get("scheme", "http")))


def route_path(scope: Scope) -> str:
    """The path the app routes on: ``scope["path"]`` less the ``root_path`` it starts with.

    Mounted under ``/v1`` (``Mount``, ``app.mount``) or served with a root path (``uvicorn
    --root-path``, ``FastAPI(root_path=...)``), a request's ``path`` carries that prefix and
    the framework routes on the rest, as Starlette's ``get_route_path`` does: billed routes are
    written as the app itself routes them."""
    path, root = str(scope["path"]), str(scope.get("root_path") or "")
    if not root or not path.startswith(root):
        return path
    rest = path[len(root):]
    return rest if not rest or rest.startswith("/") else path


def replaying(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the app the body read already, then waits for the client."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def buffered_scope(scope: Scope) -> Scope:
    """``scope`` without the response extensions a buffer cannot honour (pathsend, zero copy,
    early hints): the endpoint answers with plain body messages."""
    extensions = {name: value for name, value in (scope.get("extensions") or {}).items()
                  if not name.startswith("http.response.")}
    return {**scope, "extensions": extensions}


@dataclass
class BufferedResponse:
    """An endpoint's response, held back. ``status`` 0: the endpoint sent none."""

    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    too_large: bool = False
    complete: bool = False  # its last body message came (``more_body`` false)
    rest: asyncio.Task[None] | None = field(default=None, repr=False, compare=False)

    @property
    def succeeded(self) -> bool:
        """A whole 2xx response: the only kind that is billed. A stream the endpoint stopped
        before its end (its client went away) is not whole, and not kept for replays."""
        return 200 <= self.status < 300 and self.complete and not self.too_large

    async def finish(self) -> None:
        """What the endpoint runs after its response (a framework's background tasks), once
        the response is answered; their exception is raised here, as without billing."""
        if self.rest is not None:
            rest, self.rest = self.rest, None
            await rest

    def to_json(self) -> str:
        """The response as JSON text, kept by the verifier for replays."""
        return json.dumps({
            "status": self.status,
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in self.headers],
            "body": base64.b64encode(bytes(self.body)).decode()}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> BufferedResponse | None:
        """A response kept by :meth:`to_json`; ``None`` when ``text`` is not one."""
        try:
            kept = json.loads(text)
            return cls(int(kept["status"]),
                       [(k.encode("latin-1"), v.encode("latin-1")) for k, v in kept["headers"]],
                       bytearray(base64.b64decode(kept["body"], validate=True)))
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
            return None

    async def send_to(self, send: Send, extra: list[tuple[bytes, bytes]]) -> None:
        if self.status == 0:  # the endpoint answered nothing: the server says so (500)
            return
        await send({"type": "http.response.start", "status": self.status,
                    "headers": [*self.headers, *extra]})
        await send({"type": "http.response.body", "body": bytes(self.body),
                    "more_body": False})


async def run_buffered(app: ASGIApp, scope: Scope, receive: Receive,
                       limit: int) -> BufferedResponse:
    """Run ``app`` and keep what it answers; a body past ``limit`` bytes is dropped and the
    response marked :attr:`~BufferedResponse.too_large`.

    Returns once the response is whole, or the app is done: what the app goes on to run after
    its last body message (background tasks) is :attr:`~BufferedResponse.rest`, for the caller
    to await with :meth:`~BufferedResponse.finish` once it has answered, so the client is not
    kept waiting for it, nor is a call that succeeded voided when it fails."""
    response = BufferedResponse()
    whole = asyncio.Event()

    async def keep(message: Message) -> None:
        if message["type"] == "http.response.start":
            response.status = int(message["status"])
            response.headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", [])]
        elif message["type"] == "http.response.body" and not response.complete:
            if not response.too_large:
                response.body += message.get("body", b"")
                if len(response.body) > limit:
                    response.too_large = True
                    response.body = bytearray()
            if not message.get("more_body", False):
                response.complete = True
                whole.set()

    running = asyncio.ensure_future(app(buffered_scope(scope), receive, keep))
    answered = asyncio.ensure_future(whole.wait())
    try:
        await asyncio.wait((running, answered), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # cancelled: so is the endpoint
        running.cancel()
        raise
    finally:
        answered.cancel()
    if running.done():
        running.result()  # the endpoint's exception, if it raised
    else:
        response.rest = running
    return response

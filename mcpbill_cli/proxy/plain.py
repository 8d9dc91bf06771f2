"""POSTs on kept HTTP/1.1 connections, for the calls the proxy posts itself (:mod:`posted`).

httpx, with httpcore and h11 under it (all Python), spends about 0.7 ms of CPU on one posted
``tools/call`` and its SSE answer: measured here against the reference server, 0.72 ms per call
against 0.13 to 0.17 ms for the same exchange on asyncio's streams, its request in one write and
its framing read here. The proxy posts every paid call it forwards, so a plain ``http://``
upstream reached directly gets these; an ``https://`` one, or one behind an HTTP proxy named in
the environment, is posted to with httpx as before (:func:`direct`).

What httpx's pool does, this does: a connection is kept only when its response was read to its
end, framed (``Content-Length`` or chunked), HTTP/1.1 and not ``Connection: close``; an idle one
is reused for at most :data:`KEEP_IDLE_SECONDS` (httpx's keep-alive expiry), never once its
upstream closed it; a connection cut off (an error, a cancelled call) is closed.
"""

from __future__ import annotations

import asyncio
import math
import urllib.request
from collections.abc import Mapping
from urllib.parse import urlsplit

import anyio

__all__ = ["CONNECT_SECONDS", "FAILURES", "READ_SECONDS", "Broken", "Connections", "Exchange",
           "TooLarge", "direct"]

CONNECT_SECONDS = 30.0  # as the SDK's client: connecting, and each read of an answer
READ_SECONDS = 300.0
KEEP_IDLE_SECONDS = 5.0  # httpx's keep-alive expiry
CHUNK_BYTES = 64 * 1024


class Broken(Exception):  # noqa: N818 - the upstream's answer, as read
    """An answer that is not HTTP/1.1 as this module reads it."""


class TooLarge(Exception):  # noqa: N818 - the upstream's answer, as read
    """An answer (or one message of it) over the bytes its reader takes: ``size`` read so far.
    Nothing more of it is read, and its connection is not kept."""

    def __init__(self, size: int) -> None:
        super().__init__(f"over the limit after {size} bytes")
        self.size = size


# What reading or writing an exchange raises when its connection fails.
FAILURES = (OSError, EOFError, asyncio.LimitOverrunError, Broken)


def direct(url: str) -> bool:
    """Whether ``url`` is plain HTTP that httpx would reach without a proxy (none is named in
    the environment for it) and without credentials of its own (httpx sends a URL's user and
    password as Basic auth)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.username is not None or parts.password is not None:
        return False
    proxies = urllib.request.getproxies()
    return "http" not in proxies and "all" not in proxies


class Connections:
    """The kept connections to the origin of ``url``, where every request is POSTed."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "localhost"
        self.port = parts.port or 80
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._start = f"POST {target} HTTP/1.1\r\nhost: {parts.netloc}\r\n"
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
        self._closed = False

    def head(self, headers: Mapping[str, str]) -> bytes:
        """A request's head with ``headers``, up to its ``Content-Length`` (see
        :meth:`Exchange.request`)."""
        return (self._start + "".join(f"{name}: {value}\r\n" for name, value in headers.items())
                ).encode("latin-1")

    async def exchange(self) -> Exchange:
        """An exchange on an idle connection still open, else on a new one."""
        now = anyio.current_time()
        while self._idle:
            reader, writer, since = self._idle.pop()
            if now - since < KEEP_IDLE_SECONDS and not reader.at_eof() \
                    and reader.exception() is None and not writer.is_closing():
                return Exchange(self, reader, writer)
            writer.close()
        with anyio.fail_after(CONNECT_SECONDS):
            reader, writer = await asyncio.open_connection(self.host, self.port)
        return Exchange(self, reader, writer)

    def keep(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closed:
            writer.close()
        else:
            self._idle.append((reader, writer, anyio.current_time()))

    def close(self) -> None:
        """Close the idle connections, and each of the others once its exchange is done."""
        self._closed = True
        idle, self._idle = self._idle, []
        for _, writer, _ in idle:
            writer.close()


class Exchange:
    """One request and its answer on a connection of ``pool``; :meth:`release` when done.

    Each read is given :data:`READ_SECONDS` (or until :attr:`until`, if sooner) by the cancel
    scope named with :meth:`timed`: a read that takes longer cancels that scope."""

    def __init__(self, pool: Connections, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self._pool = pool
        self._reader = reader
        self._writer = writer
        self._scope: anyio.CancelScope | None = None
        self.until = math.inf
        self.status = 0
        self.headers: dict[str, str] = {}
        self._chunked = False
        self._left: int | None = None  # bytes of a Content-Length body still to read
        self._chunk_left = 0  # bytes of the current chunk of a chunked body still to read
        self._ended = False
        self._keep = False

    def timed(self, scope: anyio.CancelScope) -> None:
        self._scope = scope

    async def request(self, head: bytes, body: bytes) -> None:
        """Send the request (``head`` from :meth:`Connections.head`) in one write, and read
        its answer's status and headers."""
        self._writer.write(b"%scontent-length: %d\r\n\r\n%s" % (head, len(body), body))
        await self._writer.drain()
        while True:
            self._timing()
            block = await self._reader.readuntil(b"\r\n\r\n")
            version, status, lines = _head(block)
            if not 100 <= status < 200:
                break
        self.status = status
        self.headers = lines
        self._frame(version)

    async def chunk(self) -> bytes | None:
        """The answer's body, a piece at a time; None at its end."""
        if self._ended:
            return None
        self._timing()
        if self._chunked:
            return await self._next_chunk()
        if self._left is None:  # to the end of the connection
            data = await self._reader.read(CHUNK_BYTES)
            self._ended = not data
            return data or None
        if self._left == 0:
            self._ended = True
            return None
        data = await self._reader.read(min(self._left, CHUNK_BYTES))
        if not data:
            raise Broken("the connection closed before the end of the answer")
        self._left -= len(data)
        return data

    async def read(self, limit: float = math.inf) -> bytes:
        """The rest of the answer's body; :class:`TooLarge` once it is over ``limit`` bytes."""
        pieces, size = [], 0
        while (piece := await self.chunk()) is not None:
            pieces.append(piece)
            size += len(piece)
            if size > limit:
                raise TooLarge(size)
        return b"".join(pieces)

    def release(self) -> None:
        """Keep the connection for the next exchange if this one left it clean, else close it."""
        if self._ended and self._keep:
            self._pool.keep(self._reader, self._writer)
        else:
            self._writer.close()

    def _timing(self) -> None:
        if self._scope is not None:
            self._scope.deadline = min(self.until, anyio.current_time() + READ_SECONDS)

    def _frame(self, version: str) -> None:
        """How the body ends, and whether the connection can be kept after it."""
        connection = self.headers.get("connection", "").lower()
        self._keep = version == "HTTP/1.1" and "close" not in connection
        if self.status in (204, 304):
            self._left = 0
        elif "chunked" in self.headers.get("transfer-encoding", "").lower():
            self._chunked = True
        elif "content-length" in self.headers:
            try:
                self._left = int(self.headers["content-length"])
            except ValueError:
                raise Broken("a Content-Length that is not a number") from None
        else:
            self._keep = False

    async def _next_chunk(self) -> bytes | None:
        """The next piece of a chunked body, at most CHUNK_BYTES of its current chunk: a chunk
        that says it is huge is read as it comes, not gathered whole."""
        if self._chunk_left == 0:
            line = await self._reader.readuntil(b"\r\n")
            try:
                self._chunk_left = int(line.split(b";", 1)[0], 16)
            except ValueError:
                raise Broken("a chunk size that is not a number") from None
            if self._chunk_left < 0:
                raise Broken("a chunk size that is negative")
            if self._chunk_left == 0:
                while await self._reader.readuntil(b"\r\n") != b"\r\n":  # trailers, unread
                    pass
                self._ended = True
                return None
        if self._chunk_left > CHUNK_BYTES:
            self._chunk_left -= CHUNK_BYTES
            return await self._reader.readexactly(CHUNK_BYTES)
        data = await self._reader.readexactly(self._chunk_left + 2)  # its end in the same read
        self._chunk_left = 0
        if data[-2:] != b"\r\n":
            raise Broken("a chunk that does not end where its size says")
        return data[:-2]


def _head(block: bytes) -> tuple[str, int, dict[str, str]]:
    """An answer's HTTP version, status and headers (names in lower case)."""
    status_line, *lines = block[:-4].decode("latin-1").split("\r\n")
    version, _, rest = status_line.partition(" ")
    if not version.startswith("HTTP/1."):
        raise Broken(f"not an HTTP/1 answer: {status_line[:40]!r}")
    try:
        status = int(rest[:3])
    except ValueError:
        raise Broken(f"no status in {status_line[:40]!r}") from None
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return version, status, headers

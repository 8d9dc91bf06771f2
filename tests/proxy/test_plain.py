"""The HTTP/1.1 exchanges the proxy makes itself for the calls it posts to a plain HTTP upstream
(:mod:`mcpbill_cli.proxy.plain`), against a TCP server that answers with the bytes each test
gives it, and the SSE reading of those calls' streams (``_Events`` in
:mod:`mcpbill_cli.proxy.posted`). The whole calls are in ``test_posted.py``,
``test_connections.py`` and the other proxy tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import pytest

from mcpbill_cli.proxy import plain
from mcpbill_cli.proxy.plain import CHUNK_BYTES, Broken, Connections, TooLarge, direct
from mcpbill_cli.proxy.posted import _Events


@dataclass
class Scripted:
    """A TCP server: each request it reads (head and Content-Length body) is answered with the
    next of ``answers``; an answer that is a callable gets the connection's writer instead."""

    answers: list[bytes | Callable[[asyncio.StreamWriter], None]]
    requests: list[bytes] = field(default_factory=list)
    accepted: int = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            while self.answers:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                self.requests.append(head + await reader.readexactly(length))
                answer = self.answers.pop(0)
                if callable(answer):
                    answer(writer)
                else:
                    writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def scripted(*answers: bytes | Callable[[asyncio.StreamWriter], None]
                   ) -> AsyncIterator[tuple[Scripted, Connections]]:
    server = Scripted(list(answers))
    listening = await asyncio.start_server(server.serve, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    pool = Connections(f"http://127.0.0.1:{port}/mcp?x=1")
    try:
        yield server, pool
    finally:
        pool.close()
        listening.close()
        await listening.wait_closed()


async def post(pool: Connections, body: bytes = b'{"a": 1}') -> tuple[int, bytes]:
    exchange = await pool.exchange()
    try:
        await exchange.request(pool.head({"content-type": "application/json"}), body)
        return exchange.status, await exchange.read()
    finally:
        exchange.release()


def json_answer(body: bytes, *headers: str) -> bytes:
    return (f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}"
            "\r\n" + "".join(f"{header}\r\n" for header in headers) + "\r\n").encode() + body


def test_answers_framed_by_content_length_keep_their_connection() -> None:
    async def go() -> None:
        async with scripted(json_answer(b'{"one": 1}'), json_answer(b'{"two": 2}')) as (
                server, pool):
            assert await post(pool) == (200, b'{"one": 1}')
            assert await post(pool, b"[]") == (200, b'{"two": 2}')
            assert server.accepted == 1
            assert server.requests[0] == (
                b"POST /mcp?x=1 HTTP/1.1\r\nhost: 127.0.0.1:%d\r\ncontent-type: application/json"
                b'\r\ncontent-length: 8\r\n\r\n{"a": 1}' % pool.port)

    anyio.run(go)


def test_a_chunked_answer_after_an_interim_one_is_read_to_its_trailers_and_kept() -> None:
    chunked = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n"
               b"\r\n5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: 1\r\n\r\n")

    async def go() -> None:
        async with scripted(chunked, json_answer(b"{}")) as (server, pool):
            assert await post(pool) == (200, b"hello world")
            assert await post(pool) == (200, b"{}")
            assert server.accepted == 1

    anyio.run(go)


def test_an_answer_that_closes_its_connection_is_not_kept() -> None:
    unframed = b"HTTP/1.1 404 Not Found\r\ncontent-type: text/plain\r\n\r\nno such session"

    def closing(writer: asyncio.StreamWriter) -> None:
        writer.write(unframed)
        writer.close()

    async def go() -> None:
        async with scripted(json_answer(b"{}", "Connection: close"), closing,
                            json_answer(b"{}")) as (server, pool):
            assert await post(pool) == (200, b"{}")
            assert await post(pool) == (404, b"no such session")  # read to its close
            assert await post(pool) == (200, b"{}")
            assert server.accepted == 3

    anyio.run(go)


def test_a_connection_the_upstream_closed_or_idle_too_long_is_not_reused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def answer_and_close(writer: asyncio.StreamWriter) -> None:
        writer.write(json_answer(b"{}"))  # says nothing of closing, and closes
        writer.close()

    async def go() -> None:
        async with scripted(answer_and_close, json_answer(b"{}"), json_answer(b"{}"),
                            json_answer(b"{}")) as (server, pool):
            assert await post(pool) == (200, b"{}")
            await anyio.sleep(0.2)  # its close arrives
            assert await post(pool) == (200, b"{}")
            assert server.accepted == 2
            monkeypatch.setattr(plain, "KEEP_IDLE_SECONDS", 0.0)
            assert await post(pool) == (200, b"{}")
            assert server.accepted == 3

    anyio.run(go)


@pytest.mark.parametrize("answer", [
    b"SSH-2.0-OpenSSH\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n-2\r\nhi\r\n0\r\n\r\n",
])
def test_an_answer_that_is_not_http_1_1_as_framed_fails_the_exchange(answer: bytes) -> None:
    async def go() -> None:
        async with scripted(answer) as (_, pool):
            with pytest.raises(Broken):
                await post(pool)

    anyio.run(go)


@pytest.mark.parametrize("framing", [b"transfer-encoding: chunked\r\n\r\n40000000\r\n",
                                     b"content-length: 1073741824\r\n\r\n", b"\r\n"])
def test_a_huge_answer_is_read_as_it_comes_and_cut_at_the_limit(framing: bytes) -> None:
    """A chunk, a Content-Length or a connection's end that promises a GiB: the reader stops
    past the limit instead of gathering it (or waiting for all of it), and the connection is
    not kept."""

    def huge(writer: asyncio.StreamWriter) -> None:  # sends 512 KiB, then waits
        writer.write(b"HTTP/1.1 200 OK\r\n" + framing + b"x" * (512 * 1024))

    async def go() -> None:
        async with scripted(huge, json_answer(b"{}")) as (server, pool):
            exchange = await pool.exchange()
            try:
                await exchange.request(pool.head({}), b"{}")
                with anyio.fail_after(5), pytest.raises(TooLarge) as cut:
                    await exchange.read(100_000)
            finally:
                exchange.release()
            assert 100_000 < cut.value.size <= 100_000 + CHUNK_BYTES
            assert await post(pool) == (200, b"{}")
            assert server.accepted == 2

    anyio.run(go)


def test_an_sse_event_over_the_limit_is_cut_once_the_events_before_it_are_taken() -> None:
    events = _Events(limit=1000)
    fits = b'data: {"id": "a", "result": {"text": "%s"}}\n\n' % (b"y" * 900)
    assert events.feed(fits * 3) == [{"id": "a", "result": {"text": "y" * 900}}] * 3
    assert events.feed(b'data: {"id": "b"}\n\ndata: "' + b"x" * 2000) == [{"id": "b"}]
    with pytest.raises(TooLarge) as cut:
        events.feed(b"x")  # one line without end
    assert cut.value.size == 2008
    lines = _Events(limit=1000)
    with pytest.raises(TooLarge):
        for _ in range(100):
            lines.feed(b"data: " + b"z" * 40 + b"\n")  # one event of many lines, without end
    pieces = _Events(limit=1000)
    assert pieces.feed(b'data: {"id": "c"}\n\ndata: "') == [{"id": "c"}]
    fed = 7
    with pytest.raises(TooLarge) as cut:
        while True:  # one endless line, a piece at a time: cut once it is over the limit
            fed += 30
            pieces.feed(b"w" * 30)
    assert cut.value.size == fed == 1027


def test_sse_events_read_the_same_however_the_stream_is_cut() -> None:
    stream = (b": comment\r\n\r\nid: 1\r\ndata:\r\n\r\n"  # a priming event: no message
              b'data: {"jsonrpc": "2.0",\r\ndata: "method": "notifications/progress"}\r\n\r\n'
              b'event: message\ndata: {"id": "a", "result": {"text": "\xc3\xa9"}}\n\n'
              b'data: {"id": "b", "result": {}}\r\rdata: [1]\n\n')
    expected = [{}, {"jsonrpc": "2.0", "method": "notifications/progress"},
                {"id": "a", "result": {"text": "é"}}, {"id": "b", "result": {}}, {}]
    whole = _Events().feed(stream)
    assert whole == expected
    for size in (1, 2, 3, 7):
        events = _Events()
        cut = [message for start in range(0, len(stream), size)
               for message in events.feed(stream[start:start + size])]
        assert cut == expected, size
    crs = _Events()
    assert crs.feed(b'data: {"id": "d"}\r\r') == []  # the last CR may be half a CRLF ...
    assert crs.feed(b'data: {"id": "e"') == [{"id": "d"}]  # ... and is not: the event ends
    assert crs.feed(b"}\r\r") == []
    assert crs.end() == [{"id": "e"}]
    ended = _Events()
    assert ended.feed(b'data: {"id": "c"}\r\r') == []  # the last CR may be half a CRLF
    assert ended.end() == [{"id": "c"}]  # the stream's end says it is not
    assert _Events().end() == []


def test_only_a_plain_http_upstream_reached_directly_is_posted_to_on_kept_connections(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert direct("http://127.0.0.1:8080/mcp")
    assert not direct("https://example.com/mcp")
    assert not direct("http://user:secret@127.0.0.1:8080/mcp")  # httpx sends Basic auth
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    assert not direct("http://127.0.0.1:8080/mcp")

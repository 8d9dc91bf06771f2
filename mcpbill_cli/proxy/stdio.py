"""A stdio upstream's transport whose messages are kept up to a limit, and no further.

The SDK's :func:`~mcp.client.stdio.stdio_client` gathers a line of the child's stdout whole
before it parses it, however long: a child that writes one endless line grows the proxy's
memory until the call times out. This is that transport (the child started, stopped and its
process tree killed by the SDK's own helpers, as there), its stdout read as bytes and split
into lines of at most ``limit`` bytes.

A line over the limit is not kept: it is read on to its end and discarded (:class:`_Skipped`),
and the request it answers is answered :data:`OVERSIZED` as soon as it is known: at once when
the line's start names it (``{"jsonrpc": "2.0", "id": ...``, as the Python SDK writes), else
at the line's end when that names it (``..., "jsonrpc": "2.0", "id": ...}``, as a JavaScript
server's ``JSON.stringify`` of ``{result, jsonrpc, id}`` writes). The session then goes on, as
the upstream's state is worth keeping for one answer too large. A line that may never end is
not read forever, though: one still going after :data:`SKIP_FACTOR` times the limit ends the
read stream, so every request still in flight fails as when the child exits and the link
restarts the child (:mod:`mcpbill_cli.proxy.upstream`); waiting longer would keep the other
calls waiting on a child that may write forever, and burn the proxy's CPU meanwhile.
"""

from __future__ import annotations

import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TextIO

import anyio
import mcp_types as types
from anyio.abc import ByteReceiveStream
from anyio.streams.memory import MemoryObjectSendStream
from mcp.client.stdio import (
    StdioServerParameters,
    _create_platform_compatible_process,
    _drain_stdout,
    _get_executable_command,
    _stop_server_process,
    get_default_environment,
)
from mcp.shared.message import SessionMessage
from pydantic import ValidationError

__all__ = ["OVERSIZED", "bounded_stdio", "child_environment"]

# The JSON-RPC error code of the answer made for a request whose line was over the limit: the
# caller reads it as RESPONSE_TOO_LARGE (:meth:`~mcpbill_cli.proxy.upstream.Link.call`). One of
# the codes MCP leaves to implementations (-32019..-32000), not the spec's own: it never reaches
# the agent, but an upstream's answer would not carry it with another meaning from the spec.
OVERSIZED = -32019
# How far past the limit a line is read to its end (discarded) before the child is given up.
SKIP_FACTOR = 16
EDGE_BYTES = 512  # of a line's start and end kept, to find the request it answers
# An answer whose start names its request, and the start and the end of one whose end does.
_NAMED_FIRST = re.compile(rb'\s*\{\s*"jsonrpc"\s*:\s*"2\.0"\s*,\s*"id"\s*:\s*'
                          rb'("(?:[^"\\]|\\.){0,200}"|-?\d{1,20})\s*,\s*"(?:result|error)"')
_ANSWER_FIRST = re.compile(rb'\s*\{\s*"(?:result|error)"\s*:')
_NAMED_LAST = re.compile(rb'"id"\s*:\s*("(?:[^"\\]|\\.){0,200}"|-?\d{1,20})\s*\}\s*\Z')
WRITER_FLUSH_SECONDS = 0.5  # as the SDK's stdio_client

Received = SessionMessage | Exception


def child_environment(env: dict[str, str] | None) -> dict[str, str]:
    """The environment a stdio child runs in (and finds its program on ``PATH`` in): the
    SDK's safe defaults, then ``env``."""
    return get_default_environment() | (env or {})


@asynccontextmanager
async def bounded_stdio(server: StdioServerParameters, limit: int, errlog: TextIO = sys.stderr
                        ) -> AsyncIterator[tuple[Any, Any]]:
    """The SDK's stdio transport to the child ``server``, its lines read up to ``limit`` bytes
    (see the module docstring)."""
    command = await _get_executable_command(server.command)
    process = await _create_platform_compatible_process(
        command=command, args=server.args, env=child_environment(server.env),
        errlog=errlog, cwd=server.cwd)
    read_writer, read_stream = anyio.create_memory_object_stream[Received](0)
    write_stream, write_reader = anyio.create_memory_object_stream[SessionMessage](0)
    written = anyio.Event()

    async def reader() -> None:
        assert process.stdout is not None  # noqa: S101 - spawned with pipes
        async with read_writer:
            try:
                whole = await _read_lines(process.stdout, read_writer, limit)
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                whole = True  # the session is gone (or our side closed the pipe)
            except OSError:
                return  # the child's pipe broke: the session sees the stream end
        if whole:  # read on, so that a child flushing its output can exit; not one stuck
            await _drain_stdout(process)  # in an endless line: it is stopped, then killed

    async def writer() -> None:
        assert process.stdin is not None  # noqa: S101 - spawned with pipes
        try:
            async with write_reader:
                async for message in write_reader:
                    json = message.message.model_dump_json(by_alias=True, exclude_unset=True)
                    await process.stdin.send((json + "\n").encode(server.encoding,
                                                                 server.encoding_error_handler))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
            await read_writer.aclose()  # the session sees the end, not a request left hanging
        finally:
            written.set()

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(reader)
        tasks.start_soon(writer)
        try:
            yield read_stream, write_stream
        finally:
            with anyio.CancelScope(shield=True):  # every wait in it is bounded
                read_stream.close()
                write_stream.close()
                with anyio.move_on_after(WRITER_FLUSH_SECONDS):
                    await written.wait()
                await _stop_server_process(process)
                for stream in (read_stream, write_stream, read_writer, write_reader):
                    await stream.aclose()
            tasks.cancel_scope.cancel()


async def _read_lines(stdout: ByteReceiveStream, send: MemoryObjectSendStream[Received],
                      limit: int) -> bool:
    """Send each line of ``stdout``, parsed, until its end (True), or until a line over the
    limit runs on past SKIP_FACTOR times it (False: see the module docstring). A line is parsed
    from its bytes, as pydantic reads UTF-8 JSON, without first decoding it to text; the pieces
    of a line that spans reads are joined once, at its end."""
    pending: list[bytes] = []  # the line being read, its end not read yet
    size = 0
    skipped: _Skipped | None = None  # or the line being discarded
    async for chunk in stdout:
        *lines, tail = chunk.split(b"\n")
        for line in lines:
            if skipped is not None:
                skipped.feed(line)
                await skipped.ended(send)
                skipped = None
                continue
            if pending:
                line, pending, size = b"".join((*pending, line)), [], 0
            if len(line) <= limit:
                await send.send(_parsed(line))
            else:
                await _Skipped(line).ended(send)
        if skipped is not None:
            skipped.feed(tail)
            if skipped.size > SKIP_FACTOR * limit:
                return False
        elif tail:
            pending.append(tail)
            size += len(tail)
            if size > limit:
                skipped, pending, size = _Skipped(b"".join(pending)), [], 0
                await skipped.started(send)
    return True


class _Skipped:
    """A line over the limit, discarded as it is read: its size, and its start and end, where
    the request it answers may be named."""

    def __init__(self, start: bytes) -> None:
        self.head = start[:EDGE_BYTES]
        self.tail = start[-EDGE_BYTES:]
        self.size = len(start)
        self.answered = False

    def feed(self, piece: bytes) -> None:
        self.size += len(piece)
        self.tail = (self.tail + piece[-EDGE_BYTES:])[-EDGE_BYTES:]

    async def started(self, send: MemoryObjectSendStream[Received]) -> None:
        """Answer its request now if the line's start names it."""
        if (named := _NAMED_FIRST.match(self.head)) is not None:
            await self._answer(named[1], send)

    async def ended(self, send: MemoryObjectSendStream[Received]) -> None:
        """Answer its request, unless done, if the line's start or its end names it."""
        await self.started(send)
        if not self.answered and _ANSWER_FIRST.match(self.head) \
                and (named := _NAMED_LAST.search(self.tail)) is not None:
            await self._answer(named[1], send)

    async def _answer(self, name: bytes, send: MemoryObjectSendStream[Received]) -> None:
        if self.answered:
            return
        self.answered = True
        request_id: str | int = (name[1:-1].decode("utf-8", "replace")
                                 if name.startswith(b'"') else int(name))
        await send.send(SessionMessage(types.JSONRPCError(
            jsonrpc="2.0", id=request_id, error=types.ErrorData(
                code=OVERSIZED, message=f"the answer is over the limit after {self.size} bytes",
                data={"sizeBytes": self.size}))))


def _parsed(line: bytes) -> Received:
    try:
        return SessionMessage(types.jsonrpc_message_adapter.validate_json(line, by_name=False))
    except ValidationError as error:  # the session surfaces it, as the SDK's stdio_client does
        return error

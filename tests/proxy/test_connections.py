"""The proxy's connections to an HTTP upstream: calls reuse them.

The SDK's client closes a request's SSE stream as soon as its answer came, a moment before the
upstream ends it; a response closed before its end takes its connection with it, so every call
opened a TCP connection of its own (a connect and a close per call, on both sides). Counted here
by a relay between the proxy and the reference server that counts the connections it accepts.
"""

from __future__ import annotations

import itertools
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import anyio
from sqlalchemy import Engine

from mcpbill_cli.config import Settings
from mcpbill_cli.proxy import Limits, Proxy, Upstream, UpstreamTarget, build_app
from mcpbill_cli.verifier import Verifier
from tests.mcp.conftest import Mint, assert_ledger_sound, receipt_of, serve, token_view, usd

from .conftest import agent


class Counting:
    """A TCP relay on a port of its own to ``port``, counting the connections it accepted."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.accepted = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}/mcp"

    def close(self) -> None:
        self._listener.close()
        for sock in self._sockets:
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                agent_side, _ = self._listener.accept()
            except OSError:  # closed
                return
            self.accepted += 1
            server_side = socket.create_connection(("127.0.0.1", self.port))
            self._sockets += [agent_side, server_side]
            for source, sink in ((agent_side, server_side), (server_side, agent_side)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:  # either side closed
        pass


@contextmanager
def counted(url: str) -> Iterator[Counting]:
    relay = Counting(int(url.rsplit(":", 1)[1].split("/")[0]))
    try:
        yield relay
    finally:
        relay.close()


def test_paid_calls_to_an_http_upstream_reuse_its_connections(
        priced: Settings, verifier: Verifier, mint: Mint, engine: Engine,
        everything_http: str) -> None:
    token = mint()

    numbers = itertools.count()  # each call new: none is a replay

    async def calls(n: int) -> None:
        async with agent(url, token.token) as paying:
            for number in itertools.islice(numbers, n):
                result = await paying.call("echo", {"message": f"hello {number}"})
                assert receipt_of(result) is not None, result

    with counted(everything_http) as relay:
        upstream = Upstream(UpstreamTarget.parse(command=None, url=relay.url))
        with serve(build_app(Proxy(verifier, upstream, Limits()))) as url:
            anyio.run(calls, 2)
            opened = relay.accepted
            anyio.run(calls, 10)
            assert relay.accepted == opened, (opened, relay.accepted)
    assert token_view(engine, token).spent == 12 * usd("0.002")
    assert_ledger_sound(engine)

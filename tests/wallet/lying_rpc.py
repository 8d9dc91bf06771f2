"""A JSON-RPC proxy that lies: a real HTTP server in a thread in front of a real node (anvil),
forwarding every request and rewriting the answers of the methods a test chose.

A lie is a function ``(params, result, n) -> result`` where ``n`` counts the calls of that
method since the lie was told (1 for the first), so a test can answer honestly once and lie
after, or lie once and be honest after.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Lie = Callable[[list[Any], Any, int], Any]


class LyingRpc:
    """``url`` is the proxy; ``lie(method, rewrite)`` starts rewriting, ``honest()`` stops."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.lies: dict[str, Lie] = {}
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def lie(self, method: str, rewrite: Lie) -> None:
        with self._lock:
            self.lies[method] = rewrite
            self.calls[method] = 0

    def honest(self) -> None:
        with self._lock:
            self.lies.clear()

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        response: dict[str, Any] = self._forward(request)
        method = request.get("method", "")
        with self._lock:
            rewrite = self.lies.get(method)
            self.calls[method] += 1
            n = self.calls[method]
        if rewrite is not None and "result" in response:
            response["result"] = rewrite(request.get("params") or [], response["result"], n)
        return response

    def _forward(self, request: dict[str, Any]) -> Any:
        body = json.dumps(request).encode()
        sent = urllib.request.Request(self.upstream, data=body,  # noqa: S310 - local anvil
                                      headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(sent, timeout=10) as reply:  # noqa: S310
            return json.loads(reply.read())

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if isinstance(request, list):
                    answer: Any = [proxy.answer(item) for item in request]
                else:
                    answer = proxy.answer(request)
                body = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return

        return Handler

    @contextmanager
    def running(self) -> Iterator[LyingRpc]:
        self._thread.start()
        try:
            yield self
        finally:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)


# --- lies ---------------------------------------------------------------------------------------


def head_ahead(blocks: int, *, times: int | None = None) -> Lie:
    """``eth_blockNumber`` reports ``blocks`` more than the node has (the first ``times``
    calls only, when given: then the head goes back)."""
    def rewrite(params: list[Any], result: Any, n: int) -> Any:
        if times is not None and n > times:
            return result
        return hex(int(result, 16) + blocks)
    return rewrite


def vanished(params: list[Any], result: Any, n: int) -> Any:
    """The transaction's block is gone: no receipt."""
    return None


def other_block_hash(params: list[Any], result: Any, n: int) -> Any:
    """``eth_getBlockByNumber`` answers another block at that height (a reorg replaced it)."""
    if result is None:
        return None
    return {**result, "hash": "0x" + "ab" * 32}


def changed_receipt(field: str, *, after: int = 1) -> Lie:
    """Reads after the ``after``-th of a receipt change ``field``: the block number, its logs'
    log index, or the amount of its transfer."""
    def rewrite(params: list[Any], result: Any, n: int) -> Any:
        if result is None or n <= after:
            return result
        return _changed(result, field)
    return rewrite


def _changed(receipt: dict[str, Any], field: str) -> dict[str, Any]:
    if field == "blockNumber":
        return {**receipt, "blockNumber": hex(int(receipt["blockNumber"], 16) + 1)}
    logs = []
    for log in receipt["logs"]:
        if field == "logIndex":
            log = {**log, "logIndex": hex(int(log["logIndex"], 16) + 1)}
        elif field == "amount":
            log = {**log, "data": "0x" + (int(log["data"], 16) * 2).to_bytes(32, "big").hex()}
        logs.append(log)
    return {**receipt, "logs": logs}

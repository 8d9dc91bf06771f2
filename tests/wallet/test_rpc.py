"""The RPC layer against real HTTP servers: retries with backoff, clear refusals, no leaked keys."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from mcpbill_cli.wallet.errors import RpcUnavailable
from mcpbill_cli.wallet.rpc import RetryPolicy, Rpc, connect, redact_rpc_url

from .devnet import free_port

FAST = RetryPolicy(attempts=4, backoff=0.01, max_backoff=0.02)


class FlakyNode(BaseHTTPRequestHandler):
    """Plays ``script`` (an HTTP status or a JSON-RPC error per request), then answers 0x7a69."""

    script: list[int | dict[str, Any]] = []  # per request: an HTTP status or a JSON-RPC error
    seen: list[str] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append(self.path)
        step = self.script.pop(0) if self.script else None
        if isinstance(step, int):
            self.send_response(step)
            self.end_headers()
            return
        body = {"jsonrpc": "2.0", "id": request["id"]}
        body |= {"error": step} if isinstance(step, dict) else {"result": "0x7a69"}
        payload = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def node() -> Iterator[str]:
    FlakyNode.script, FlakyNode.seen = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FlakyNode)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02},
                              daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def rpc_for(url: str, sleeps: list[float] | None = None) -> Rpc:
    return Rpc(connect(url, timeout=2), retry=FAST,
               sleep=(sleeps.append if sleeps is not None else lambda _: None))


@pytest.mark.parametrize(("url", "shown"), [
    ("http://127.0.0.1:8545", "http://127.0.0.1:8545"),
    ("https://base-mainnet.g.alchemy.com/v2/SECRETKEY", "https://base-mainnet.g.alchemy.com/***"),
    ("https://user:pass@rpc.example.com/", "https://***@rpc.example.com"),
    ("https://rpc.example.com?apikey=SECRET", "https://rpc.example.com/***"),
    ("not a url", "<rpc url>"),
])
def test_rpc_urls_are_shown_without_their_keys(url: str, shown: str) -> None:
    assert redact_rpc_url(url) == shown


def test_rate_limits_and_server_errors_are_retried_with_backoff(node: str) -> None:
    FlakyNode.script = [429, 503, {"code": -32005, "message": "rate limit exceeded"}]
    sleeps: list[float] = []

    assert rpc_for(node, sleeps).chain_id() == 31337
    assert sleeps == [0.01, 0.02, 0.02]  # doubling, capped
    assert len(FlakyNode.seen) == 4


def test_a_node_that_keeps_failing_is_unavailable_after_bounded_retries(node: str) -> None:
    FlakyNode.script = [502] * 10
    with pytest.raises(RpcUnavailable) as failed:
        rpc_for(node + "/v2/SECRETKEY").chain_id()
    assert failed.value.details["attempts"] == FAST.attempts
    assert failed.value.details["reason"] == "HTTP 502"
    assert "SECRETKEY" not in str(failed.value.to_dict())
    assert len(FlakyNode.seen) == FAST.attempts


def test_an_http_error_that_retrying_cannot_fix_is_not_retried(node: str) -> None:
    FlakyNode.script = [401]
    with pytest.raises(RpcUnavailable, match="HTTP 401") as failed:
        rpc_for(node + "/v2/BADKEY").chain_id()
    assert "BADKEY" not in failed.value.message
    assert len(FlakyNode.seen) == 1


def test_an_unreachable_node_is_unavailable() -> None:
    sleeps: list[float] = []
    url = f"http://127.0.0.1:{free_port()}/key/SECRET"
    with pytest.raises(RpcUnavailable, match="connection failed") as failed:
        rpc_for(url, sleeps).block_number()
    assert failed.value.details["url"] == redact_rpc_url(url)
    assert "SECRET" not in failed.value.message
    assert len(sleeps) == FAST.attempts - 1

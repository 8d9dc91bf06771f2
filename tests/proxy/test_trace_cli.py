"""`mcpbill proxy --trace` as an operator runs it: spans exported as the standard OTEL_*
variables say (the default OTLP over HTTP, to a receiver in the test; the SDK's console
exporter, on the proxy's stdout), joined to the trace the agent sent in
``_meta["traceparent"]``."""

from __future__ import annotations

import gzip
import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from sqlalchemy import Engine
from typer.testing import CliRunner

from mcpbill_cli.cli import app
from mcpbill_cli.config import ENV_DB_URL, ENV_HOME, ENV_MODE, Settings
from tests.mcp.conftest import Mint, receipt_of, token_view, usd
from tests.mcp.test_http import free_port, wait_for_port

from .conftest import EVERYTHING, NODE, agent
from .test_tracing import CLIENT_SPAN, TRACE_ID, TRACEPARENT


def exported_spans(text: str) -> list[dict[str, Any]]:
    """The spans the console exporter printed: JSON objects, one after another."""
    decoder = json.JSONDecoder()
    spans, at = [], text.find("{")
    while at != -1:
        span, end = decoder.raw_decode(text, at)
        spans.append(span)
        at = text.find("{", end)
    return spans


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # tracing is what is new
def test_trace_exports_spans_that_join_the_agents_trace(priced: Settings, mint: Mint,
                                                        engine: Engine, tmp_path: Path) -> None:
    token = mint()
    port = free_port()
    env = {ENV_HOME: str(priced.home), ENV_DB_URL: priced.db_url, ENV_MODE: "demo",
           "PATH": "/usr/bin:/bin", "OTEL_TRACES_EXPORTER": "console"}
    with (tmp_path / "proxy.log").open("w") as log, (tmp_path / "spans.json").open("w") as out:
        proxy = subprocess.Popen(
            [sys.executable, "-m", "mcpbill_cli", "proxy", "--listen", f"127.0.0.1:{port}",
             "--upstream-cmd", f"{NODE} {EVERYTHING} stdio", "--trace"],
            env=env, stdout=out, stderr=log)
        try:
            wait_for_port(port, proxy)
            anyio.run(call_traced, f"http://127.0.0.1:{port}/mcp", token.token)
            proxy.send_signal(signal.SIGTERM)
            assert proxy.wait(30) == 0, (tmp_path / "proxy.log").read_text()
        finally:
            proxy.kill()
            proxy.wait(30)
    assert token_view(engine, token).spent == usd("0.002")
    spans = exported_spans((tmp_path / "spans.json").read_text())
    [call] = [span for span in spans if span["name"] == "mcpbill.call"]
    assert call["context"]["trace_id"] == f"0x{TRACE_ID}"
    assert call["attributes"] == {"mcpbill.tool": "echo", "mcpbill.outcome": "captured",
                                  "mcpbill.amount": usd("0.002")}
    assert call["resource"]["attributes"]["service.name"] == "mcpbill-proxy"
    by_id = {span["context"]["span_id"]: span for span in spans}
    parent = by_id[call["parent_id"]]  # the SDK's server span, the child of the agent's
    assert parent["context"]["trace_id"] == f"0x{TRACE_ID}"
    assert parent["parent_id"] == f"0x{CLIENT_SPAN}"
    steps = {span["name"] for span in spans if span["parent_id"] == call["context"]["span_id"]}
    # The hold, the forward to the upstream (the SDK client's span) and the capture.
    assert {"mcpbill.hold", "MCP send tools/call echo", "mcpbill.capture"} <= steps


@contextmanager
def otlp_receiver() -> Iterator[tuple[str, list[tuple[str, str, ExportTraceServiceRequest]]]]:
    """An OTLP/HTTP trace receiver on a free port: its base URL (what
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` takes) and every export it was sent, as (path, content
    type, the decoded request)."""
    exports: list[tuple[str, str, ExportTraceServiceRequest]] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            exports.append((self.path, self.headers.get("Content-Type", ""),
                            ExportTraceServiceRequest.FromString(body)))
            reply = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - its signature
            pass  # the test's output stays quiet

    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", exports
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def attributes(pairs: Iterable[KeyValue]) -> dict[str, Any]:
    """OTLP attributes as a plain mapping (each value as the type it was sent with)."""
    return {pair.key: getattr(pair.value, pair.value.WhichOneof("value")) for pair in pairs}


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # tracing is what is new
def test_trace_exports_over_otlp_http_by_default(priced: Settings, mint: Mint, engine: Engine,
                                                 tmp_path: Path) -> None:
    """No ``OTEL_TRACES_EXPORTER``: the spans go to ``OTEL_EXPORTER_OTLP_ENDPOINT`` as OTLP
    protobuf over HTTP, the call's span in the agent's trace."""
    token = mint()
    port = free_port()
    with otlp_receiver() as (endpoint, exports), (tmp_path / "proxy.log").open("w") as log:
        env = {ENV_HOME: str(priced.home), ENV_DB_URL: priced.db_url, ENV_MODE: "demo",
               "PATH": "/usr/bin:/bin", "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}
        proxy = subprocess.Popen(
            [sys.executable, "-m", "mcpbill_cli", "proxy", "--listen", f"127.0.0.1:{port}",
             "--upstream-cmd", f"{NODE} {EVERYTHING} stdio", "--trace"],
            env=env, stdout=subprocess.DEVNULL, stderr=log)
        try:
            wait_for_port(port, proxy)
            anyio.run(call_traced, f"http://127.0.0.1:{port}/mcp", token.token)
            proxy.send_signal(signal.SIGTERM)  # the batch is exported as the proxy stops
            assert proxy.wait(30) == 0, (tmp_path / "proxy.log").read_text()
        finally:
            proxy.kill()
            proxy.wait(30)
    assert token_view(engine, token).spent == usd("0.002")
    assert exports and {(path, kind) for path, kind, _ in exports} == {
        ("/v1/traces", "application/x-protobuf")}
    sent: list[tuple[dict[str, Any], Span]] = [
        (attributes(resource.resource.attributes), span) for _, _, request in exports
        for resource in request.resource_spans for scope in resource.scope_spans
        for span in scope.spans]
    [(resource, call)] = [(resource, span) for resource, span in sent
                          if span.name == "mcpbill.call"]
    assert call.trace_id.hex() == TRACE_ID
    assert attributes(call.attributes) == {"mcpbill.tool": "echo", "mcpbill.outcome": "captured",
                                           "mcpbill.amount": usd("0.002")}
    assert resource["service.name"] == "mcpbill-proxy"
    by_id = {span.span_id: span for _, span in sent}
    parent = by_id[call.parent_span_id]  # the SDK's server span, the child of the agent's
    assert parent.trace_id.hex() == TRACE_ID and parent.parent_span_id.hex() == CLIENT_SPAN
    steps = {span.name for _, span in sent if span.parent_span_id == call.span_id}
    assert {"mcpbill.hold", "mcpbill.capture"} <= steps


async def call_traced(url: str, token: str) -> None:
    async with agent(url, token) as client:
        assert receipt_of(await client.call("echo", {"message": "traced"},
                                            meta={"traceparent": TRACEPARENT}))


def test_an_exporter_nobody_installed_is_refused_with_a_code(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin_json")
    result = CliRunner().invoke(app, ["proxy", "--json", "--trace", "--upstream-cmd",
                                      "node x.js", "--listen", f"127.0.0.1:{free_port()}"])
    assert result.exit_code == 10, result.output
    [error] = json.loads(result.stdout)["errors"]
    assert (error["code"], error["field"]) == ("CONFIG_INVALID", "OTEL_TRACES_EXPORTER")
    assert "zipkin_json" in error["message"]

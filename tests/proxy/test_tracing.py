"""The proxy's OpenTelemetry spans (``Proxy(..., tracing=True)``): one ``mcpbill.call`` per
``tools/call``, joined to the agent's ``_meta["traceparent"]``, recorded in memory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from mcp.server._otel import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from mcpbill_cli.config import Settings
from mcpbill_cli.proxy import Limits, Proxy, Upstream, build_app
from mcpbill_cli.tracing import Tracing
from mcpbill_cli.verifier import Verifier
from tests.mcp.conftest import Mint, receipt_of, refusal_of, serve

from .conftest import agent, stdio_target

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def traced(priced: Settings, verifier: Verifier, exporter: InMemorySpanExporter,
           tmp_path: Path) -> Iterator[str]:
    """A traced proxy in front of the reference server: its MCP URL."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    verifier.enable_tracing(Tracing(tracer_provider=provider))
    with (tmp_path / "upstream.log").open("w") as errlog:
        upstream = Upstream(stdio_target(tmp_path / "upstream.pid"), errlog=errlog)
        with serve(build_app(Proxy(verifier, upstream, Limits(call_timeout=30)))) as url:
            yield url
    provider.shutdown()


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name == name]


def test_proxied_calls_join_the_agents_trace(traced: str, mint: Mint,
                                             exporter: InMemorySpanExporter) -> None:
    token = mint()

    async def run() -> None:
        async with agent(traced, token.token) as client:
            assert receipt_of(await client.call("echo", {"message": "hi"},
                                                meta={"traceparent": TRACEPARENT}))
            assert not (await client.call("get-sum", {"a": 1, "b": 2})).is_error
        async with agent(traced, None) as client:
            refused = refusal_of(await client.call("echo", {"message": "no token"},
                                                   meta={"traceparent": TRACEPARENT}))
            assert refused["code"] == "INVALID_CREDIT_TOKEN"

    anyio.run(run)
    paid, free, refused = named(exporter, "mcpbill.call")
    for span in (paid, refused):
        assert f"{span.context.trace_id:032x}" == TRACE_ID
        assert span.parent is not None and f"{span.parent.span_id:016x}" == CLIENT_SPAN
    assert paid.attributes is not None and dict(paid.attributes) == {
        "mcpbill.tool": "echo", "mcpbill.outcome": "captured", "mcpbill.amount": 2000}
    assert free.attributes is not None and free.attributes["mcpbill.outcome"] == "free"
    assert free.parent is None
    assert refused.attributes is not None
    assert refused.attributes["mcpbill.code"] == "INVALID_CREDIT_TOKEN"
    assert refused.status.status_code is StatusCode.ERROR
    [hold] = named(exporter, "mcpbill.hold")
    [capture] = named(exporter, "mcpbill.capture")
    for step in (hold, capture):
        assert step.parent is not None and step.parent.span_id == paid.context.span_id


def test_only_a_traced_proxy_makes_the_sdks_span_per_message(verifier: Verifier,
                                                              tmp_path: Path) -> None:
    """Untraced, the SDK's server span (started for every request, recorded by nothing) is
    left out; traced, it is kept: it joins each ``mcpbill.call`` to the agent's trace."""
    def sdk_spans(proxy: Proxy) -> bool:
        return any(isinstance(layer, OpenTelemetryMiddleware) for layer in proxy.server.middleware)

    upstream = Upstream(stdio_target(tmp_path / "upstream.pid"))
    assert not sdk_spans(Proxy(verifier, upstream))
    verifier.enable_tracing(Tracing(tracer_provider=TracerProvider()))
    assert sdk_spans(Proxy(verifier, upstream))

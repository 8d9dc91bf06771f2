"""OpenTelemetry spans of billed MCP calls (``Billing(..., tracing=True)``): one ``mcpbill.call``
span per call, joined to the trace the agent sent in ``_meta["traceparent"]``, with hold and
capture children; recorded by the SDK's in-memory exporter."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from mcp.client import Client
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from mcpbill_cli.mcp import TOKEN_META, Billing
from mcpbill_cli.tracing import Tracing
from mcpbill_cli.verifier import Verifier

from .conftest import ROOT, Mint, load_example, receipt_of, refusal_of

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def traced(verifier: Verifier, exporter: InMemorySpanExporter) -> Iterator[Billing]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    verifier.enable_tracing(Tracing(tracer_provider=provider))
    yield Billing(verifier)
    provider.shutdown()


def call(billing: Billing, tool: str, args: dict[str, Any], meta: dict[str, Any]) -> Any:
    async def run() -> Any:
        async with Client(load_example().build_server(billing)) as client:
            return await client.call_tool(tool, args, meta=meta)  # type: ignore[arg-type]

    return anyio.run(run)


def spans(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name == name]


def test_a_paid_call_joins_the_agents_trace(traced: Billing, mint: Mint,
                                            exporter: InMemorySpanExporter) -> None:
    token = mint()
    result = call(traced, "search", {"q": "usdc"},
                  {TOKEN_META: token.token, "traceparent": TRACEPARENT})
    receipt = receipt_of(result)

    [billed] = spans(exporter, "mcpbill.call")
    assert f"{billed.context.trace_id:032x}" == TRACE_ID
    assert billed.parent is not None and f"{billed.parent.span_id:016x}" == CLIENT_SPAN
    assert billed.attributes is not None
    assert dict(billed.attributes) == {"mcpbill.tool": "search", "mcpbill.outcome": "captured",
                                       "mcpbill.amount": int(receipt["amount"])}
    assert billed.status.status_code is StatusCode.UNSET
    for step in ("mcpbill.hold", "mcpbill.capture"):
        [child] = spans(exporter, step)
        assert child.parent is not None and child.parent.span_id == billed.context.span_id
        assert child.context.trace_id == billed.context.trace_id


def test_a_refusal_sets_the_span_status_to_error_with_its_code(
        traced: Billing, mint: Mint, exporter: InMemorySpanExporter) -> None:
    token = mint(scope=["status"])
    refused = refusal_of(call(traced, "search", {"q": "usdc"},
                              {TOKEN_META: token.token, "traceparent": TRACEPARENT}))

    [billed] = spans(exporter, "mcpbill.call")
    assert f"{billed.context.trace_id:032x}" == TRACE_ID
    assert billed.attributes is not None
    assert billed.attributes["mcpbill.outcome"] == "refused"
    assert billed.attributes["mcpbill.code"] == refused["code"] == "SCOPE_DENIED"
    assert billed.status.status_code is StatusCode.ERROR
    assert billed.status.description == "SCOPE_DENIED"


def test_a_failed_tool_is_voided_in_its_span(traced: Billing, mint: Mint,
                                             exporter: InMemorySpanExporter) -> None:
    result = call(traced, "search", {"q": ""}, {TOKEN_META: mint().token})
    assert result.is_error

    [billed] = spans(exporter, "mcpbill.call")
    assert billed.parent is None  # no trace sent: a trace of its own
    assert billed.attributes is not None and billed.attributes["mcpbill.outcome"] == "voided"
    [void] = spans(exporter, "mcpbill.void")
    assert void.parent is not None and void.parent.span_id == billed.context.span_id
    assert not spans(exporter, "mcpbill.capture")


def test_tracing_is_off_by_default(verifier: Verifier, mint: Mint) -> None:
    assert Billing(verifier).verifier.tracing is None
    assert receipt_of(call(Billing(verifier), "search", {"q": "x"}, {TOKEN_META: mint().token}))


# With a global tracer provider, the client's own span and the mcp SDK's server middleware
# (on by default in mcp 2.x) carry the trace: mcpbill.call nests under the SDK's server span.
SDK_PROBE = """
import json, sys, anyio
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
sys.path.insert(0, {root!r})
from mcp.client import Client
from mcpbill_cli.mcp import TOKEN_META, Billing
from mcpbill_cli.verifier import Verifier
from tests.mcp.conftest import load_example
from mcpbill_cli.config import load_settings
billing = Billing(Verifier.from_settings(load_settings(db_url={db!r}, mode="demo")),
                  tracing=True)
async def run():
    with trace.get_tracer("agent").start_as_current_span("agent.step"):
        async with Client(load_example().build_server(billing)) as client:
            await client.call_tool("search", {{"q": "usdc"}}, meta={{TOKEN_META: {token!r}}})
anyio.run(run)
print(json.dumps([[s.name, f"{{s.context.trace_id:032x}}", f"{{s.context.span_id:016x}}",
                   s.parent and f"{{s.parent.span_id:016x}}"]
                  for s in exporter.get_finished_spans()]))
"""


def test_the_sdk_middleware_span_is_the_parent_under_a_global_provider(
        home: Any, mint: Mint, db_url: str) -> None:
    probe = SDK_PROBE.format(root=str(ROOT), db=db_url, token=mint().token)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    found = {name: (trace_id, span_id, parent)
             for name, trace_id, span_id, parent in json.loads(out.stdout)}
    agent = found["agent.step"]
    billed = found["mcpbill.call"]
    server = found["tools/call search"]
    assert {agent[0], billed[0], server[0]} == {agent[0]}  # one trace
    assert billed[2] == server[1]  # mcpbill.call under the SDK's server span
    assert found["mcpbill.hold"][2] == billed[1]

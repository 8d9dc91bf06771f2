"""The middleware's Prometheus metrics and OpenTelemetry spans, over real HTTP: scraped after a
run and checked against the ledger; spans joined to the client's W3C ``traceparent`` header."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine

from mcpbill_cli import metrics as prometheus
from mcpbill_cli.http import IDEMPOTENCY_KEY_HEADER, TOKEN_HEADER
from mcpbill_cli.ledger.credit import IssuedToken
from mcpbill_cli.tracing import Tracing
from mcpbill_cli.verifier import Verifier
from tests.mcp.test_http import free_port
from tests.verifier.billing_support import PRICE

from .conftest import MAX_REQUEST, assert_ledger_sound, view

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def observed(verifier: Verifier) -> Iterator[tuple[str, InMemorySpanExporter]]:
    """The verifier's metrics served over HTTP (their URL) and its spans, kept in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    verifier.enable_tracing(Tracing(tracer_provider=provider))
    port = free_port()
    scraper = prometheus.serve(verifier.enable_metrics(), "127.0.0.1", port)
    try:
        yield f"http://127.0.0.1:{port}/metrics", exporter
    finally:
        prometheus.stop(scraper)
        provider.shutdown()


def scrape(url: str) -> Samples:
    text = httpx.get(url, timeout=10).text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_metrics_and_spans_of_billed_requests_match_the_ledger(
        observed: tuple[str, InMemorySpanExporter], client: httpx.Client, engine: Engine,
        new_token: Callable[..., IssuedToken]) -> None:
    metrics_url, exporter = observed
    token = new_token()
    paid = {TOKEN_HEADER: token.token}
    traced = {**paid, "traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01"}
    assert client.get("/report", headers=traced).status_code == 200
    keyed = {**paid, IDEMPOTENCY_KEY_HEADER: "search-1"}
    for _ in range(2):  # captured, then replayed
        assert client.post("/search", json={"q": "mcp"}, headers=keyed).status_code == 200
    assert client.get("/broken", headers=paid).status_code == 500  # voided
    assert client.get("/big", headers=paid).json()["code"] == "RESPONSE_TOO_LARGE"  # voided
    assert client.get("/report", headers=traced | {TOKEN_HEADER: ""}).status_code == 401
    too_big = client.post("/search", content=b"x" * (MAX_REQUEST + 1), headers=paid)
    assert too_big.json()["code"] == "REQUEST_TOO_LARGE"
    assert client.get("/status").status_code == 200  # free, no token
    assert client.get("/status", headers=paid).status_code == 200  # free, token checked

    got = scrape(metrics_url)

    def calls(outcome: str, tool: str = "search") -> float:
        return got.get(("mcpbill_calls_total", (("outcome", outcome), ("tool", tool))), 0)

    def refusals(code: str) -> float:
        return got.get(("mcpbill_refusals_total", (("code", code), ("tool", "search"))), 0)

    spent = view(engine, token).spent
    assert spent == 2 * PRICE
    assert got[("mcpbill_charged_micro_usdc_total", (("tool", "search"),))] == spent
    assert (calls("captured"), calls("replayed"), calls("voided"), calls("refused")) == (
        2, 1, 2, 2)
    assert calls("free", "status") == 2
    assert [refusals(code) for code in ("INVALID_CREDIT_TOKEN", "REQUEST_TOO_LARGE",
                                        "RESPONSE_TOO_LARGE")] == [1, 1, 1]
    assert got[("mcpbill_hold_to_capture_seconds_count", (("tool", "search"),))] == 2
    assert got[("mcpbill_holds_open", ())] == 0
    assert_ledger_sound(engine)

    spans = [span for span in exporter.get_finished_spans() if span.name == "mcpbill.call"]
    outcomes = [(span.attributes or {}).get("mcpbill.outcome") for span in spans]
    assert outcomes == ["captured", "captured", "replayed", "voided", "voided", "refused",
                        "refused", "free", "free"]
    first, refused = spans[0], spans[5]
    for span in (first, refused):  # both sent the client's traceparent header
        assert f"{span.context.trace_id:032x}" == TRACE_ID
        assert span.parent is not None and f"{span.parent.span_id:016x}" == CLIENT_SPAN
    assert dict(first.attributes or {}) == {"mcpbill.tool": "search", "mcpbill.outcome":
                                            "captured", "mcpbill.amount": PRICE}
    assert refused.status.status_code is StatusCode.ERROR
    assert (refused.attributes or {})["mcpbill.code"] == "INVALID_CREDIT_TOKEN"
    assert (spans[4].attributes or {})["mcpbill.code"] == "RESPONSE_TOO_LARGE"
    children = {span.name for span in exporter.get_finished_spans()
                if span.parent is not None and span.parent.span_id == first.context.span_id}
    assert children == {"mcpbill.hold", "mcpbill.capture"}
    assert any(span.name == "mcpbill.void" and span.parent is not None
               and span.parent.span_id == spans[3].context.span_id
               for span in exporter.get_finished_spans())

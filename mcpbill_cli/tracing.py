"""OpenTelemetry spans of billed MCP calls (extra ``[otel]``), joined to the agent's trace.

Turned on with ``Verifier(tracing=True)`` (or ``Billing(..., tracing=True)``,
``Proxy(..., tracing=True)``); off, opentelemetry is not imported and no span is made.
Spans go to the tracer provider the application set up (``opentelemetry.trace``'s global one,
or the one given), so exporters and sampling stay the operator's choice.

Each billed call gets one ``mcpbill.call`` span (attributes ``mcpbill.tool``,
``mcpbill.outcome``: captured, voided, refused, replayed or free, ``mcpbill.amount`` in
micro-USDC, ``mcpbill.code`` of a refusal, which also sets the span's status to error) with
child spans ``mcpbill.hold``, ``mcpbill.capture`` and ``mcpbill.void`` around the ledger steps.

The parent is the span current when the call arrives: the ``mcp`` SDK's own server middleware
(``OpenTelemetryMiddleware``, on by default in ``mcp`` 2.x) opens it from the W3C trace context
the client sent in ``_meta["traceparent"]``. Without such a span (a server that removed the
SDK's middleware), ``mcpbill.call`` reads the ``_meta`` trace context itself.

A process of its own (``mcpbill proxy --trace``) sets its tracer provider up with
:func:`export`: exporters, endpoint and service name come from the standard ``OTEL_*``
variables, as every OpenTelemetry SDK reads them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from importlib.metadata import entry_points
from typing import Any

from mcpbill_cli.errors import ConfigInvalid

__all__ = ["Tracing", "ended", "export", "step"]

TRACER_NAME = "mcpbill"
# The mcpbill.call span of the call this context runs (None: not traced).
CALL_SPAN: ContextVar[Any] = ContextVar("mcpbill_call_span", default=None)
NO_SPAN = nullcontext()
EXPORTERS = "opentelemetry_traces_exporter"  # the entry point group exporter packages fill
# OTEL_EXPORTER_OTLP_PROTOCOL -> the exporter the "otlp" name means; the [otel] extra has HTTP.
OTLP_EXPORTERS = {"http/protobuf": "otlp_proto_http", "grpc": "otlp_proto_grpc"}


class Tracing:
    """Where billed calls' spans are made (see the module docstring)."""

    def __init__(self, tracer_provider: Any = None) -> None:
        from opentelemetry import trace

        from mcpbill_cli.__about__ import __version__

        self.tracer = trace.get_tracer(TRACER_NAME, __version__, tracer_provider=tracer_provider)

    @contextmanager
    def call(self, tool: str, meta: Mapping[str, Any] | None) -> Iterator[Any]:
        """The ``mcpbill.call`` span of one call of ``tool``; finish it with :func:`finish`."""
        with self.tracer.start_as_current_span(
                "mcpbill.call", context=_parent(meta), attributes={"mcpbill.tool": tool}) as span:
            token = CALL_SPAN.set(span)
            try:
                yield span
            finally:
                CALL_SPAN.reset(token)

    @contextmanager
    def step(self, name: str) -> Iterator[Any]:
        """A child span ``mcpbill.<name>`` of the current call (hold, capture, void)."""
        with self.tracer.start_as_current_span(f"mcpbill.{name}") as span:
            yield span


def step(tracing: Tracing | None, name: str) -> AbstractContextManager[Any]:
    """``tracing``'s ``mcpbill.<name>`` span, or nothing when tracing is off."""
    return NO_SPAN if tracing is None else tracing.step(name)


def ended(outcome: str, *, amount: int | None = None, code: str | None = None) -> None:
    """Finish the current call's span, if it is traced (see :func:`finish`)."""
    span = CALL_SPAN.get()
    if span is not None:
        finish(span, outcome, amount=amount, code=code)


def finish(span: Any, outcome: str, *, amount: int | None = None,
           code: str | None = None) -> None:
    """Say how the call of ``span`` ended; a refusal's ``code`` marks the span an error."""
    span.set_attribute("mcpbill.outcome", outcome)
    if amount is not None:
        span.set_attribute("mcpbill.amount", amount)
    if code is not None:
        from opentelemetry.trace import StatusCode

        span.set_attribute("mcpbill.code", code)
        span.set_status(StatusCode.ERROR, code)


def _parent(meta: Mapping[str, Any] | None) -> Any:
    """``None`` (the current span) when there is one; else the ``_meta`` trace context."""
    from opentelemetry import trace
    from opentelemetry.propagate import extract

    if trace.get_current_span().get_span_context().is_valid or not meta:
        return None
    carrier = {key: value for key, value in meta.items() if isinstance(value, str)}
    context = extract(carrier)
    return context if trace.get_current_span(context).get_span_context().is_valid else None


def export(service: str) -> Any:
    """Make the global tracer provider one that exports spans as the ``OTEL_*`` variables say,
    and return it (shut it down on the way out: that sends the spans still queued).

    ``OTEL_TRACES_EXPORTER`` names the exporters (default ``otlp``; ``console`` prints spans
    on stdout; ``none``), ``OTEL_EXPORTER_OTLP_*`` where and how OTLP goes, and
    ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES`` override ``service``. Without the
    ``[otel]`` extra, or for an exporter nobody installed, it is CONFIG_INVALID."""
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import OTELResourceDetector, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise ConfigInvalid("tracing needs the OpenTelemetry SDK: pip install 'mcpbill[otel]'",
                            field="trace") from None
    resource = Resource.create({"service.name": service}).merge(OTELResourceDetector().detect())
    provider = TracerProvider(resource=resource)
    for exporter in _exporters():
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def _exporters() -> list[Any]:
    """The span exporters ``OTEL_TRACES_EXPORTER`` names, found by their entry points."""
    names = os.environ.get("OTEL_TRACES_EXPORTER") or "otlp"
    exporters = []
    for name in filter(None, (part.strip() for part in names.split(","))):
        if name == "none":
            continue
        if name == "otlp":
            protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf")
            name = OTLP_EXPORTERS.get(protocol, protocol)
        found = entry_points(group=EXPORTERS, name=name)
        if not found:
            raise ConfigInvalid(
                f"OTEL_TRACES_EXPORTER names the span exporter {name!r}, which is not installed "
                "(mcpbill[otel] has otlp over http/protobuf and console)",
                field="OTEL_TRACES_EXPORTER")
        exporters.append(next(iter(found)).load()())
    return exporters

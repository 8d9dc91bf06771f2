"""What the proxy tells an operator about its calls: Prometheus metrics (``--metrics HOST:PORT``).

:class:`CallMetrics` is what billing reports to; it records nothing, so a proxy without
``--metrics`` neither imports nor pays for prometheus-client. :class:`PrometheusMetrics` keeps,
in a registry of its own (several proxies in one process never share counters):

- ``mcpbill_proxy_calls_total{tool, outcome}``: captured, voided, refused, replayed or free
  (one per call);
- ``mcpbill_proxy_refusals_total{tool, code}``: every coded refusal, upstream failures included;
- ``mcpbill_proxy_charged_micro_usdc_total{tool}``: what captured calls charged (micro-USDC);
- ``mcpbill_proxy_holds_open``: calls held and not yet captured or voided;
- ``mcpbill_proxy_hold_to_capture_seconds{tool}``: from the hold to the receipt;
- ``mcpbill_proxy_ledger_errors_total``: calls refused because the ledger was unreachable.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CallMetrics", "PrometheusMetrics", "serve_metrics", "stop_metrics"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class CallMetrics:
    """The events billing reports, each a no-op here. Every call ends in exactly one
    :meth:`finished` (or :meth:`captured`, which is one)."""

    def finished(self, tool: str, outcome: str) -> None:
        """A call ended: ``voided``, ``refused``, ``replayed`` or ``free``."""

    def refusal(self, tool: str, code: str) -> None:
        """A call was answered with a coded refusal (before or after its hold)."""

    def held(self) -> None:
        """A hold was opened."""

    def released(self) -> None:
        """A hold was resolved (captured or voided)."""

    def captured(self, tool: str, amount: int, seconds: float) -> None:
        """A call was captured for ``amount`` micro-USDC, ``seconds`` after its hold."""


class PrometheusMetrics(CallMetrics):
    """:class:`CallMetrics` kept in a prometheus-client registry (see the module docstring)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self._calls = Counter("mcpbill_proxy_calls", "Tool calls through the proxy, by outcome.",
                              ["tool", "outcome"], registry=self.registry)
        self._refusals = Counter("mcpbill_proxy_refusals", "Coded refusals, by tool and code.",
                                 ["tool", "code"], registry=self.registry)
        self._charged = Counter("mcpbill_proxy_charged_micro_usdc",
                                "What captured calls charged, in micro-USDC.", ["tool"],
                                registry=self.registry)
        self._open = Gauge("mcpbill_proxy_holds_open", "Holds not yet captured or voided.",
                           registry=self.registry)
        self._latency = Histogram("mcpbill_proxy_hold_to_capture_seconds",
                                  "Seconds from a call's hold to its capture.", ["tool"],
                                  buckets=LATENCY_BUCKETS, registry=self.registry)
        self._ledger_errors = Counter("mcpbill_proxy_ledger_errors",
                                      "Calls refused because the ledger was unreachable.",
                                      registry=self.registry)

    def finished(self, tool: str, outcome: str) -> None:
        self._calls.labels(tool, outcome).inc()

    def refusal(self, tool: str, code: str) -> None:
        self._refusals.labels(tool, code).inc()
        if code in ("LEDGER_UNAVAILABLE", "LEDGER_FULL"):
            self._ledger_errors.inc()

    def held(self) -> None:
        self._open.inc()

    def released(self) -> None:
        self._open.dec()

    def captured(self, tool: str, amount: int, seconds: float) -> None:
        self._calls.labels(tool, "captured").inc()
        self._charged.labels(tool).inc(amount)
        self._latency.labels(tool).observe(seconds)


def serve_metrics(metrics: PrometheusMetrics, host: str, port: int) -> Any:
    """Serve ``/metrics`` on ``host:port`` from a thread; returns the server (see
    :func:`stop_metrics`)."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return server


def stop_metrics(server: Any) -> None:
    """Stop a server :func:`serve_metrics` started, and close its socket."""
    server.shutdown()
    server.server_close()

"""What billing tells an operator about its calls: Prometheus metrics, for an embedded verifier
(``Verifier(metrics=True)``) and for ``mcpbill proxy --metrics`` alike.

A verifier built without metrics neither imports this module's prometheus-client nor calls
anything here: its call path checks ``self.metrics is None`` and moves on. With metrics, the
verifier records what it decides (holds, captures, voids, replays, refusals) and its caller
records only what the verifier never sees (free calls it forwards untouched, refusals of its own
such as ``PROXY_BUSY`` or ``UPSTREAM_TIMEOUT``). :class:`PrometheusMetrics` keeps, in a registry
of its own (several verifiers in one process never share counters):

- ``mcpbill_calls_total{tool, outcome}``: captured, voided, input_required, refused, replayed or
  free (one per call; ``input_required`` is a round of an MCP 2026-07-28 multi-round call that
  asked the agent for more: voided, and the round that completes counts on its own);
- ``mcpbill_refusals_total{tool, code}``: every coded refusal;
- ``mcpbill_charged_micro_usdc_total{tool}``: what captured calls charged (micro-USDC);
- ``mcpbill_holds_open``: holds this process opened and has not yet captured or voided;
- ``mcpbill_hold_to_capture_seconds{tool}``: from the hold to the receipt;
- ``mcpbill_ledger_errors_total``: calls refused because the ledger was unreachable or full;
- ``mcpbill_seal_lag_seconds``: the age of the oldest audit event not yet sealed (0 when all
  are, NaN while the ledger cannot be read), read from the ledger at each scrape;
- ``mcpbill_clock_error_bound_seconds``: on a PostgreSQL ledger, how far the verifier's time
  may be from the database server's (NaN before its first reading); see
  :class:`~mcpbill_cli.ledger.clock.DatabaseClock`.

Verifiers given one :class:`PrometheusMetrics` count into the same series; the last two gauges
stay one series each (Prometheus refuses a whole scrape that has a series twice): the oldest
unsealed event of the ledgers they write to (each read once), and the largest error bound of
their clocks.

The ``tool`` label of a call that charged nothing (refused, free, voided, replayed) is the
caller's word, sent before any token is checked or to a tool that does not exist (a proxy
forwards a name its upstream then refuses, and voids the call): it is kept only for the tools
the pricing table names (and the tools a proxy's upstream lists), else it reads ``unknown``,
so that a caller cannot grow the series without bound. A captured call's is kept: each costs
its caller the price.

Serve them with :func:`serve` (a thread of their own) or mount :meth:`PrometheusMetrics.asgi_app`
into an ASGI application.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy import URL, Engine

__all__ = ["LEDGER_ERRORS", "UNKNOWN_TOOL", "PrometheusMetrics", "serve", "stop"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LEDGER_ERRORS = frozenset({"LEDGER_UNAVAILABLE", "LEDGER_FULL"})
UNKNOWN_TOOL = "unknown"  # the tool label of an uncharged call of a tool nobody names


class PrometheusMetrics:
    """The billing metrics of one verifier (or proxy), in a prometheus-client registry of their
    own (see the module docstring). Thread-safe: a verifier serves calls from many threads."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self._calls = Counter("mcpbill_calls", "Billed tool calls, by tool and outcome.",
                              ["tool", "outcome"], registry=self.registry)
        self._refusals = Counter("mcpbill_refusals", "Coded refusals, by tool and code.",
                                 ["tool", "code"], registry=self.registry)
        self._charged = Counter("mcpbill_charged_micro_usdc",
                                "What captured calls charged, in micro-USDC.", ["tool"],
                                registry=self.registry)
        self._open = Gauge("mcpbill_holds_open", "Holds not yet captured or voided.",
                           registry=self.registry)
        self._latency = Histogram("mcpbill_hold_to_capture_seconds",
                                  "Seconds from a call's hold to its capture.", ["tool"],
                                  buckets=LATENCY_BUCKETS, registry=self.registry)
        self._ledger_errors = Counter("mcpbill_ledger_errors",
                                      "Calls refused because the ledger was unreachable or full.",
                                      registry=self.registry)
        self._seal_lag = _SealLag()
        self._clock_bound = _ClockErrorBound()
        self.registry.register(self._seal_lag)
        self.registry.register(self._clock_bound)
        self._held: dict[str, float] = {}  # hold id -> monotonic time of the hold
        self._lock = threading.Lock()
        self._named: Callable[[str], bool] | None = None  # None: every tool label is kept
        self._listed: frozenset[str] = frozenset()

    # --- which tool labels are kept ---------------------------------------------------------------

    def name_tools(self, named: Callable[[str], bool]) -> None:
        """Keep the ``tool`` label of calls that charged nothing only where ``named(tool)``
        (the verifier's pricing table names it) or the tool was :meth:`listed`."""
        self._named = named

    def listed(self, tools: Iterable[str]) -> None:
        """``tools`` are real (a proxy's upstream listed them): their labels are kept."""
        self._listed = frozenset(tools)

    def _label(self, tool: str) -> str:
        if self._named is None or tool in self._listed or self._named(tool):
            return tool
        return UNKNOWN_TOOL

    # --- what billing reports -------------------------------------------------------------------

    def finished(self, tool: str, outcome: str) -> None:
        """A call ended without a capture: ``voided``, ``input_required``, ``refused``,
        ``replayed`` or ``free``. Its tool may be anything a caller named (see the module
        docstring)."""
        self._calls.labels(self._label(tool), outcome).inc()

    def refused(self, tool: str, code: str) -> None:
        """A call was answered with the coded refusal ``code`` (and ended there)."""
        self.refusal(tool, code)
        self.finished(tool, "refused")

    def refusal(self, tool: str, code: str) -> None:
        """A coded refusal that does not end the call's count by itself (a voided call's
        ``UPSTREAM_TIMEOUT``, a capture refused after its hold was counted)."""
        self._refusals.labels(self._label(tool), code).inc()
        if code in LEDGER_ERRORS:
            self._ledger_errors.inc()

    def held(self, hold_id: str) -> None:
        """The hold ``hold_id`` was opened."""
        with self._lock:
            self._held[hold_id] = time.monotonic()
        self._open.inc()

    def captured(self, tool: str, amount: int, hold_id: str | None = None) -> None:
        """A call was charged ``amount`` micro-USDC: the capture of ``hold_id``, or a charge in
        one step (no hold, no latency)."""
        started = self._release(hold_id) if hold_id is not None else None
        self._calls.labels(tool, "captured").inc()
        self._charged.labels(tool).inc(amount)
        if started is not None:
            self._latency.labels(tool).observe(time.monotonic() - started)

    def voided(self, tool: str, hold_id: str, outcome: str = "voided") -> None:
        """The hold ``hold_id`` was voided: the call ends unbilled, as ``outcome`` (``voided``,
        or ``input_required`` for a round that asked the agent for more), counted once however
        often it is voided."""
        if self._release(hold_id) is not None:
            self.finished(tool, outcome)

    def released(self, hold_id: str) -> None:
        """The hold ``hold_id`` ended without a capture or void of this process (it lapsed)."""
        self._release(hold_id)

    def _release(self, hold_id: str) -> float | None:
        with self._lock:
            started = self._held.pop(hold_id, None)
        if started is not None:
            self._open.dec()
        return started

    # --- the ledger's part ----------------------------------------------------------------------

    def watch_seal_lag(self, engine: Engine, clock: Callable[[], datetime]) -> None:
        """Count ``engine``'s ledger in ``mcpbill_seal_lag_seconds``, read at each scrape
        (a ledger watched already, by its URL, is read once)."""
        self._seal_lag.watch(engine, clock)

    def watch_clock(self, error_bound: Callable[[], float | None]) -> None:
        """Count the clock ``error_bound`` tells of in ``mcpbill_clock_error_bound_seconds``,
        asked at each scrape (``None``: it has not read its server yet)."""
        self._clock_bound.watch(error_bound)

    # --- serving --------------------------------------------------------------------------------

    def asgi_app(self) -> Any:
        """An ASGI application answering with these metrics (mount it at ``/metrics``)."""
        from prometheus_client import make_asgi_app

        return make_asgi_app(registry=self.registry)

    def text(self) -> str:
        """The metrics in Prometheus text format."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()


class _SealLag:
    """A collector: the age of the oldest unsealed audit event of the ledgers watched,
    computed when scraped (no series before one is watched)."""

    def __init__(self) -> None:
        self._ledgers: dict[URL, tuple[Engine, Callable[[], datetime]]] = {}

    def watch(self, engine: Engine, clock: Callable[[], datetime]) -> None:
        if engine.url not in self._ledgers:  # a new dict: a scrape may be iterating this one
            self._ledgers = {**self._ledgers, engine.url: (engine, clock)}

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        if not self._ledgers:
            return
        lags = [_lag(engine, clock) for engine, clock in self._ledgers.values()]
        yield GaugeMetricFamily("mcpbill_seal_lag_seconds",
                                "Age of the oldest audit event not yet sealed (0: none).",
                                value=math.nan if any(map(math.isnan, lags)) else max(lags))


def _lag(engine: Engine, clock: Callable[[], datetime]) -> float:
    """NaN while the ledger cannot be read: the scrape still serves every other metric
    (``mcpbill_ledger_errors_total`` above all)."""
    from sqlalchemy import func, select
    from sqlalchemy.exc import DBAPIError

    from mcpbill_cli.clock import aware
    from mcpbill_cli.errors import BillingError
    from mcpbill_cli.ledger.engine import reading
    from mcpbill_cli.ledger.models import events

    try:
        with reading(engine) as conn:
            oldest = conn.execute(select(func.min(events.c.at))
                                  .where(events.c.seal.is_(None))).scalar()
    except (BillingError, DBAPIError):
        return math.nan
    if oldest is None:
        return 0.0
    return max((clock() - aware(oldest)).total_seconds(), 0.0)


class _ClockErrorBound:
    """A collector: how far the verifiers' clocks may be from their ledgers', when scraped
    (the largest bound; NaN until a clock has read its server; no series before one is
    watched)."""

    def __init__(self) -> None:
        self._bounds: tuple[Callable[[], float | None], ...] = ()

    def watch(self, error_bound: Callable[[], float | None]) -> None:
        if error_bound not in self._bounds:
            self._bounds = (*self._bounds, error_bound)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        if not self._bounds:
            return
        known = [bound for bound in (error_bound() for error_bound in self._bounds)
                 if bound is not None]
        yield GaugeMetricFamily("mcpbill_clock_error_bound_seconds",
                                "How far this process's time may be from the database's.",
                                value=max(known, default=math.nan))


def serve(metrics: PrometheusMetrics, host: str, port: int) -> Any:
    """Serve ``metrics`` at ``http://host:port/metrics`` from a thread; returns the server
    (see :func:`stop`)."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return server


def stop(server: Any) -> None:
    """Stop a server :func:`serve` started, and close its socket."""
    server.shutdown()
    server.server_close()

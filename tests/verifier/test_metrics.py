"""An embedded verifier's Prometheus metrics (``Verifier(metrics=True)``), scraped over real HTTP
after paid, replayed, voided, free and refused calls, and checked against the ledger."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, func, select

from mcpbill_cli import metrics
from mcpbill_cli.clock import utcnow
from mcpbill_cli.errors import BillingError
from mcpbill_cli.keys import KeySource
from mcpbill_cli.ledger.credit import IssuedToken
from mcpbill_cli.ledger.engine import make_engine, reading
from mcpbill_cli.ledger.models import calls
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.verifier import Verifier
from tests.mcp.conftest import serve

from .billing_support import FakeClock

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
LEDGER_GAUGES = ("mcpbill_seal_lag_seconds", "mcpbill_clock_error_bound_seconds")


@pytest.fixture
def metered(funded: Engine, keys: KeySource, pricing: PricingTable,
            clock: FakeClock) -> Iterator[Verifier]:
    verifier = Verifier(keys=keys, pricing=pricing, engine=funded, clock=clock, metrics=True)
    yield verifier
    verifier.close()


@pytest.fixture
def scrape_url(metered: Verifier) -> Iterator[str]:
    assert metered.metrics is not None
    port_server = metrics.serve(metered.metrics, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port_server.server_port}/metrics"
    finally:
        metrics.stop(port_server)


def scrape(url: str) -> Samples:
    return parsed(httpx2.get(url, timeout=10).text)


def parsed(text: str) -> Samples:
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def calls_of(got: Samples, tool: str, outcome: str) -> float:
    return got.get(("mcpbill_calls_total", (("outcome", outcome), ("tool", tool))), 0)


def refusals_of(got: Samples, tool: str, code: str) -> float:
    return got.get(("mcpbill_refusals_total", (("code", code), ("tool", tool))), 0)


def ledger_charged(engine: Engine) -> dict[str, int]:
    """What the ledger's captured calls charged, by tool."""
    with reading(engine) as conn:
        rows = conn.execute(select(calls.c.tool, func.sum(calls.c.amount))
                            .where(calls.c.status == "captured").group_by(calls.c.tool))
        return {tool: int(total) for tool, total in rows}


def run_calls(verifier: Verifier, token: str, poor: str) -> None:
    """Captured: 2 search (a hold, a charge), 1 translate; replayed: 1 search; voided: 2 search;
    free: 1 status; refused: bad token, over budget (search)."""
    hold = verifier.hold(token, "search", idempotency_key="k-1")
    verifier.capture(hold)
    verifier.charge(token, "search", idempotency_key="k-2")
    verifier.charge(token, "search", idempotency_key="k-2")  # a replay
    with verifier.call(token, "translate"):
        pass
    voided = verifier.hold(token, "search", idempotency_key="k-3")
    verifier.void(voided)
    verifier.void(voided)  # twice: one call, voided once
    with pytest.raises(RuntimeError), verifier.call(token, "search", idempotency_key="k-4"):
        raise RuntimeError("the tool failed")
    verifier.begin(token, "status")
    with pytest.raises(BillingError, match="INVALID_CREDIT_TOKEN|token"):
        verifier.hold("not-a-token", "search")
    with pytest.raises(BillingError) as over:
        verifier.hold(poor, "translate")
    assert over.value.code == "BUDGET_EXCEEDED"


def test_the_metrics_match_the_ledger_after_a_run(
        metered: Verifier, scrape_url: str, funded: Engine,
        new_token: Callable[..., IssuedToken]) -> None:
    run_calls(metered, new_token().token, new_token(limit=10_000).token)
    got = scrape(scrape_url)

    charged = ledger_charged(funded)
    assert charged == {"search": 20_000, "translate": 50_000}
    for tool, amount in charged.items():
        assert got[("mcpbill_charged_micro_usdc_total", (("tool", tool),))] == amount
    assert (calls_of(got, "search", "captured"), calls_of(got, "translate", "captured")) == (2, 1)
    assert calls_of(got, "search", "replayed") == 1
    assert calls_of(got, "search", "voided") == 2
    assert calls_of(got, "status", "free") == 1
    assert calls_of(got, "search", "refused") == 1
    assert calls_of(got, "translate", "refused") == 1
    assert refusals_of(got, "search", "INVALID_CREDIT_TOKEN") == 1
    assert refusals_of(got, "translate", "BUDGET_EXCEEDED") == 1
    assert got[("mcpbill_holds_open", ())] == 0
    # Only calls held and then captured have a latency: the hold, and the `with` block.
    assert got[("mcpbill_hold_to_capture_seconds_count", (("tool", "search"),))] == 1
    assert got[("mcpbill_hold_to_capture_seconds_count", (("tool", "translate"),))] == 1
    assert got[("mcpbill_ledger_errors_total", ())] == 0


def test_an_open_hold_is_counted_until_it_is_captured(
        metered: Verifier, scrape_url: str, new_token: Callable[..., IssuedToken]) -> None:
    token = new_token().token
    holds = [metered.hold(token, "search", idempotency_key=f"open-{n}") for n in range(3)]
    assert scrape(scrape_url)[("mcpbill_holds_open", ())] == 3
    metered.capture(holds[0])
    metered.void(holds[1])
    assert scrape(scrape_url)[("mcpbill_holds_open", ())] == 1


def test_seal_lag_is_the_age_of_the_oldest_unsealed_event(
        metered: Verifier, scrape_url: str, clock: FakeClock,
        new_token: Callable[..., IssuedToken]) -> None:
    metered.seal()  # the funding and issuing events
    assert scrape(scrape_url)[("mcpbill_seal_lag_seconds", ())] == 0
    metered.charge(new_token().token, "search")
    clock.advance(7)
    assert scrape(scrape_url)[("mcpbill_seal_lag_seconds", ())] == 7
    assert metered.seal() > 0
    assert scrape(scrape_url)[("mcpbill_seal_lag_seconds", ())] == 0


def test_metrics_mount_into_an_asgi_app(metered: Verifier,
                                        new_token: Callable[..., IssuedToken]) -> None:
    assert metered.metrics is not None
    metered.charge(new_token().token, "search")
    with serve(metered.metrics.asgi_app()) as url:
        got = scrape(url.removesuffix("/mcp") + "/metrics")
    assert calls_of(got, "search", "captured") == 1


def test_a_verifier_without_metrics_never_imports_prometheus() -> None:
    probe = ("import sys; from mcpbill_cli import Verifier; import mcpbill_cli.mcp.billing; "
             "import mcpbill_cli.proxy; "
             "print(sorted(m for m in sys.modules if m.startswith(('prometheus_client', "
             "'mcpbill_cli.metrics'))))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.strip() == "[]"


def test_an_unreadable_ledger_leaves_the_scrape_whole(tmp_path: Path) -> None:
    gone = make_engine(f"sqlite:///{tmp_path / 'missing' / 'ledger.db'}")
    watched = metrics.PrometheusMetrics()
    watched.watch_seal_lag(gone, utcnow)
    watched.refused("search", "LEDGER_UNAVAILABLE")
    got = parsed(watched.text())
    assert math.isnan(got[("mcpbill_seal_lag_seconds", ())])
    assert got[("mcpbill_ledger_errors_total", ())] == 1
    gone.dispose()


def test_verifiers_given_one_set_of_metrics_count_into_the_same_series(
        funded: Engine, keys: KeySource, pricing: PricingTable,
        new_token: Callable[..., IssuedToken]) -> None:
    """The ledger's gauges stay one series each however many verifiers watch it (a series
    twice makes Prometheus refuse the whole scrape); on PostgreSQL each verifier follows the
    server's clock with a clock of its own, and the gauge gives the largest bound."""
    shared = metrics.PrometheusMetrics()
    first, second = (Verifier(keys=keys, pricing=pricing, engine=funded, metrics=shared)
                     for _ in range(2))
    try:
        token = new_token().token
        first.charge(token, "search", idempotency_key="first")
        second.charge(token, "search", idempotency_key="second")
        bounds = [first.clock_error_bound(), second.clock_error_bound()]
        text = shared.text()
    finally:
        first.close()
        second.close()
    assert calls_of(parsed(text), "search", "captured") == 2
    gauges = [(sample.name, sample.value) for family in text_string_to_metric_families(text)
              for sample in family.samples if sample.name in LEDGER_GAUGES]
    if funded.dialect.name == "sqlite":  # the host's clock: no bound to tell
        assert [name for name, _ in gauges] == ["mcpbill_seal_lag_seconds"]
    else:
        assert [name for name, _ in gauges] == list(LEDGER_GAUGES)
        assert None not in bounds
        assert gauges[1][1] >= max(b for b in bounds if b is not None)

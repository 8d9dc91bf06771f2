"""The proxy's Prometheus metrics, scraped over HTTP after a run and checked against the ledger."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine

from mcpbill_cli.config import Settings
from mcpbill_cli.metrics import PrometheusMetrics
from mcpbill_cli.metrics import serve as serve_metrics
from mcpbill_cli.metrics import stop as stop_metrics
from mcpbill_cli.pricing import save_pricing_text
from mcpbill_cli.proxy import Limits, Proxy, Upstream, build_app
from mcpbill_cli.verifier import Verifier
from tests.mcp.conftest import Mint, receipt_of, refusal_of, serve, token_view
from tests.mcp.test_http import free_port

from .conftest import PRICING, agent, stdio_target

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def metered(priced: Settings, verifier: Verifier, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A proxy with metrics: (its MCP URL, its metrics URL)."""
    yield from _metered(verifier, tmp_path)


@pytest.fixture
def metered_any_name(home: Settings, verifier: Verifier, tmp_path: Path
                     ) -> Iterator[tuple[str, str]]:
    """As ``metered``, with a ``default_price``: any tool name is paid, held and forwarded."""
    save_pricing_text(home.pricing_path, PRICING.replace(
        'currency = "USDC"', 'currency = "USDC"\ndefault_price = "0.001"'))
    yield from _metered(verifier, tmp_path)


def _metered(verifier: Verifier, tmp_path: Path) -> Iterator[tuple[str, str]]:
    metrics = PrometheusMetrics()
    port = free_port()
    scraper = serve_metrics(metrics, "127.0.0.1", port)
    with (tmp_path / "upstream.log").open("w") as errlog:
        upstream = Upstream(stdio_target(tmp_path / "upstream.pid"), errlog=errlog)
        proxy = Proxy(verifier, upstream, Limits(call_timeout=30), metrics=metrics)
        try:
            with serve(build_app(proxy)) as url:
                yield url, f"http://127.0.0.1:{port}/metrics"
        finally:
            stop_metrics(scraper)


def scrape(url: str) -> Samples:
    text = httpx2.get(url, timeout=10).text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_the_metrics_match_the_ledger_after_a_run(metered: tuple[str, str], mint: Mint,
                                                  engine: Engine) -> None:
    url, metrics_url = metered
    tokens = [mint(), mint(agent="agent-2")]

    async def run() -> None:
        for token in tokens:
            async with agent(url, token.token) as client:
                assert receipt_of(await client.call("echo", {"message": token.claims.jti}))
                assert receipt_of(await client.call("echo", {"message": token.claims.jti}))
                assert (await client.call("echo", {"message": 7})).is_error  # voided
        async with agent(url, None) as client:
            assert refusal_of(await client.call("echo", {"message": "no token"}))
            assert not (await client.call("get-sum", {"a": 1, "b": 1})).is_error

    anyio.run(run)
    got = scrape(metrics_url)

    def calls(outcome: str, tool: str = "echo") -> float:
        return got.get(("mcpbill_calls_total", (("outcome", outcome), ("tool", tool))), 0)

    spent = sum(token_view(engine, token).spent for token in tokens)
    assert spent == 4000
    assert got[("mcpbill_charged_micro_usdc_total", (("tool", "echo"),))] == spent
    assert (calls("captured"), calls("replayed"), calls("voided"), calls("refused")) == (
        2, 2, 2, 1)
    assert calls("free", "get-sum") == 1
    refusals = ("mcpbill_refusals_total",
                (("code", "INVALID_CREDIT_TOKEN"), ("tool", "echo")))
    assert got[refusals] == 1
    assert got[("mcpbill_holds_open", ())] == 0
    assert got[("mcpbill_hold_to_capture_seconds_count", (("tool", "echo"),))] == 2
    assert sum(token_view(engine, token).held for token in tokens) == 0


def test_refusals_of_tools_nobody_names_share_one_label(metered: tuple[str, str]) -> None:
    """A caller without a token picks the tool name: only the pricing table's tools and the
    upstream's listed ones keep theirs, so made-up names cannot grow the series."""
    url, metrics_url = metered

    async def run() -> None:
        async with agent(url, None) as client:
            for made_up in ("no-such-tool-1", "no-such-tool-2", "x" * 200):
                assert refusal_of(await client.call(made_up))["code"] == "PRICE_UNKNOWN"
            assert refusal_of(await client.call("echo", {"message": "no token"}))
            await client.client.list_tools()  # get-env: listed by the upstream, not priced
            assert refusal_of(await client.call("get-env"))["code"] == "PRICE_UNKNOWN"

    anyio.run(run)
    refusals = {dict(labels)["tool"]: value for (name, labels), value in scrape(metrics_url).items()
                if name == "mcpbill_refusals_total"}
    assert refusals == {"unknown": 3, "echo": 1, "get-env": 1}


def test_paid_calls_of_names_the_upstream_does_not_have_share_one_label(
        metered_any_name: tuple[str, str], mint: Mint, engine: Engine) -> None:
    """With a default price, a token's holder can make up tool names: each is held, forwarded,
    refused by the upstream and voided, and counted under ``unknown``, with its refusals; a
    made-up name never becomes a series of its own."""
    url, metrics_url = metered_any_name
    token = mint()

    async def run() -> None:
        async with agent(url, token.token) as client:
            for n in range(5):
                assert (await client.call(f"made-up-{n}")).is_error
            assert receipt_of(await client.call("echo", {"message": "real"}))

    anyio.run(run)
    got = scrape(metrics_url)
    tools = {dict(labels)["tool"] for (name, labels) in got
             if name in ("mcpbill_calls_total", "mcpbill_refusals_total")}
    assert tools == {"unknown", "echo"}
    assert got[("mcpbill_calls_total", (("outcome", "voided"), ("tool", "unknown")))] == 5
    assert got[("mcpbill_calls_total", (("outcome", "captured"), ("tool", "echo")))] == 1
    view = token_view(engine, token)
    assert (view.spent, view.held) == (2000, 0)  # only echo's price

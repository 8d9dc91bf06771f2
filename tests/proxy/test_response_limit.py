"""`--max-response-bytes`: an upstream result over the limit is not relayed; a paid call is
voided and refused with RESPONSE_TOO_LARGE, counted in the proxy's metrics."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult
from sqlalchemy import Engine

from mcpbill_cli.config import Settings
from mcpbill_cli.metrics import PrometheusMetrics
from mcpbill_cli.proxy import Limits, Proxy, Upstream, UpstreamTarget, build_app
from mcpbill_cli.verifier import Verifier
from tests.mcp.conftest import (
    Mint,
    assert_ledger_sound,
    receipt_of,
    refusal_of,
    serve,
    token_view,
    usd,
)

from .conftest import agent, stdio_target

Limited = tuple[str, PrometheusMetrics]
LIMIT = 16 * 1024  # over the reference server's tools/list, which the client reads to validate


@pytest.fixture
def response_limit() -> int:
    return LIMIT


@pytest.fixture
def limited(priced: Settings, verifier: Verifier, upstream_kind: str, response_limit: int,
            request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Limited]:
    """A proxy relaying results of at most ``response_limit`` bytes: (its URL, its metrics)."""
    target = (stdio_target(tmp_path / "upstream.pid") if upstream_kind == "stdio"
              else UpstreamTarget.parse(command=None,
                                        url=request.getfixturevalue("everything_http")))
    metrics = PrometheusMetrics()
    limits = Limits(call_timeout=30, max_response_bytes=response_limit)
    with (tmp_path / "upstream.log").open("w") as errlog:
        proxy = Proxy(verifier, Upstream(target, errlog=errlog), limits, metrics=metrics)
        with serve(build_app(proxy)) as url:
            yield url, metrics


def test_a_paid_result_over_the_limit_is_voided_and_refused(
        limited: Limited, mint: Mint, engine: Engine) -> None:
    url, metrics = limited
    token = mint()

    async def go() -> tuple[CallToolResult, CallToolResult]:
        async with agent(url, token.token) as client:
            big = await client.call("echo", {"message": "x" * (LIMIT + 100)})
            small = await client.call("echo", {"message": "fits"})
            return big, small

    big, small = anyio.run(go)
    body = refusal_of(big)
    assert body["code"] == "RESPONSE_TOO_LARGE" and body["limitBytes"] == LIMIT
    assert body["sizeBytes"] > LIMIT and body["tool"] == "echo"
    assert "x" * 100 not in str(big.content)  # the upstream's text never reached the agent
    assert receipt_of(small)["amountUsd"] == "0.002"  # the proxy goes on relaying
    view = token_view(engine, token)
    assert (view.spent, view.held) == (usd("0.002"), 0)
    assert_ledger_sound(engine)
    registry = metrics.registry
    assert registry.get_sample_value("mcpbill_refusals_total", {
        "tool": "echo", "code": "RESPONSE_TOO_LARGE"}) == 1
    assert registry.get_sample_value("mcpbill_calls_total", {
        "tool": "echo", "outcome": "voided"}) == 1
    assert registry.get_sample_value("mcpbill_holds_open") == 0


@pytest.mark.parametrize("upstream_kind", ["stdio"])
@pytest.mark.parametrize("response_limit", [4096])
def test_other_results_over_the_limit_are_refused_too(
        limited: Limited, response_limit: int) -> None:
    url, _ = limited

    async def go() -> tuple[int, MCPError]:
        async with agent(url, None) as client:
            prompt = await client.client.get_prompt("simple-prompt")  # small: relayed
            with pytest.raises(MCPError) as refused:
                await client.client.list_tools()  # the reference server's list is larger
            return len(prompt.messages), refused.value

    messages, error = anyio.run(go)
    assert messages > 0
    assert error.error.data["code"] == "RESPONSE_TOO_LARGE"
    assert error.error.data["limitBytes"] == response_limit

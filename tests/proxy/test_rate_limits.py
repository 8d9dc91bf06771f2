"""A rate limit through `mcpbill proxy`: past the limit the official client gets the refusal
as a tool error with RATE_LIMITED, nothing is forwarded to the upstream or billed."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest
from mcp_types import CallToolResult
from sqlalchemy import Engine

from mcpbill_cli.config import Settings
from mcpbill_cli.verifier import Verifier
from tests.mcp.conftest import receipt_of, refusal_of, token_view, usd
from tests.mcp.test_rate_limits import rated_token
from tests.verifier.billing_support import FakeClock

from .conftest import Running


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def verifier(home: Settings, engine: Engine, clock: FakeClock) -> Iterator[Verifier]:
    """The proxy's verifier, on a clock the test moves."""
    verifier = Verifier.from_settings(home, engine=engine, clock=clock)
    yield verifier
    verifier.close()


@pytest.mark.parametrize("upstream_kind", ["http"])
def test_past_the_rate_the_proxy_refuses_with_rate_limited(
        running: Running, home: Settings, engine: Engine, clock: FakeClock) -> None:
    token = rated_token(home, engine, clock, "2/m")
    clock.advance(0.5)

    async def go() -> list[CallToolResult]:
        async with running.connect(token.token) as agent:
            return [await agent.call("echo", {"message": f"loop {n}"}) for n in range(3)]

    *paid, refused = anyio.run(go)
    for result in paid:
        receipt_of(result)
    body = refusal_of(refused)
    left_ms = (60 - clock().second) * 1000 - 500
    assert (body["code"], body["retryAfterMs"], body["limit"], body["scope"]) == (
        "RATE_LIMITED", left_ms, "2/m", "token")
    assert token_view(engine, token).spent == 2 * usd("0.002")
    assert token_view(engine, token).held == 0

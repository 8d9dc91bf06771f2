"""A rate limit over MCP, with the official client in process and over streamable HTTP: the
refusal is a tool error carrying RATE_LIMITED and when to retry; the tool does not run."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest
from sqlalchemy import Engine

from mcpbill_cli.config import Settings
from mcpbill_cli.keys import KeyRing
from mcpbill_cli.ledger import credit
from mcpbill_cli.ledger.credit import IssuedToken
from mcpbill_cli.ledger.engine import writing
from mcpbill_cli.ratelimits import parse_rates
from mcpbill_cli.verifier import Verifier
from tests.verifier.billing_support import FakeClock

from .conftest import Connect, receipt_of, refusal_of, token_view, usd


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def verifier(home: Settings, engine: Engine, clock: FakeClock) -> Iterator[Verifier]:
    """The example server's verifier, on a clock the test moves."""
    verifier = Verifier.from_settings(home, engine=engine, clock=clock)
    yield verifier
    verifier.close()


def rated_token(home: Settings, engine: Engine, clock: FakeClock, *rates: str) -> IssuedToken:
    request = credit.IssueRequest(
        tenant="default", agent="looper", limit=usd("0.05"), ttl=3600, scope=None,
        audience=home.audience, issuer=home.issuer, demo=True,
        rates=parse_rates(rates, spend=False, field="rate"))
    with writing(engine) as conn:
        return credit.issue(conn, request, signer=KeyRing.load(home.keys_dir).signing_key(),
                            ttl_cap=home.ttl_cap, now=clock())


def test_a_looping_agent_gets_rate_limited_as_a_tool_error(
        connect: Connect, home: Settings, engine: Engine, clock: FakeClock) -> None:
    token = rated_token(home, engine, clock, "2/s")
    clock.advance(0.5)
    anyio.run(loop, connect, token, engine, clock)


async def loop(connect: Connect, token: IssuedToken, engine: Engine, clock: FakeClock) -> None:
    async with connect(token.token) as agent:
        for n in range(2):
            receipt_of(await agent.call("search", {"q": f"loop {n}"}))
        refused = refusal_of(await agent.call("search", {"q": "loop 2"}))
        assert (refused["code"], refused["retryAfterMs"], refused["limit"], refused["window"],
                refused["scope"]) == ("RATE_LIMITED", 500, "2/s", "second", "token")
        assert token_view(engine, token).spent == 2 * usd("0.002")
        assert token_view(engine, token).held == 0
        clock.advance(0.5)  # the next second
        receipt_of(await agent.call("search", {"q": "loop 3"}))

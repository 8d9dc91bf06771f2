"""A rate limit over plain HTTP: 429 Too Many Requests with Retry-After and the error object,
on SQLite and PostgreSQL, served by uvicorn for real."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine

from mcpbill_cli.http import TOKEN_HEADER
from mcpbill_cli.keys import KeyRing, KeySource
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.verifier import Verifier
from tests.verifier.billing_support import PRICING_DOC, USDC, FakeClock, fund, mint

from .conftest import Endpoints, Switch, build_app, view


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def limited(engine: Engine, keys_dir: Path, clock: FakeClock) -> Iterator[Verifier]:
    """A verifier whose pricing table allows each token 2 calls a minute."""
    fund(engine, "acme", 100 * USDC, now=clock())
    verifier = Verifier(keys=KeySource(directory=keys_dir), engine=engine, clock=clock,
                        pricing=PricingTable.from_document(
                            {**PRICING_DOC, "limits": {"token_calls": ["2/m"]}}))
    yield verifier
    verifier.close()


@pytest.fixture
def limited_client(served: tuple[Switch, str], limited: Verifier,
                   endpoints: Endpoints) -> Iterator[httpx.Client]:
    switch, url = served
    switch.app = build_app(limited, endpoints)
    with httpx.Client(base_url=url, timeout=30) as http:
        yield http
    switch.app = None


def test_past_the_rate_the_call_is_429_with_retry_after_and_runs_nothing(
        limited_client: httpx.Client, engine: Engine, keys_dir: Path, clock: FakeClock,
        endpoints: Endpoints) -> None:
    token = mint(engine, KeyRing.load(keys_dir), now=clock())
    clock.advance(0.4)
    for n in range(2):
        paid = limited_client.post("/search", json={"q": n}, headers={TOKEN_HEADER: token.token})
        assert paid.status_code == 200, paid.text
    refused = limited_client.post("/search", json={"q": 3}, headers={TOKEN_HEADER: token.token})
    assert refused.status_code == 429, refused.text
    body = refused.json()
    left_ms = (60 - clock().second) * 1000 - 400
    assert (body["code"], body["retryAfterMs"], body["limit"], body["window"],
            body["scope"]) == ("RATE_LIMITED", left_ms, "2/m", "minute", "token")
    assert refused.headers["retry-after"] == str(math.ceil(left_ms / 1000))
    assert endpoints.runs["search"] == 2
    assert view(engine, token).spent == 2 * 10_000 and view(engine, token).held == 0
    clock.advance(left_ms / 1000)
    again = limited_client.post("/search", json={"q": 4}, headers={TOKEN_HEADER: token.token})
    assert again.status_code == 200, again.text

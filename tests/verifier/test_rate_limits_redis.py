"""Rate limits counted in Redis (``[limits] storage``, through the ``limits`` package): a
burst from 8 processes never passes the limit, a refused call counts nowhere, and the
setting is read, validated and scrubbed like the others. Redis runs on 127.0.0.1:6379."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from mcpbill_cli.config import load_settings
from mcpbill_cli.errors import BudgetExceeded, ConfigInvalid, RateLimited
from mcpbill_cli.keys import KeyRing, KeySource
from mcpbill_cli.ledger.credit import IssuedToken
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.verifier import Verifier

from .billing_support import PRICE, PRICING_DOC, FakeClock
from .test_rate_limits import (
    agents_apart,
    burst_outcomes,
    mint_rated,
    outcomes,
    own_rates,
    spent,
)

REDIS = "redis://127.0.0.1:6379/0"
Mint = Callable[..., IssuedToken]


@pytest.fixture
def redis_verifier(funded: Engine, keys: KeySource, clock: FakeClock) -> Iterator[Verifier]:
    verifier = Verifier(keys=keys, pricing=PricingTable.from_document(PRICING_DOC),
                        engine=funded, clock=clock, limits_storage=REDIS)
    yield verifier
    verifier.close()


@pytest.fixture
def rated(funded: Engine, ring: KeyRing, clock: FakeClock) -> Mint:
    def make(*calls: str, spend: tuple[str, ...] = (), **options: Any) -> IssuedToken:
        return mint_rated(funded, ring, clock, own_rates(*calls, spend=spend), **options)

    return make


def test_a_rate_in_redis_refuses_past_the_limit_and_the_ledger_counts_nothing(
        redis_verifier: Verifier, rated: Mint, funded: Engine) -> None:
    from sqlalchemy import func, select

    from mcpbill_cli.ledger.engine import reading
    from mcpbill_cli.ledger.models import rate_counters

    token = rated("3/m", agent=f"agent-{uuid.uuid4().hex}")
    assert outcomes(redis_verifier, token, 5) == ["ok"] * 3 + ["RATE_LIMITED"] * 2
    with pytest.raises(RateLimited) as refused:
        redis_verifier.charge(token.token, "search", args={"late": True})
    assert 0 < refused.value.details["retryAfterMs"] <= 60_000
    assert (refused.value.details["limit"], refused.value.details["window"]) == ("3/m", "minute")
    assert spent(funded, token) == 3 * PRICE
    with reading(funded) as conn:
        assert conn.execute(select(func.count()).select_from(rate_counters)).scalar() == 0


def test_calls_the_ledger_refuses_or_replays_give_their_hits_back(
        redis_verifier: Verifier, funded: Engine, ring: KeyRing, clock: FakeClock) -> None:
    from mcpbill_cli.ledger.credit import IssueRequest, issue
    from mcpbill_cli.ledger.engine import writing

    request = IssueRequest(tenant="acme", agent=f"agent-{uuid.uuid4().hex}", limit=2 * PRICE,
                           ttl=3600, scope=None, audience="mcpbill", issuer="mcpbill",
                           rates=own_rates("3/m"))
    with writing(funded) as conn:
        token = issue(conn, request, signer=ring.signing_key(), ttl_cap=86400, now=clock())
    first = redis_verifier.charge(token.token, "search", args={"q": 1}, idempotency_key="k")
    for _ in range(4):  # replays: neither counted nor refused
        again = redis_verifier.charge(token.token, "search", args={"q": 1}, idempotency_key="k")
        assert again.receipt_id == first.receipt_id
    redis_verifier.charge(token.token, "search", args={"q": 2})
    for n in range(3):  # over budget: refused by the ledger, their hits given back
        with pytest.raises(BudgetExceeded):
            redis_verifier.charge(token.token, "search", args={"broke": n})
    with pytest.raises(BudgetExceeded):  # the 3/m has room for a third call still
        redis_verifier.charge(token.token, "search", args={"q": 3})


def test_a_repeat_of_a_call_made_already_is_replayed_even_when_the_window_is_full(
        redis_verifier: Verifier, rated: Mint) -> None:
    token = rated("1/m", agent=f"agent-{uuid.uuid4().hex}")
    first = redis_verifier.charge(token.token, "search", args={"q": 1}, idempotency_key="k1")
    with pytest.raises(RateLimited):
        redis_verifier.charge(token.token, "search", args={"q": 2})
    again = redis_verifier.charge(token.token, "search", args={"q": 1}, idempotency_key="k1")
    assert again.receipt_id == first.receipt_id


def test_preflight_reads_a_rate_in_redis_and_takes_nothing(
        redis_verifier: Verifier, rated: Mint) -> None:
    token = rated("2/m", spend=("0.025/m",), agent=f"agent-{uuid.uuid4().hex}")
    for _ in range(3):  # preflights take no hit: two calls still fit
        redis_verifier.preflight(token.token, "search")
    assert outcomes(redis_verifier, token, 2) == ["ok", "ok"]
    with pytest.raises(RateLimited) as preflighted:
        redis_verifier.preflight(token.token, "search")
    assert (preflighted.value.details["kind"], preflighted.value.details["limit"]) == (
        "calls", "2/m")
    assert 0 < preflighted.value.details["retryAfterMs"] <= 60_000
    with pytest.raises(RateLimited) as held:
        redis_verifier.charge(token.token, "search", args={"late": True})
    assert held.value.details["kind"] == "calls"

    spender = rated(spend=("0.025/m",), agent=f"agent-{uuid.uuid4().hex}")
    assert outcomes(redis_verifier, spender, 2) == ["ok", "ok"]
    with pytest.raises(RateLimited) as over:
        redis_verifier.preflight(spender.token, "search")
    assert over.value.details["kind"] == "spend"


def test_a_spend_rate_in_redis(redis_verifier: Verifier, rated: Mint) -> None:
    token = rated(spend=("0.025/m",))
    assert outcomes(redis_verifier, token, 3) == ["ok", "ok", "RATE_LIMITED"]


@pytest.mark.slow
def test_a_burst_from_8_processes_never_passes_a_limit_kept_in_redis(
        funded: Engine, db_url: str, keys_dir: Path, ring: KeyRing, clock: FakeClock) -> None:
    token = mint_rated(funded, ring, clock, own_rates("20/m"))
    assert burst_outcomes(db_url, keys_dir, token, clock, limits_storage=REDIS) == {
        "ok": 20, "RATE_LIMITED": 60}
    assert spent(funded, token) == 20 * PRICE


def test_limits_storage_comes_from_config_and_is_validated(isolated_home: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    isolated_home.mkdir(parents=True, exist_ok=True)
    config = isolated_home / "config.toml"
    config.write_text('[limits]\nstorage = "redis://:s3cret@127.0.0.1:6379/0"\n')
    assert load_settings().limits_storage == "redis://:s3cret@127.0.0.1:6379/0"
    monkeypatch.setenv("MCPBILL_LIMITS_STORAGE", REDIS)
    assert load_settings().limits_storage == REDIS
    monkeypatch.delenv("MCPBILL_LIMITS_STORAGE")
    for bad in ('storage = "memcached://127.0.0.1"', "storage = 6379", 'store = "redis://x"'):
        config.write_text(f"[limits]\n{bad}\n")
        with pytest.raises(ConfigInvalid):
            load_settings()


def test_config_show_scrubs_the_redis_password(isolated_home: Path) -> None:
    from typer.testing import CliRunner

    from mcpbill_cli.cli import app

    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "config.toml").write_text(
        '[limits]\nstorage = "redis://:s3cret@127.0.0.1:6379/0"\n')
    shown = CliRunner().invoke(app, ["config", "show", "--json"], catch_exceptions=False)
    assert shown.exit_code == 0, shown.output
    assert "s3cret" not in shown.stdout and "127.0.0.1:6379" in shown.stdout


def test_agents_of_two_tenants_never_share_a_rate_in_redis_whatever_their_names(
        funded: Engine, keys: KeySource, ring: KeyRing, clock: FakeClock) -> None:
    doc = {**PRICING_DOC, "limits": {"agent_calls": ["1/m"]}}
    verifier = Verifier(keys=keys, pricing=PricingTable.from_document(doc), engine=funded,
                        clock=clock, limits_storage=REDIS)
    try:  # tenants of their own: Redis outlives the test's ledger
        one, other = agents_apart(funded, ring, clock, f"t{uuid.uuid4().hex[:8]}")
        assert outcomes(verifier, one, 2) == ["ok", "RATE_LIMITED"]
        assert outcomes(verifier, other, 2) == ["ok", "RATE_LIMITED"]
    finally:
        verifier.close()

"""Loop protection: rate limits of calls and spend, per token and per agent, counted in the
ledger (SQLite and PostgreSQL), refusing with RATE_LIMITED and when to retry."""

from __future__ import annotations

import itertools
import multiprocessing
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, text

from mcpbill_cli.errors import BillingError, BudgetExceeded, RateLimited
from mcpbill_cli.keys import KeyRing, KeySource
from mcpbill_cli.ledger import rates
from mcpbill_cli.ledger.credit import IssuedToken
from mcpbill_cli.ledger.engine import reading, writing
from mcpbill_cli.ledger.models import rate_counters
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.ratelimits import parse_rates
from mcpbill_cli.verifier import Verifier

from .billing_support import PRICE, PRICING_DOC, USDC, FakeClock, fund, mint
from .rate_workers import burst

Mint = Callable[..., IssuedToken]
CALLS = itertools.count()  # every call's arguments new: none is a replay of another


def limited_pricing(**limits: Any) -> dict[str, Any]:
    return {**PRICING_DOC, "limits": limits}


def own_rates(*calls: str, spend: tuple[str, ...] = ()) -> tuple[Any, ...]:
    return (*parse_rates(calls, spend=False, field="rate"),
            *parse_rates(spend, spend=True, field="spend_rate"))


@pytest.fixture
def rated(funded: Engine, ring: KeyRing, clock: FakeClock) -> Mint:
    """``rated("3/s", spend=("0.02/m",), agent=...)``: a token of acme with its own rates."""

    def make(*calls: str, spend: tuple[str, ...] = (), **options: Any) -> IssuedToken:
        return mint_rated(funded, ring, clock, own_rates(*calls, spend=spend), **options)

    return make


def mint_rated(engine: Engine, ring: KeyRing, clock: FakeClock, rates_: tuple[Any, ...],
               **options: Any) -> IssuedToken:
    from mcpbill_cli.ledger.credit import IssueRequest, issue

    request = IssueRequest(tenant=options.get("tenant", "acme"),
                           agent=options.get("agent", "agent-1"), limit=1_000_000, ttl=3600,
                           scope=None, audience="mcpbill", issuer="mcpbill", rates=rates_)
    with writing(engine) as conn:
        return issue(conn, request, signer=ring.signing_key(), ttl_cap=86400, now=clock())


@pytest.fixture
def on() -> Iterator[Callable[..., Verifier]]:
    """``on(engine, keys, clock, doc)``: a verifier of pricing ``doc``, closed after the test."""
    made: list[Verifier] = []

    def make(engine: Engine, keys: KeySource, clock: FakeClock, doc: dict[str, Any]
             ) -> Verifier:
        made.append(Verifier(keys=keys, pricing=PricingTable.from_document(doc),
                             engine=engine, clock=clock))
        return made[-1]

    yield make
    for verifier in made:
        verifier.close()


def outcomes(verifier: Verifier, token: IssuedToken, calls: int,
             tool: str = "search") -> list[str]:
    done = []
    for _ in range(calls):
        try:
            verifier.charge(token.token, tool, args={"n": next(CALLS)})
            done.append("ok")
        except BillingError as exc:
            done.append(exc.code)
    return done


def refusal(verifier: Verifier, token: IssuedToken, **args: Any) -> RateLimited:
    with pytest.raises(RateLimited) as refused:
        verifier.charge(token.token, "search", args=args or {"refused": True})
    return refused.value


def spent(engine: Engine, token: IssuedToken) -> int:
    with reading(engine) as conn:
        from mcpbill_cli.ledger.credit import show

        return show(conn, token.claims.jti, now=FakeClock()()).spent


def test_a_tokens_own_call_rate_refuses_the_call_past_it_until_the_window_ends(
        verifier: Verifier, rated: Mint, clock: FakeClock, funded: Engine) -> None:
    token = rated("3/s")
    clock.advance(0.25)
    assert outcomes(verifier, token, 5) == ["ok"] * 3 + ["RATE_LIMITED"] * 2
    refused = refusal(verifier, token)
    assert refused.to_dict() | {"message": ""} == {
        "code": "RATE_LIMITED", "message": "", "retryAfterMs": 750, "limit": "3/s",
        "kind": "calls", "window": "second", "scope": "token", "jti": token.claims.jti,
        "tool": "search"}
    assert spent(funded, token) == 3 * PRICE  # the refused calls moved no money
    clock.advance(0.75)  # the next second: a new window
    assert outcomes(verifier, token, 4) == ["ok"] * 3 + ["RATE_LIMITED"]


def test_retry_after_counts_down_to_the_end_of_the_minute(
        verifier: Verifier, rated: Mint, clock: FakeClock) -> None:
    token = rated("2/m")
    into_minute = clock().second
    clock.advance(0.5)
    assert outcomes(verifier, token, 2) == ["ok", "ok"]
    refused = refusal(verifier, token)
    assert refused.details["retryAfterMs"] == (60 - into_minute) * 1000 - 500
    assert refused.details["window"] == "minute"
    clock.advance(refused.details["retryAfterMs"] / 1000 - 0.001)
    refusal(verifier, token, again=1)  # a millisecond early: still refused
    clock.advance(0.001)
    assert outcomes(verifier, token, 1) == ["ok"]


def test_a_spend_rate_counts_what_calls_hold(
        verifier: Verifier, rated: Mint, clock: FakeClock) -> None:
    token = rated(spend=("0.025/m",))  # search costs 0.01: two fit, the third does not
    assert outcomes(verifier, token, 3) == ["ok", "ok", "RATE_LIMITED"]
    refused = refusal(verifier, token)
    assert (refused.details["kind"], refused.details["limit"]) == ("spend", "0.025/m")
    assert "0.025 USDC per minute" in refused.message
    assert outcomes(verifier, token, 1, tool="status") == ["ok"]  # free: nothing to count


def test_a_held_call_counts_as_its_hold(verifier: Verifier, rated: Mint) -> None:
    token = rated("1/s")
    hold = verifier.hold(token.token, "search", args={"n": 1})
    with pytest.raises(RateLimited):
        verifier.hold(token.token, "search", args={"n": 2})
    verifier.void(hold)  # a voided call passed every check: it still counted
    with pytest.raises(RateLimited):
        verifier.hold(token.token, "search", args={"n": 3})


def test_the_pricing_tables_limits_apply_to_every_token_and_a_tenant_replaces_them(
        funded: Engine, keys: KeySource, ring: KeyRing, clock: FakeClock,
        on: Callable[..., Verifier]) -> None:
    from mcpbill_cli.ledger.credit import fund_demo

    with writing(funded) as conn:
        fund_demo(conn, "beta", 5_000_000, now=clock())
    doc = limited_pricing(token_calls=["2/s"])
    doc["tenants"] = {"beta": {"limits": {"token_calls": "4/s"}}}
    verifier = on(funded, keys, clock, doc)
    acme, beta = (mint(funded, ring, now=clock(), tenant=t) for t in ("acme", "beta"))
    assert outcomes(verifier, acme, 3) == ["ok", "ok", "RATE_LIMITED"]
    assert outcomes(verifier, beta, 5) == ["ok"] * 4 + ["RATE_LIMITED"]
    # A token's own rate and the table's on one window: the lower wins.
    strict = mint_rated(funded, ring, clock, own_rates("1/s"))
    assert outcomes(verifier, strict, 2) == ["ok", "RATE_LIMITED"]


def test_an_agents_rate_holds_over_all_its_tokens(
        funded: Engine, keys: KeySource, ring: KeyRing, clock: FakeClock,
        on: Callable[..., Verifier]) -> None:
    verifier = on(funded, keys, clock, limited_pricing(agent_calls=["3/m"]))
    first, second = (mint(funded, ring, now=clock(), agent="looper") for _ in range(2))
    other = mint(funded, ring, now=clock(), agent="calm")
    assert outcomes(verifier, first, 2) == ["ok", "ok"]
    assert outcomes(verifier, second, 2) == ["ok", "RATE_LIMITED"]
    refused = refusal(verifier, second)
    assert (refused.details["scope"], refused.details["limit"]) == ("agent", "3/m")
    assert "agent looper" in refused.message
    assert outcomes(verifier, other, 3) == ["ok"] * 3  # another agent has its own count


def test_a_call_refused_for_its_budget_is_not_counted(
        verifier: Verifier, funded: Engine, ring: KeyRing, clock: FakeClock) -> None:
    from mcpbill_cli.ledger.credit import IssueRequest, issue

    request = IssueRequest(tenant="acme", agent="a", limit=PRICE, ttl=3600, scope=None,
                           audience="mcpbill", issuer="mcpbill", rates=own_rates("2/s"))
    with writing(funded) as conn:
        token = issue(conn, request, signer=ring.signing_key(), ttl_cap=86400, now=clock())
    assert outcomes(verifier, token, 1) == ["ok"]
    for n in range(3):  # over budget: refused before the rate, which they never reach
        with pytest.raises(BudgetExceeded):
            verifier.charge(token.token, "search", args={"broke": n})
    with reading(funded) as conn:
        assert _counters(conn) == [(1, PRICE)]


def _counters(conn: Any) -> list[tuple[int, int]]:
    return [(row.calls, row.spend) for row in conn.execute(
        select(rate_counters.c.calls, rate_counters.c.spend))]


def test_a_repeat_of_a_call_made_already_is_replayed_not_rate_limited(
        verifier: Verifier, rated: Mint) -> None:
    token = rated("1/s")
    first = verifier.charge(token.token, "search", args={"q": "same"}, idempotency_key="k1")
    again = verifier.charge(token.token, "search", args={"q": "same"}, idempotency_key="k1")
    assert again.receipt_id == first.receipt_id
    refusal(verifier, token, q="other")


def test_preflight_refuses_a_call_past_a_rate_as_its_hold_would_and_counts_nothing(
        verifier: Verifier, rated: Mint, clock: FakeClock, funded: Engine) -> None:
    """Preflight reads the rate limits before the balance, as the hold counts them first:
    a call past a rate is refused with the hold's very refusal, and no preflight, passed or
    refused, counts in a window."""
    token = rated("2/s")
    clock.advance(0.25)
    for _ in range(3):  # preflights count nowhere: the 2/s still has room for two calls
        assert verifier.preflight(token.token, "search").remaining == 1_000_000
    assert outcomes(verifier, token, 2) == ["ok", "ok"]
    with reading(funded) as conn:
        before = _counters(conn)
    with pytest.raises(RateLimited) as preflighted:
        verifier.preflight(token.token, "search")
    assert preflighted.value.to_dict() == refusal(verifier, token).to_dict()  # word for word
    assert preflighted.value.details["retryAfterMs"] == 750
    assert verifier.preflight(token.token, "status").price.free  # a free call counts in none
    with reading(funded) as conn:
        assert _counters(conn) == before
    clock.advance(0.75)  # the next second: a new window
    assert verifier.preflight(token.token, "search").remaining == 1_000_000 - 2 * PRICE

    spender = rated(spend=("0.025/m",))  # search costs 0.01: two fit, the third does not
    assert outcomes(verifier, spender, 2) == ["ok", "ok"]
    with pytest.raises(RateLimited) as over:
        verifier.preflight(spender.token, "search")
    assert over.value.to_dict() == refusal(verifier, spender).to_dict()
    assert over.value.details["kind"] == "spend"


def test_a_token_without_limits_never_touches_the_counter_table(
        verifier: Verifier, new_token: Mint, funded: Engine) -> None:
    with writing(funded) as conn:
        conn.execute(text("DROP TABLE rate_counters"))  # a statement on it would now fail
    token = new_token()
    assert outcomes(verifier, token, 3) == ["ok"] * 3
    hold = verifier.hold(token.token, "search", args={"held": True})
    verifier.capture(hold)


def test_rate_limited_refusals_are_counted_not_written_as_events(
        verifier: Verifier, rated: Mint, funded: Engine) -> None:
    from mcpbill_cli.ledger.models import events

    token = rated("1/s")
    outcomes(verifier, token, 4)
    with reading(funded) as conn:
        kinds = Counter(conn.execute(select(events.c.kind)).scalars())
    assert kinds["refusal"] == 0 and kinds["charge"] == 1
    verifier.seal()
    with reading(funded) as conn:
        from mcpbill_cli.ledger.models import refusal_counts

        total = conn.execute(select(func.sum(refusal_counts.c.count)).where(
            refusal_counts.c.code == "RATE_LIMITED")).scalar()
    assert total == 3


def test_the_background_writer_sweeps_windows_that_are_over(
        verifier: Verifier, rated: Mint, clock: FakeClock, funded: Engine) -> None:
    token = rated("5/s", "50/m")
    outcomes(verifier, token, 2)
    clock.advance(200)
    outcomes(verifier, token, 1)
    with reading(funded) as conn:
        assert len(_counters(conn)) == 4
    verifier.seal()  # a turn of the verifier's background writer
    with reading(funded) as conn:
        assert sorted(_counters(conn)) == [(1, PRICE), (1, PRICE)]  # this second, minute
    with writing(funded) as conn:
        assert rates.sweep(conn, now=clock()) == 0


@pytest.mark.slow
def test_a_burst_from_8_processes_never_passes_the_limit(
        funded: Engine, db_url: str, keys_dir: Path, ring: KeyRing, clock: FakeClock) -> None:
    token = mint_rated(funded, ring, clock, own_rates("20/m"))
    assert burst_outcomes(db_url, keys_dir, token, clock) == {"ok": 20, "RATE_LIMITED": 60}
    assert spent(funded, token) == 20 * PRICE


def burst_outcomes(db_url: str, keys_dir: Path, token: IssuedToken, clock: FakeClock,
                   **options: Any) -> Counter[str]:
    ctx = multiprocessing.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    workers = [ctx.Process(target=burst, args=(
        db_url, str(keys_dir), PRICING_DOC, token.token, clock().isoformat(), 10, ready, go,
        results), kwargs=options) for _ in range(8)]
    for worker in workers:
        worker.start()
    try:
        for _ in workers:
            assert ready.get(timeout=120) == "ready"
        go.set()
        total: Counter[str] = sum((Counter(results.get(timeout=120)) for _ in workers),
                                  Counter())
    finally:
        for worker in workers:
            worker.join(60)
    assert [worker.exitcode for worker in workers] == [0] * 8
    return total



def agents_apart(funded: Engine, ring: KeyRing, clock: FakeClock, prefix: str
                 ) -> tuple[IssuedToken, IssuedToken]:
    """Agent ``b/c`` of tenant ``<prefix>`` and agent ``c`` of tenant ``<prefix>/b``: two
    agents whose tenant and name, joined by a slash, read the same."""
    for tenant in (prefix, f"{prefix}/b"):
        fund(funded, tenant, 10 * USDC, now=clock())
    return (mint(funded, ring, now=clock(), tenant=prefix, agent="b/c"),
            mint(funded, ring, now=clock(), tenant=f"{prefix}/b", agent="c"))


def test_agents_of_two_tenants_never_share_a_rate_whatever_their_names(
        funded: Engine, keys: KeySource, ring: KeyRing, clock: FakeClock,
        on: Callable[..., Verifier]) -> None:
    verifier = on(funded, keys, clock, limited_pricing(agent_calls=["1/m"]))
    one, other = agents_apart(funded, ring, clock, "a")
    assert outcomes(verifier, one, 2) == ["ok", "RATE_LIMITED"]
    assert outcomes(verifier, other, 2) == ["ok", "RATE_LIMITED"]

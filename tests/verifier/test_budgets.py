"""Budgets over time: caps per UTC day and calendar month for a tenant, an agent and a token,
refused with the window, what is left and when it resets; days and months rolling over on the
verifier's clock; voids and partial captures giving back to the window of the hold; auto top-up
once per crossing. Every test runs on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from mcpbill_cli.errors import BudgetExceeded
from mcpbill_cli.keys import KeyRing, KeySource
from mcpbill_cli.ledger import alerts
from mcpbill_cli.ledger.credit import IssuedToken, IssueRequest, issue, show
from mcpbill_cli.ledger.engine import reading, writing
from mcpbill_cli.ledger.models import budget_spend, calls, events, transfers, webhook_events
from mcpbill_cli.ledger.topups import TokenTerms
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.reconcile import ReconcileOptions, Window, reconcile
from mcpbill_cli.verifier import Verifier

from .billing_support import PRICE, PRICING_DOC, USDC, FakeClock, fund, run_threads

END_OF_JANUARY = datetime(2031, 1, 31, 23, 50, tzinfo=UTC)
MID_MARCH = datetime(2031, 3, 14, 23, 50, tzinfo=UTC)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(END_OF_JANUARY)


def a_verifier(engine: Engine, keys: KeySource, clock: FakeClock,
               **tenant_terms: str) -> Verifier:
    doc = {**PRICING_DOC, "tenants": {"acme": tenant_terms} if tenant_terms else {}}
    return Verifier(keys=keys, pricing=PricingTable.from_document(doc), engine=engine,
                    clock=clock, hold_timeout=3600)


def a_token(engine: Engine, ring: KeyRing, clock: FakeClock, *, agent: str = "agent-1",
            limit: int = USDC, terms: TokenTerms | None = None) -> IssuedToken:
    request = IssueRequest(tenant="acme", agent=agent, limit=limit, ttl=3600, scope=None,
                           audience="mcpbill", issuer="mcpbill", terms=terms or TokenTerms())
    with writing(engine) as conn:
        return issue(conn, request, signer=ring.signing_key(), ttl_cap=86400, now=clock())


def refusal(verifier: Verifier, token: IssuedToken, n: int) -> dict[str, Any]:
    with pytest.raises(BudgetExceeded) as refused:
        verifier.charge(token.token, "search", args={"n": n})
    return refused.value.to_dict()


def charge(verifier: Verifier, token: IssuedToken, times: int, start: int = 0) -> None:
    for n in range(start, start + times):
        assert verifier.charge(token.token, "search", args={"n": n}).amount == PRICE


def spend_rows(engine: Engine) -> dict[tuple[str, str, str, str], int]:
    s = budget_spend.c
    with reading(engine) as conn:
        rows = conn.execute(select(s.scope, s.subject, s.period, s.period_start, s.amount))
        return {(r.scope, r.subject, r.period, r.period_start): r.amount for r in rows}


def test_a_tenant_daily_cap_refuses_with_its_window_and_resets_at_utc_midnight(
        funded: Engine, keys: KeySource, ring: KeyRing, clock: FakeClock) -> None:
    clock.now = MID_MARCH
    verifier = a_verifier(funded, keys, clock, daily_cap="0.02")
    token = a_token(funded, ring, clock)
    charge(verifier, token, 2)
    details = refusal(verifier, token, 2)
    assert {k: details[k] for k in ("code", "reason", "scope", "window", "capUsd",
                                    "remainingUsd", "resetsAt", "priceUsd", "shortfallUsd",
                                    "dailyCapUsd")} == {
        "code": "BUDGET_EXCEEDED", "reason": "daily_cap", "scope": "tenant", "window": "day",
        "capUsd": "0.02", "remainingUsd": "0.00", "resetsAt": "2031-03-15T00:00:00.000000Z",
        "priceUsd": "0.01", "shortfallUsd": "0.01", "dailyCapUsd": "0.02"}
    assert "fallback" in details and "daily cap of 0.02" in details["message"]

    clock.advance(9 * 60)  # 23:59, the same day
    assert refusal(verifier, token, 3)["window"] == "day"
    clock.advance(60)  # 00:00 the next day: a new window
    charge(verifier, token, 2, start=4)
    assert refusal(verifier, token, 6)["resetsAt"] == "2031-03-16T00:00:00.000000Z"


def test_a_tenant_monthly_cap_outlasts_the_day_and_resets_with_the_month(
        funded: Engine, keys: KeySource, ring: KeyRing, clock: FakeClock) -> None:
    clock.now = END_OF_JANUARY - timedelta(days=1)
    verifier = a_verifier(funded, keys, clock, daily_cap="0.02", monthly_cap="0.03")
    token = a_token(funded, ring, clock)
    charge(verifier, token, 2)
    clock.advance(20 * 60)  # January 31st: the day reset, the month did not
    charge(verifier, token, 1, start=2)
    details = refusal(verifier, token, 3)
    assert (details["reason"], details["scope"], details["window"], details["capUsd"],
            details["remainingUsd"], details["resetsAt"], details["monthlyCapUsd"]) == (
        "monthly_cap", "tenant", "month", "0.03", "0.00", "2031-02-01T00:00:00.000000Z", "0.03")

    clock.now = END_OF_JANUARY + timedelta(minutes=10)  # February 1st, 00:00
    token = a_token(funded, ring, clock)
    charge(verifier, token, 2, start=4)
    assert refusal(verifier, token, 6)["window"] == "day"
    assert spend_rows(funded) == {
        ("tenant", "", "day", "2031-01-30"): 20_000, ("tenant", "", "day", "2031-01-31"): 10_000,
        ("tenant", "", "month", "2031-01-01"): 30_000,
        ("tenant", "", "day", "2031-02-01"): 20_000,
        ("tenant", "", "month", "2031-02-01"): 20_000}


def test_an_agent_cap_spans_the_agents_tokens_and_no_other_agent(
        funded: Engine, keys: KeySource, ring: KeyRing, clock: FakeClock) -> None:
    verifier = a_verifier(funded, keys, clock, agent_daily_cap="0.02",
                          agent_monthly_cap="0.05")
    first, second = a_token(funded, ring, clock), a_token(funded, ring, clock)
    charge(verifier, first, 1)
    charge(verifier, second, 1, start=1)
    details = refusal(verifier, first, 2)
    assert (details["scope"], details["window"], details["capUsd"], details["resetsAt"]) == (
        "agent", "day", "0.02", "2031-02-01T00:00:00.000000Z")
    assert "agent agent-1 of tenant acme" in details["message"]
    charge(verifier, a_token(funded, ring, clock, agent="agent-2"), 2, start=3)


def test_a_tokens_own_caps_refuse_by_day_then_by_month(
        funded: Engine, keys: KeySource, ring: KeyRing, clock: FakeClock) -> None:
    clock.now = END_OF_JANUARY - timedelta(days=1)
    verifier = a_verifier(funded, keys, clock)
    capped = a_token(funded, ring, clock, terms=TokenTerms(daily_cap=20_000, monthly_cap=30_000))
    other = a_token(funded, ring, clock)
    charge(verifier, capped, 2)
    details = refusal(verifier, capped, 2)
    assert (details["scope"], details["window"], details["remainingUsd"]) == (
        "token", "day", "0.00")
    assert details["jti"] == capped.claims.jti
    charge(verifier, other, 3, start=3)  # another token of the same agent: not capped
    clock.advance(20 * 60)
    charge(verifier, capped, 1, start=6)
    details = refusal(verifier, capped, 7)
    assert (details["scope"], details["window"], details["capUsd"], details["resetsAt"]) == (
        "token", "month", "0.03", "2031-02-01T00:00:00.000000Z")


@pytest.mark.parametrize("scope", ["tenant", "agent", "token"])
def test_preflight_refuses_a_call_past_a_cap_as_its_hold_would_and_writes_nothing(
        funded: Engine, keys: KeySource, ring: KeyRing, clock: FakeClock, scope: str) -> None:
    """A capped token preflights OK while its cap has room for the price, then is refused
    with the very refusal its hold gets; a token the cap does not cover preflights OK; no
    preflight, OK or refused, writes a spend, a transfer or a call."""
    caps = {"tenant": {"daily_cap": "0.025"}, "agent": {"agent_monthly_cap": "0.025"}}
    verifier = a_verifier(funded, keys, clock, **caps.get(scope, {}))
    capped = a_token(funded, ring, clock, terms=TokenTerms(daily_cap=25_000)
                     if scope == "token" else None)
    other = a_token(funded, ring, clock, agent="agent-2")  # under the tenant's cap alone
    for n in range(2):
        assert verifier.preflight(capped.token, "search").remaining == USDC - n * PRICE
        charge(verifier, capped, 1, start=n)
    before = ledger_writes(funded)

    with pytest.raises(BudgetExceeded) as preflighted:
        verifier.preflight(capped.token, "search")
    assert ledger_writes(funded) == before
    details = preflighted.value.to_dict()
    assert details == refusal(verifier, capped, 2)  # the hold's, word for word
    assert (details["scope"], details["window"], details["remainingUsd"],
            details["resetsAt"]) == (scope, "month" if scope == "agent" else "day", "0.005",
                                     "2031-02-01T00:00:00.000000Z")
    if scope == "tenant":
        with pytest.raises(BudgetExceeded):
            verifier.preflight(other.token, "search")
    else:
        assert verifier.preflight(other.token, "search").remaining == USDC
    assert verifier.preflight(capped.token, "status").price.free  # a free call counts in none
    assert ledger_writes(funded) == before


def ledger_writes(engine: Engine) -> tuple[Any, ...]:
    """What a call writes: budget windows, transfers and call rows."""
    with reading(engine) as conn:
        return (spend_rows(engine), conn.scalar(select(func.count()).select_from(transfers)),
                conn.scalar(select(func.count()).select_from(calls)))


def test_a_void_gives_back_to_the_day_of_the_hold_not_to_today(
        funded: Engine, keys: KeySource, ring: KeyRing, clock: FakeClock) -> None:
    clock.now = MID_MARCH
    verifier = a_verifier(funded, keys, clock, daily_cap="0.02")
    token = a_token(funded, ring, clock)
    hold = verifier.hold(token.token, "search", args={"held": 1})
    charge(verifier, token, 1)
    assert refusal(verifier, token, 1)["remainingUsd"] == "0.00"
    clock.advance(20 * 60)  # the next day
    charge(verifier, token, 1, start=2)
    verifier.void(hold)
    assert spend_rows(funded) == {("tenant", "", "day", "2031-03-14"): PRICE,
                                  ("tenant", "", "day", "2031-03-15"): PRICE}
    charge(verifier, token, 1, start=3)
    assert refusal(verifier, token, 4)["remainingUsd"] == "0.00"


def test_a_partial_capture_gives_the_unused_hold_back_to_every_window(
        funded: Engine, keys: KeySource, ring: KeyRing, clock: FakeClock) -> None:
    verifier = a_verifier(funded, keys, clock, daily_cap="1.00", monthly_cap="2.00")
    token = a_token(funded, ring, clock, terms=TokenTerms(monthly_cap=600_000))
    hold = verifier.hold(token.token, "summarize", args={"text": "x"})
    assert set(spend_rows(funded).values()) == {500_000}
    clock.advance(20 * 60)  # February: the capture's windows are not the hold's
    assert verifier.capture(hold, units=1000).amount == 10_000
    assert spend_rows(funded) == {
        ("tenant", "", "day", "2031-01-31"): 10_000,
        ("tenant", "", "month", "2031-01-01"): 10_000,
        ("token", token.claims.jti, "month", "2031-01-01"): 10_000}


def test_a_refund_gives_back_to_the_windows_the_call_was_counted_in(
        funded: Engine, keys: KeySource, ring: KeyRing, clock: FakeClock) -> None:
    """What is refunded was not spent: a full cap has room again for it, and a refund made
    the next day goes back to the day of the call, not to today."""
    clock.now = MID_MARCH
    verifier = a_verifier(funded, keys, clock, daily_cap="0.02", agent_monthly_cap="0.05")
    token = a_token(funded, ring, clock)
    first = verifier.charge(token.token, "search", args={"n": 0})
    second = verifier.charge(token.token, "search", args={"n": 1})
    assert refusal(verifier, token, 2)["remainingUsd"] == "0.00"
    verifier.refund(first.receipt_id, amount=PRICE // 2)
    assert refusal(verifier, token, 3)["remainingUsd"] == "0.005"  # half back: not a call
    verifier.refund(first.receipt_id)  # the rest: room for one call
    charge(verifier, token, 1, start=4)
    assert refusal(verifier, token, 5)["remainingUsd"] == "0.00"
    clock.advance(20 * 60)  # the next day
    verifier.refund(second.receipt_id)
    assert spend_rows(funded) == {("tenant", "", "day", "2031-03-14"): PRICE,
                                  ("agent", "agent-1", "month", "2031-03-01"): PRICE}
    assert_reconciles(funded, clock, verifier)
    verifier.close()


def topups_of(engine: Engine, jti: str) -> list[int]:
    with reading(engine) as conn:
        rows = conn.execute(select(events.c.amount, events.c.detail).where(
            events.c.kind == "topup", events.c.jti == jti).order_by(events.c.id)).all()
    assert all(json.loads(r.detail) == {"auto": True} for r in rows)
    return [r.amount for r in rows]


def assert_reconciles(engine: Engine, clock: FakeClock, verifier: Verifier) -> None:
    verifier.seal()
    report = reconcile(engine, ReconcileOptions(window=Window(
        clock() - timedelta(days=3), clock() + timedelta(hours=1)), now=clock()))
    assert report.findings == ()


def test_auto_topup_happens_once_per_crossing(
        funded: Engine, keys: KeySource, ring: KeyRing, clock: FakeClock) -> None:
    verifier = a_verifier(funded, keys, clock)
    token = a_token(funded, ring, clock, limit=100_000,
                    terms=TokenTerms(topup_below=50_000, topup_to=100_000))
    charge(verifier, token, 5)  # 0.05 left: not under the threshold
    assert topups_of(funded, token.claims.jti) == []
    receipt = verifier.charge(token.token, "search", args={"n": 5})
    assert receipt.remaining == 40_000  # what the capture left, before the top-up
    assert topups_of(funded, token.claims.jti) == [60_000]
    with reading(funded) as conn:
        view = show(conn, token.claims.jti, now=clock())
    assert (view.remaining, view.limit, view.spent) == (100_000, 160_000, 60_000)
    charge(verifier, token, 6, start=6)
    assert topups_of(funded, token.claims.jti) == [60_000, 60_000]
    assert_reconciles(funded, clock, verifier)


def test_an_auto_topup_that_takes_the_tenant_under_its_alert_amount_alerts(
        engine: Engine, keys: KeySource, ring: KeyRing, clock: FakeClock) -> None:
    """The tenant's balance falls through a top-up made for a capture, not only through
    `token issue` and `token topup`: its ``tenant.balance_low`` alert fires all the same."""
    fund(engine, "acme", 200_000, now=clock())
    with writing(engine) as conn:
        alerts.set_tenant_alert(conn, "acme", 80_000)
    verifier = a_verifier(engine, keys, clock)
    token = a_token(engine, ring, clock, limit=100_000,
                    terms=TokenTerms(topup_below=50_000, topup_to=100_000))
    charge(verifier, token, 6)  # the tenant: 0.10 left after issue, 0.04 after the top-up
    assert topups_of(engine, token.claims.jti) == [60_000]
    low = [json.loads(payload) for payload in _outbox_payloads(engine, "tenant.balance_low")]
    assert [(e["data"]["tenant"], e["data"]["available_usd"]) for e in low] == [
        ("acme", "0.04")]


def _outbox_payloads(engine: Engine, kind: str) -> list[str]:
    with reading(engine) as conn:
        return list(conn.execute(select(webhook_events.c.payload)
                                 .where(webhook_events.c.type == kind)).scalars())


def test_auto_topup_is_bounded_by_what_the_tenant_has_and_its_caps(
        engine: Engine, keys: KeySource, ring: KeyRing, clock: FakeClock) -> None:
    fund(engine, "acme", 150_000, now=clock())
    verifier = a_verifier(engine, keys, clock, daily_cap="0.09")
    token = a_token(engine, ring, clock, limit=100_000,
                    terms=TokenTerms(topup_below=50_000, topup_to=100_000))
    charge(verifier, token, 6)
    assert topups_of(engine, token.claims.jti) == [30_000]  # the day's cap leaves 0.03
    charge(verifier, token, 3, start=6)  # the cap reached: nothing more to top up with
    assert topups_of(engine, token.claims.jti) == [30_000]
    clock.advance(20 * 60)  # a new day; the tenant has 0.02 left, and gives a new token 0.01
    charge(verifier, a_token(engine, ring, clock, limit=10_000), 1, start=9)
    token_again = verifier.charge(token.token, "search", args={"n": 10})
    assert token_again.remaining == 30_000
    assert topups_of(engine, token.claims.jti) == [30_000, 10_000]
    assert_reconciles(engine, clock, verifier)


def test_auto_topup_under_concurrent_captures_never_tops_up_twice(
        funded: Engine, keys: KeySource, ring: KeyRing, clock: FakeClock) -> None:
    verifier = a_verifier(funded, keys, clock)
    token = a_token(funded, ring, clock, limit=100_000,
                    terms=TokenTerms(topup_below=50_000, topup_to=100_000))
    outcomes: Counter[str] = Counter()

    def calls(thread: int) -> None:
        for n in range(10):
            try:
                verifier.charge(token.token, "search", args={"t": thread, "n": n})
                outcomes["ok"] += 1
            except BudgetExceeded:
                outcomes["refused"] += 1

    run_threads(8, calls, indexed=True)
    topped = topups_of(funded, token.claims.jti)
    with reading(funded) as conn:
        view = show(conn, token.claims.jti, now=clock())
        moved = conn.execute(select(func.coalesce(func.sum(transfers.c.amount), 0)).where(
            transfers.c.code == "topup")).scalar_one()
    assert sum(topped) == moved and view.limit == 100_000 + moved
    assert view.spent == outcomes["ok"] * PRICE and sum(outcomes.values()) == 80
    # A second top-up of one crossing would lift the token past its target.
    assert view.remaining <= 100_000
    assert topped and all(50_000 < amount <= 100_000 for amount in topped)
    assert len(topped) <= view.spent // 50_000 + 1
    assert_reconciles(funded, clock, verifier)


def test_caps_from_pricing_need_only_the_rows_of_caps_that_are_set(
        funded: Engine, keys: KeySource, ring: KeyRing, clock: FakeClock) -> None:
    charge(a_verifier(funded, keys, clock), a_token(funded, ring, clock), 3)
    assert spend_rows(funded) == {}



def test_a_tenant_or_agent_cap_reached_alerts_once_per_window_a_tokens_does_not(
        funded: Engine, keys: KeySource, ring: KeyRing, clock: FakeClock) -> None:
    from tests.webhooks.conftest import emitted

    verifier = a_verifier(funded, keys, clock, agent_monthly_cap="0.02")
    token = a_token(funded, ring, clock)
    charge(verifier, token, 2)
    for n in range(2, 4):
        refusal(verifier, token, n)
    own = a_token(funded, ring, clock, agent="agent-2", terms=TokenTerms(daily_cap=PRICE))
    charge(verifier, own, 1, start=4)
    assert refusal(verifier, own, 5)["scope"] == "token"
    [event] = emitted(funded, "cap.reached")
    assert event["data"] == {"tenant": "acme", "agent": "agent-1", "window": "month",
                             "period": "2031-01-01", "cap_usd": "0.02", "spent_usd": "0.02"}


@pytest.mark.parametrize("who", ["the same token", "another agent's token"])
def test_holds_a_dead_server_left_past_their_timeout_do_not_keep_a_cap_full(
        funded: Engine, keys: KeySource, ring: KeyRing, clock: FakeClock, who: str) -> None:
    """A server killed mid-call leaves its holds counted in the tenant's day. Once they are
    past their timeout they bill nothing, so they must not refuse the tenant's next call."""
    clock.now = MID_MARCH
    dead = a_verifier(funded, keys, clock, daily_cap="0.02")
    first = a_token(funded, ring, clock)
    stale = [dead.hold(first.token, "search", args={"n": n}) for n in range(2)]  # then killed
    verifier = a_verifier(funded, keys, clock, daily_cap="0.02")
    token = first if who == "the same token" else a_token(funded, ring, clock, agent="agent-2")
    assert refusal(verifier, token, 2)["reason"] == "daily_cap"  # the holds are still live
    clock.advance(3600)  # the holds' timeout
    charge(verifier, token, 2, start=3)
    assert refusal(verifier, token, 5)["reason"] == "daily_cap"  # the cap itself still holds
    with reading(funded) as conn:
        statuses = dict(conn.execute(select(calls.c.id, calls.c.status)
                                     .where(calls.c.id.in_([h.id for h in stale]))).all())
    assert statuses == {hold.id: "expired" for hold in stale}
    with reading(funded) as conn:
        assert show(conn, token.claims.jti, now=clock()).spent == 2 * PRICE

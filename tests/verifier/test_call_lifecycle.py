"""Hold, capture, void and timeouts: charge only on success, and a stale hold gives money back."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine, select

from mcpbill_cli.errors import BillingError
from mcpbill_cli.ledger.credit import IssuedToken, show
from mcpbill_cli.ledger.engine import reading
from mcpbill_cli.ledger.models import calls, events
from mcpbill_cli.verifier import Hold, Quote, Verifier

from .billing_support import PRICE, USDC, FakeClock
from .invariants import assert_ledger_invariants

TIMEOUT = 300


class ToolError(Exception):
    """What a tool raises when it fails."""


def state(engine: Engine, token: IssuedToken, clock: FakeClock) -> tuple[int, int, int]:
    """(spent, held, remaining) of ``token``, after checking every ledger invariant."""
    with reading(engine) as conn:
        view = show(conn, token.claims.jti, now=clock())
        assert_ledger_invariants(conn)
    return view.spent, view.held, view.remaining


def call_status(engine: Engine, call_id: str) -> str:
    with reading(engine) as conn:
        return str(conn.execute(select(calls.c.status).where(calls.c.id == call_id)).scalar_one())


def trail(engine: Engine, ref: str) -> list[tuple[str, int | None]]:
    with reading(engine) as conn:
        rows = conn.execute(select(events.c.kind, events.c.amount).where(events.c.ref == ref)
                            .order_by(events.c.id)).all()
    return [(kind, amount) for kind, amount in rows]


def refusal(call: Callable[[], Any]) -> dict[str, Any]:
    with pytest.raises(BillingError) as refused:
        call()
    return refused.value.to_dict()


@pytest.mark.parametrize("failure", [ToolError("the tool broke"), KeyboardInterrupt()])
def test_tool_that_raises_is_voided_and_the_exception_propagates(
        funded: Engine, verifier: Verifier, new_token: Callable[..., IssuedToken],
        clock: FakeClock, failure: BaseException) -> None:
    token = new_token(limit=USDC)
    with pytest.raises(type(failure)) as raised:
        with verifier.call(token.token, "search", args={"q": "x"}) as billed:
            assert state(funded, token, clock) == (0, PRICE, USDC - PRICE)
            raise failure
    assert raised.value is failure
    assert billed.receipt is None
    assert state(funded, token, clock) == (0, 0, USDC)
    assert call_status(funded, billed.hold.id) == "voided"
    assert trail(funded, billed.hold.id) == [("hold", PRICE), ("void", PRICE)]
    assert verifier.receipt_for(billed.hold.idempotency_key) is None


def test_successful_block_is_captured_once(funded: Engine, verifier: Verifier,
                                           new_token: Callable[..., IssuedToken],
                                           clock: FakeClock) -> None:
    token = new_token(limit=USDC)
    with verifier.call(token.token, "search") as billed:
        pass
    assert billed.receipt is not None and billed.receipt.amount == PRICE
    assert state(funded, token, clock) == (PRICE, 0, USDC - PRICE)
    assert trail(funded, billed.hold.id) == [("hold", PRICE), ("capture", PRICE)]
    assert verifier.capture(billed.hold).jws == billed.receipt.jws  # capturing again: same
    assert refusal(lambda: verifier.void(billed.hold))["code"] == "HOLD_NOT_ACTIVE"
    assert state(funded, token, clock) == (PRICE, 0, USDC - PRICE)


def test_void_twice_is_a_no_op_and_capture_after_void_is_refused(
        funded: Engine, verifier: Verifier, new_token: Callable[..., IssuedToken],
        clock: FakeClock) -> None:
    token = new_token(limit=USDC)
    hold = verifier.hold(token.token, "search")
    verifier.void(hold)
    verifier.void(hold)
    refused = refusal(lambda: verifier.capture(hold))
    assert (refused["code"], refused["state"]) == ("HOLD_NOT_ACTIVE", "voided")
    assert state(funded, token, clock) == (0, 0, USDC)
    assert trail(funded, hold.id) == [("hold", PRICE), ("void", PRICE), ("refusal", None)]


def test_hold_past_its_timeout_is_voided_by_the_sweep(
        funded: Engine, verifier: Verifier, new_token: Callable[..., IssuedToken],
        clock: FakeClock) -> None:
    token = new_token(limit=2 * PRICE)
    hold = verifier.hold(token.token, "search")
    clock.advance(TIMEOUT - 1)
    assert verifier.sweep_expired() == 0
    assert state(funded, token, clock) == (0, PRICE, PRICE)
    clock.advance(1)
    assert verifier.sweep_expired() == 1
    assert verifier.sweep_expired() == 0
    assert state(funded, token, clock) == (0, 0, 2 * PRICE)
    assert call_status(funded, hold.id) == "expired"
    assert trail(funded, hold.id) == [("hold", PRICE), ("expire", PRICE)]
    # The amount is available again: two calls fit.
    verifier.charge(token.token, "search", args={"q": 1})
    verifier.charge(token.token, "search", args={"q": 2})
    assert state(funded, token, clock) == (2 * PRICE, 0, 0)


@pytest.mark.parametrize("next_call", ["hold", "charge"])
def test_stale_hold_is_voided_lazily_when_the_next_call_needs_the_money(
        funded: Engine, verifier: Verifier, new_token: Callable[..., IssuedToken],
        clock: FakeClock, next_call: str) -> None:
    token = new_token(limit=PRICE)
    stale = verifier.hold(token.token, "search")
    refused = refusal(lambda: getattr(verifier, next_call)(token.token, "search", args={"q": 1}))
    assert (refused["code"], refused["remainingUsd"]) == ("BUDGET_EXCEEDED", "0.00")
    clock.advance(TIMEOUT)
    getattr(verifier, next_call)(token.token, "search", args={"q": 1})  # no sweep ran
    assert call_status(funded, stale.id) == "expired"
    held = PRICE if next_call == "hold" else 0
    assert state(funded, token, clock) == (PRICE - held, held, 0)


def test_preflight_counts_a_timed_out_hold_as_available(
        funded: Engine, verifier: Verifier, new_token: Callable[..., IssuedToken],
        clock: FakeClock) -> None:
    """A hold past its timeout has voided itself: preflight must not refuse for it when the
    hold that follows would succeed (it expires stale holds lazily)."""
    token = new_token(limit=PRICE)
    verifier.hold(token.token, "search")
    clock.advance(TIMEOUT)
    assert verifier.preflight(token.token, "search").remaining == PRICE
    verifier.hold(token.token, "search", args={"q": 1})


def test_capture_after_the_timeout_is_refused(
        funded: Engine, verifier: Verifier, new_token: Callable[..., IssuedToken],
        clock: FakeClock) -> None:
    token = new_token(limit=USDC)
    hold = verifier.hold(token.token, "search")
    clock.advance(TIMEOUT)
    refused = refusal(lambda: verifier.capture(hold))
    assert (refused["code"], refused["state"], refused["hold"]) == (
        "HOLD_NOT_ACTIVE", "timed out", hold.id)
    assert call_status(funded, hold.id) == "expired"  # released by the refused capture
    assert verifier.sweep_expired() == 0
    refused = refusal(lambda: verifier.capture(hold))
    assert (refused["code"], refused["state"]) == ("HOLD_NOT_ACTIVE", "expired")
    assert state(funded, token, clock) == (0, 0, USDC)
    assert verifier.receipt_for(hold.id) is None
    with reading(funded) as conn:
        codes = conn.execute(select(events.c.code).where(
            events.c.kind == "refusal", events.c.jti == token.claims.jti)).scalars().all()
    assert codes == ["HOLD_NOT_ACTIVE", "HOLD_NOT_ACTIVE"]


@pytest.mark.parametrize("swept", [False, True])
def test_tool_that_raises_after_its_hold_timed_out_still_propagates(
        funded: Engine, verifier: Verifier, new_token: Callable[..., IssuedToken],
        clock: FakeClock, swept: bool) -> None:
    """The tool's own exception reaches the server, not HOLD_NOT_ACTIVE from the void."""
    token = new_token(limit=USDC)
    failure = ToolError("slow and broken")
    with pytest.raises(ToolError) as raised:
        with verifier.call(token.token, "search") as billed:
            clock.advance(TIMEOUT + 1)
            if swept:
                assert verifier.sweep_expired() == 1
            raise failure
    assert raised.value is failure
    verifier.sweep_expired()
    assert state(funded, token, clock) == (0, 0, USDC)
    assert call_status(funded, billed.hold.id) in ("voided", "expired")


def test_partial_capture_of_a_per_unit_tool_returns_the_rest(
        funded: Engine, verifier: Verifier, new_token: Callable[..., IssuedToken],
        clock: FakeClock) -> None:
    token = new_token(limit=USDC)
    with verifier.call(token.token, "summarize") as billed:
        assert billed.hold.amount == 500_000  # max_price is what a call holds
        assert state(funded, token, clock) == (0, 500_000, 500_000)
        billed.report_units(1234)
    assert billed.receipt is not None
    assert (billed.receipt.amount, billed.receipt.remaining) == (12_340, USDC - 12_340)
    assert state(funded, token, clock) == (12_340, 0, USDC - 12_340)
    assert trail(funded, billed.hold.id) == [("hold", 500_000), ("capture", 12_340)]

    capped = verifier.hold(token.token, "summarize", max_units=20_000)
    assert capped.amount == 200_000
    assert verifier.capture(capped, units=30_000).amount == 200_000  # never above the hold
    nothing = verifier.hold(token.token, "summarize", max_units=1_000)
    receipt = verifier.capture(nothing, units=0)
    assert (receipt.amount, receipt.claims["amountUsd"]) == (0, "0.00")
    assert state(funded, token, clock) == (212_340, 0, USDC - 212_340)


@pytest.mark.parametrize("units", [-1, 1.5, True, 2**63])
def test_units_a_per_unit_price_cannot_take_void_the_call_and_free_its_money(
        funded: Engine, verifier: Verifier, new_token: Callable[..., IssuedToken],
        clock: FakeClock, units: Any) -> None:
    token = new_token(limit=USDC)
    refused = refusal(lambda: _report(verifier, token, units))
    assert (refused["code"], refused["field"]) == ("INVALID_INPUT", "units")
    assert state(funded, token, clock) == (0, 0, USDC)  # nothing held till the timeout
    retry = refusal(lambda: verifier.hold(token.token, "summarize", idempotency_key="k"))
    assert (retry["code"], retry["status"]) == ("CALL_FAILED", "voided")  # not in progress

    verifier._keeper.close()  # its thread stays out of the way: this test extends by hand
    hold = verifier.hold(token.token, "summarize", max_units=1_000)
    verifier.keep_alive(hold)
    bad = refusal(lambda: verifier.capture(hold, units=units))
    assert bad["code"] == "INVALID_INPUT"
    clock.advance(TIMEOUT * 0.6)
    assert verifier._keeper.extend_due() == 1  # still kept alive: the capture wrote nothing
    assert call_status(funded, hold.id) == "held"
    assert verifier.capture(hold, units=10).amount == 100  # the hold is as it was
    assert state(funded, token, clock) == (100, 0, USDC - 100)


def _report(verifier: Verifier, token: IssuedToken, units: Any) -> None:
    with verifier.call(token.token, "summarize", idempotency_key="k") as billed:
        billed.report_units(units)


def test_per_unit_hold_that_does_not_fit_asks_for_fewer_units(
        funded: Engine, verifier: Verifier, new_token: Callable[..., IssuedToken],
        clock: FakeClock) -> None:
    token = new_token(limit=3 * PRICE)
    refused = refusal(lambda: verifier.hold(token.token, "summarize"))
    assert (refused["code"], refused["priceUsd"], refused["shortfallUsd"]) == (
        "BUDGET_EXCEEDED", "0.50", "0.47")
    hold = verifier.hold(token.token, "summarize", max_units=2_000)
    assert verifier.capture(hold, units=1_500).amount == 15_000
    assert state(funded, token, clock) == (15_000, 0, 15_000)


@pytest.mark.parametrize("ending", ["void", "expire"])
def test_a_failed_call_stays_failed(funded: Engine, verifier: Verifier,
                                    new_token: Callable[..., IssuedToken], clock: FakeClock,
                                    ending: str) -> None:
    token = new_token(limit=USDC)
    hold = verifier.hold(token.token, "search", idempotency_key="once")
    if ending == "void":
        verifier.void(hold)
    else:
        clock.advance(TIMEOUT)
        assert verifier.sweep_expired() == 1
    status = "voided" if ending == "void" else "expired"
    for retry in (verifier.hold, verifier.charge):
        refused = refusal(lambda r=retry: r(token.token, "search", idempotency_key="once"))
        assert (refused["code"], refused["status"], refused["idempotencyKey"]) == (
            "CALL_FAILED", status, "once")
    assert state(funded, token, clock) == (0, 0, USDC)


def test_every_step_is_in_the_audit_trail(funded: Engine, verifier: Verifier,
                                          new_token: Callable[..., IssuedToken],
                                          clock: FakeClock) -> None:
    token = new_token(limit=PRICE, agent="agent-7")
    receipt = verifier.charge(token.token, "search")
    refusal(lambda: verifier.charge(token.token, "search", args={"q": 2}))
    refusal(lambda: verifier.hold(token.token, "translate"))
    with reading(funded) as conn:
        rows = conn.execute(select(events).where(events.c.jti == token.claims.jti)
                            .order_by(events.c.id)).mappings().all()
    seen = [(r["kind"], r["code"], r["tool"], r["amount"], r["agent"], r["tenant"])
            for r in rows]
    assert seen == [
        ("issue", None, None, PRICE, "agent-7", "acme"),
        ("charge", None, "search", PRICE, "agent-7", "acme"),
        ("refusal", "BUDGET_EXCEEDED", "search", None, "agent-7", "acme"),
        ("refusal", "BUDGET_EXCEEDED", "translate", None, "agent-7", "acme"),
    ]
    assert rows[1]["ref"] == receipt.receipt_id
    assert all(r["at"] is not None and r["token_hash"] is None for r in rows)


@pytest.mark.slow
def test_sweep_voids_every_hold_past_its_timeout(
        funded: Engine, verifier: Verifier, new_token: Callable[..., IssuedToken],
        clock: FakeClock) -> None:
    """``sweep_expired`` promises every stale hold, not the first batch of them."""
    token = new_token(limit=USDC)
    count = 501
    for n in range(count):
        verifier.hold(token.token, "status", args={"n": n})  # free: still a pending hold
    clock.advance(TIMEOUT)
    assert verifier.sweep_expired() == count
    assert verifier.sweep_expired() == 0


def test_begin_holds_a_paid_call_and_only_preflights_a_free_one(
        funded: Engine, verifier: Verifier, new_token: Callable[..., IssuedToken],
        clock: FakeClock) -> None:
    token = new_token(limit=USDC)
    free = verifier.begin(token.token, "status", args={})
    assert isinstance(free, Quote) and free.price.free
    paid = verifier.begin(token.token, "search", args={"q": "x"})
    assert isinstance(paid, Hold)
    assert state(funded, token, clock) == (0, PRICE, USDC - PRICE)
    assert trail(funded, paid.id) == [("hold", PRICE)]
    receipt = verifier.capture(paid)
    assert receipt.amount == PRICE
    again = verifier.begin(token.token, "search", args={"q": "x"})
    assert isinstance(again, Hold) and again.replayed == receipt
    with reading(funded) as conn:  # the free call left no call row: nothing to reconcile
        assert conn.execute(select(calls.c.tool)).scalars().all() == ["search"]


@pytest.mark.parametrize(("tool", "limit", "code"), [
    ("translate", USDC, "SCOPE_DENIED"), ("search", PRICE - 1, "BUDGET_EXCEEDED"),
    ("status", USDC, "SCOPE_DENIED")])
def test_begin_refuses_like_hold_and_records_the_refusal_once(
        funded: Engine, verifier: Verifier, new_token: Callable[..., IssuedToken],
        tool: str, limit: int, code: str) -> None:
    token = new_token(limit=limit, scope=["search"])
    assert refusal(lambda: verifier.begin(token.token, tool))["code"] == code
    with reading(funded) as conn:
        codes = conn.execute(select(events.c.code).where(events.c.kind == "refusal")
                             ).scalars().all()
    assert codes == [code]

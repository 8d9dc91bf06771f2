"""A paid call runs once and is billed once: replays, keys per tenant, calls in flight, derived
keys and their dedupe window. One test per way it leaked before, named after it."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from mcpbill_cli.errors import BillingError, DuplicateCall
from mcpbill_cli.keys import KeyRing, KeySource
from mcpbill_cli.ledger.credit import IssuedToken, revoke, show, sweep
from mcpbill_cli.ledger.engine import reading, writing
from mcpbill_cli.ledger.models import calls, events
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.verifier import Hold, Verifier, canonical_json

from .billing_support import PRICE, PRICING_DOC, USDC, FakeClock, fund, mint
from .invariants import assert_ledger_invariants

NewToken = Callable[..., IssuedToken]


def refusal(call: Callable[[], Any]) -> dict[str, Any]:
    with pytest.raises(BillingError) as refused:
        call()
    return refused.value.to_dict()


def spent(engine: Engine, token: IssuedToken, clock: FakeClock) -> tuple[int, int]:
    """(spent, held) of ``token``, the ledger's invariants checked."""
    with reading(engine) as conn:
        view = show(conn, token.claims.jti, now=clock())
        assert_ledger_invariants(conn)
    return view.spent, view.held


def call_rows(engine: Engine) -> int:
    with reading(engine) as conn:
        return int(conn.execute(select(func.count()).select_from(calls)).scalar_one())


# --- 1. a replay outlives neither revocation nor anything but the budget ------------------


def test_a_replay_after_revoke_is_token_revoked_never_the_stored_call(
        funded: Engine, verifier: Verifier, new_token: NewToken, clock: FakeClock) -> None:
    token = new_token(limit=USDC)
    first = verifier.charge(token.token, "search", args={"q": 1}, idempotency_key="k")
    with writing(funded) as conn:
        revoke(conn, [token.claims.jti], reason="test", clock=clock)
    for again in (lambda: verifier.charge(token.token, "search", args={"q": 1},
                                          idempotency_key="k"),
                  lambda: verifier.hold(token.token, "search", args={"q": 1},
                                        idempotency_key="k"),
                  lambda: verifier.begin(token.token, "search", args={"q": 1}),
                  lambda: verifier.charge(token.token, "search", args={"q": 1})):
        assert refusal(again)["code"] == "TOKEN_REVOKED"
    assert spent(funded, token, clock) == (PRICE, 0)
    assert verifier.receipt_for(first.receipt_id) == first


def test_a_replay_after_the_budget_ran_out_is_the_first_call_and_bills_nothing(
        funded: Engine, verifier: Verifier, new_token: NewToken, clock: FakeClock) -> None:
    token = new_token(limit=PRICE)
    first = verifier.charge(token.token, "search", args={"q": 1}, idempotency_key="k")
    assert verifier.charge(token.token, "search", args={"q": 1}, idempotency_key="k") == first
    replay = verifier.hold(token.token, "search", args={"q": 1}, idempotency_key="k")
    assert replay.replayed == first and verifier.capture(replay) == first
    assert refusal(lambda: verifier.charge(token.token, "search", args={"q": 2}))["code"] == (
        "BUDGET_EXCEEDED")
    assert spent(funded, token, clock) == (PRICE, 0)


def test_a_with_block_never_runs_for_a_call_made_already(
        funded: Engine, verifier: Verifier, new_token: NewToken) -> None:
    token = new_token(limit=USDC)
    runs = []
    with verifier.call(token.token, "search", args={"q": 1}) as billed:
        runs.append(1)
    with pytest.raises(DuplicateCall) as duplicate:
        with verifier.call(token.token, "search", args={"q": 1}):
            runs.append(2)
    assert runs == [1]
    assert duplicate.value.receipt == billed.receipt
    assert duplicate.value.to_dict()["receiptId"] == billed.hold.id


# --- 2. keys belong to a tenant -----------------------------------------------------------


def test_the_same_key_in_two_tenants_is_two_calls(
        funded: Engine, verifier: Verifier, ring: KeyRing, clock: FakeClock) -> None:
    fund(funded, "globex", 100 * USDC, now=clock())
    acme = mint(funded, ring, now=clock(), tenant="acme")
    globex = mint(funded, ring, now=clock(), tenant="globex")
    mine = verifier.charge(acme.token, "translate", args={"text": "secret"},
                           idempotency_key="order-1")
    theirs = verifier.charge(globex.token, "search", args={"q": 1}, idempotency_key="order-1")
    assert theirs.receipt_id != mine.receipt_id and theirs.claims["tenant"] == "globex"
    assert spent(funded, globex, clock) == (PRICE, 0)


def test_a_conflict_tells_nothing_of_another_tokens_call(
        funded: Engine, verifier: Verifier, new_token: NewToken) -> None:
    mine, theirs = new_token(agent="a"), new_token(agent="b")
    first = verifier.charge(mine.token, "translate", args={"text": "secret"},
                            idempotency_key="order-1")
    refused = refusal(lambda: verifier.charge(theirs.token, "search", args={"q": 1},
                                              idempotency_key="order-1"))
    assert refused["code"] == "IDEMPOTENCY_CONFLICT"
    said = repr(refused)
    for secret in ("translate", "secret", mine.claims.jti, first.receipt_id, "agent"):
        assert secret not in said
    # the same key, the same request, another token: still a conflict, never a replay
    assert refusal(lambda: verifier.charge(theirs.token, "translate", args={"text": "secret"},
                                           idempotency_key="order-1"))["code"] == (
        "IDEMPOTENCY_CONFLICT")


# --- 3. keys without sessions: derived from the call, within the tool's window ------------


def test_the_same_call_within_the_dedupe_window_is_one_call(
        funded: Engine, verifier: Verifier, new_token: NewToken, clock: FakeClock) -> None:
    token = new_token(limit=USDC)
    first = verifier.charge(token.token, "search", args={"q": "usdc", "n": 3})
    clock.advance(9)
    assert verifier.charge(token.token, "search", args={"n": 3, "q": "usdc"}) == first
    other = verifier.charge(token.token, "search", args={"q": "usdc", "n": 4})
    assert other != first
    assert spent(funded, token, clock) == (2 * PRICE, 0)


def test_no_agent_can_take_the_key_derived_for_another_agents_call(
        funded: Engine, verifier: Verifier, new_token: NewToken, clock: FakeClock) -> None:
    victim, squatter = new_token(agent="victim", limit=USDC), new_token(agent="squatter")
    args = {"q": "weather in paris"}
    # keys are unique per tenant, and every receipt names its token: an agent of the same
    # tenant can compute the key of a call another agent is about to make
    request = canonical_json([victim.claims.jti, "search", args]).encode()
    derived = "drv_" + hashlib.sha256(request).hexdigest()[:48]
    refused = refusal(lambda: verifier.charge(squatter.token, "search", args={"q": 0},
                                              idempotency_key=derived))
    assert (refused["code"], refused["field"]) == ("INVALID_INPUT", "idempotency_key")
    first = verifier.charge(victim.token, "search", args=args)  # not IDEMPOTENCY_CONFLICT
    assert first.claims["idempotencyKey"] == derived
    # the key the receipt carries still retries that same call, and only it
    assert verifier.charge(victim.token, "search", args=args, idempotency_key=derived) == first
    assert refusal(lambda: verifier.charge(victim.token, "search", args={"q": 1},
                                           idempotency_key=derived))["code"] == "INVALID_INPUT"
    assert spent(funded, victim, clock) == (PRICE, 0)
    assert spent(funded, squatter, clock) == (0, 0)


def test_the_window_counts_from_the_end_of_the_call(
        funded: Engine, verifier: Verifier, new_token: NewToken, clock: FakeClock) -> None:
    token = new_token(limit=USDC)
    with verifier.call(token.token, "search", args={"q": 1}) as billed:
        clock.advance(60)  # a long tool: its retry is still the same call
        assert refusal(lambda: verifier.charge(token.token, "search", args={"q": 1}))[
            "code"] == "CALL_IN_PROGRESS"
    clock.advance(9)
    assert verifier.charge(token.token, "search", args={"q": 1}) == billed.receipt
    clock.advance(2)
    later = verifier.charge(token.token, "search", args={"q": 1})
    assert later.receipt_id != billed.hold.id
    assert spent(funded, token, clock) == (2 * PRICE, 0)


def test_a_tool_with_a_zero_window_bills_every_call(
        funded: Engine, keys: KeySource, new_token: NewToken, clock: FakeClock) -> None:
    doc = {**PRICING_DOC, "tools": {**PRICING_DOC["tools"],
                                    "roll": {"price": "0.01", "dedupe_window": "0s"}}}
    verifier = Verifier(keys=keys, pricing=PricingTable.from_document(doc), engine=funded,
                        clock=clock)
    token = new_token(limit=USDC)
    receipts = {verifier.charge(token.token, "roll", args={"sides": 6}).receipt_id
                for _ in range(3)}
    assert len(receipts) == 3
    assert spent(funded, token, clock) == (3 * PRICE, 0)


def test_a_failed_call_does_not_block_its_retry_without_a_key(
        funded: Engine, verifier: Verifier, new_token: NewToken, clock: FakeClock) -> None:
    token = new_token(limit=USDC)
    with pytest.raises(RuntimeError), verifier.call(token.token, "search", args={"q": 1}):
        raise RuntimeError("the tool broke")
    with verifier.call(token.token, "search", args={"q": 1}) as retried:
        pass
    assert retried.receipt is not None and retried.receipt.amount == PRICE
    assert spent(funded, token, clock) == (PRICE, 0)


def test_a_call_whose_server_died_is_expired_and_retried_without_a_key(
        funded: Engine, verifier: Verifier, new_token: NewToken, clock: FakeClock) -> None:
    token = new_token(limit=USDC)
    verifier.hold(token.token, "search", args={"q": 1})  # never settled: the server died
    clock.advance(verifier.hold_timeout)
    retried = verifier.charge(token.token, "search", args={"q": 1})
    assert retried.amount == PRICE
    assert spent(funded, token, clock) == (PRICE, 0)
    with reading(funded) as conn:
        statuses = conn.execute(select(calls.c.status).order_by(calls.c.id)).scalars().all()
    assert statuses == ["expired", "captured"]


def test_a_given_key_of_a_call_whose_server_died_stays_failed(
        funded: Engine, verifier: Verifier, new_token: NewToken, clock: FakeClock) -> None:
    token = new_token(limit=USDC)
    verifier.hold(token.token, "search", args={"q": 1}, idempotency_key="k")
    clock.advance(verifier.hold_timeout)
    refused = refusal(lambda: verifier.charge(token.token, "search", args={"q": 1},
                                              idempotency_key="k"))
    assert (refused["code"], refused["status"]) == ("CALL_FAILED", "expired")
    assert spent(funded, token, clock) == (0, 0)


# --- 4. a call in flight is never touched by its duplicate --------------------------------


def test_a_duplicate_of_a_call_in_flight_is_call_in_progress_and_leaves_its_hold(
        funded: Engine, verifier: Verifier, new_token: NewToken, clock: FakeClock) -> None:
    token = new_token(limit=USDC)
    first = verifier.hold(token.token, "search", args={"q": 1}, idempotency_key="k")
    for duplicate in (verifier.hold, verifier.charge, verifier.begin):
        refused = refusal(lambda d=duplicate: d(token.token, "search", args={"q": 1},
                                                idempotency_key="k"))
        assert (refused["code"], refused["retryAfterMs"]) == ("CALL_IN_PROGRESS", 1000)
    with pytest.raises(BillingError, match="still running"):  # nor by a with block
        with verifier.call(token.token, "search", args={"q": 1}, idempotency_key="k"):
            pytest.fail("ran")
    assert spent(funded, token, clock) == (0, PRICE)
    receipt = verifier.capture(first)
    assert receipt.amount == PRICE
    assert verifier.charge(token.token, "search", args={"q": 1}, idempotency_key="k") == receipt
    assert spent(funded, token, clock) == (PRICE, 0)
    assert call_rows(funded) == 1


def test_call_in_progress_is_audited(funded: Engine, verifier: Verifier,
                                     new_token: NewToken) -> None:
    token = new_token(limit=USDC)
    verifier.hold(token.token, "search", args={"q": 1})
    refusal(lambda: verifier.hold(token.token, "search", args={"q": 1}))
    with reading(funded) as conn:
        codes = conn.execute(select(events.c.code).where(events.c.kind == "refusal")
                             ).scalars().all()
    assert codes == ["CALL_IN_PROGRESS"]


# --- 5. a tool that runs longer than the hold timeout -------------------------------------


@pytest.mark.slow
def test_a_tool_running_past_the_hold_timeout_is_billed(
        funded: Engine, keys: KeySource, pricing: PricingTable, ring: KeyRing) -> None:
    import time

    from mcpbill_cli.clock import utcnow

    token = mint(funded, ring, now=utcnow(), limit=USDC)
    verifier = Verifier(keys=keys, pricing=pricing, engine=funded, hold_timeout=2)
    try:
        with verifier.call(token.token, "search", args={"q": 1}) as billed:
            time.sleep(4.5)  # past two timeouts
            assert verifier.sweep_expired() == 0  # a sweep meanwhile leaves it alone
    finally:
        verifier.close()
    assert billed.receipt is not None and billed.receipt.amount == PRICE
    with reading(funded) as conn:
        assert conn.execute(select(calls.c.status)).scalar_one() == "captured"


def test_a_hold_left_alone_still_lapses(
        funded: Engine, verifier: Verifier, new_token: NewToken, clock: FakeClock) -> None:
    """Keeping alive is for calls still running: a raw hold nobody keeps lapses as before."""
    token = new_token(limit=USDC)
    hold = verifier.hold(token.token, "search", args={"q": 1})
    clock.advance(verifier.hold_timeout)
    assert verifier.sweep_expired() == 1
    refused = refusal(lambda: verifier.capture(hold))
    assert (refused["code"], refused["state"]) == ("HOLD_NOT_ACTIVE", "expired")
    with reading(funded) as conn:
        row = conn.execute(select(events.c.code, events.c.ref).where(
            events.c.kind == "refusal")).one()
    assert tuple(row) == ("HOLD_NOT_ACTIVE", hold.id)


def test_extending_a_kept_hold_moves_both_timeouts(
        funded: Engine, verifier: Verifier, new_token: NewToken, clock: FakeClock) -> None:
    verifier._keeper.close()  # its thread stays out of the way: this test extends by hand
    token = new_token(limit=USDC)
    hold = verifier.begin(token.token, "search", args={"q": 1})
    assert isinstance(hold, Hold)
    clock.advance(verifier.hold_timeout * 0.6)
    assert verifier._keeper.extend_due() == 1
    clock.advance(verifier.hold_timeout * 0.6)  # past the first timeout, not the new one
    assert verifier.sweep_expired() == 0
    assert verifier.capture(hold).amount == PRICE
    assert verifier._keeper.extend_due() == 0  # captured: forgotten


def test_a_replay_for_an_expired_token_is_refused(
        funded: Engine, verifier: Verifier, new_token: NewToken, clock: FakeClock) -> None:
    token = new_token(limit=USDC, ttl=600)
    verifier.charge(token.token, "search", args={"q": 1}, idempotency_key="k")
    clock.advance(600 + verifier.leeway)
    refused = refusal(lambda: verifier.charge(token.token, "search", args={"q": 1},
                                              idempotency_key="k"))
    assert (refused["code"], refused["reason"]) == ("INVALID_CREDIT_TOKEN", "expired")


def kept_results(engine: Engine) -> list[str | None]:
    with reading(engine) as conn:
        return list(conn.execute(select(calls.c.result).order_by(calls.c.id)).scalars())


def test_results_are_kept_for_replays_until_no_replay_can_use_them(
        funded: Engine, verifier: Verifier, new_token: NewToken, clock: FakeClock) -> None:
    short, revoked, live = (new_token(limit=USDC, ttl=600), new_token(limit=USDC),
                            new_token(limit=USDC))
    for issued in (short, revoked, live):
        hold = verifier.hold(issued.token, "search", args={"q": 1})
        verifier.capture(hold, result='{"content":[]}')
    big = verifier.hold(live.token, "search", args={"q": 2})
    verifier.capture(big, result="x" * (verifier.result_cap + 1))  # over the cap: not kept
    assert kept_results(funded) == ['{"content":[]}'] * 3 + [None]
    replay = verifier.hold(live.token, "search", args={"q": 1})
    assert replay.replayed is not None and replay.result == '{"content":[]}'
    with writing(funded) as conn:
        revoke(conn, [revoked.claims.jti], reason="test", clock=clock)
    clock.advance(600 + 3600)
    with writing(funded) as conn:
        sweep(conn, now=clock())
    assert kept_results(funded) == [None, None, '{"content":[]}', None]

"""No overdraft and no double billing under any interleaving: threads, processes, retry storms."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from mcpbill_cli.errors import BillingError, IdempotencyConflict
from mcpbill_cli.ledger.credit import IssuedToken, show
from mcpbill_cli.ledger.engine import reading
from mcpbill_cli.ledger.models import calls, transfers
from mcpbill_cli.verifier import Hold, Verifier

from .billing_support import PRICE, PRICING_DOC, USDC, FakeClock, run_threads
from .billing_workers import charge_calls, charge_until_killed
from .invariants import assert_ledger_invariants


def outcome_counter(attempts: int, call: Callable[[], Any]) -> Callable[[], Counter[str]]:
    def work() -> Counter[str]:
        outcomes: Counter[str] = Counter()
        for _ in range(attempts):
            try:
                call()
                outcomes["ok"] += 1
            except BillingError as exc:
                outcomes[exc.code] += 1
        return outcomes

    return work


def token_state(engine: Engine, token: IssuedToken, clock: FakeClock) -> tuple[int, int, int]:
    with reading(engine) as conn:
        view = show(conn, token.claims.jti, now=clock())
        assert_ledger_invariants(conn)
    return view.spent, view.held, view.remaining


def count_calls(engine: Engine, jti: str) -> int:
    with reading(engine) as conn:
        return int(conn.execute(select(func.count()).select_from(calls)
                                .where(calls.c.jti == jti)).scalar_one())


@pytest.mark.slow
def test_threads_and_processes_never_spend_past_the_limit(
        engine: Engine, db_url: str, keys_dir: Path, verifier: Verifier, offline: Verifier,
        new_token: Callable[..., IssuedToken], clock: FakeClock) -> None:
    token = new_token(limit=USDC)
    ctx = multiprocessing.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    workers = [ctx.Process(target=charge_calls, args=(db_url, str(keys_dir), PRICING_DOC,
                                                      token.token, 45, ready, go, results))
               for _ in range(4)]
    for worker in workers:
        worker.start()
    for _ in workers:
        assert ready.get(timeout=120) == "ready"

    receipts: list[Any] = []
    numbers = itertools.count()  # every call a new one (next() is atomic)
    charge = outcome_counter(20, lambda: receipts.append(
        verifier.charge(token.token, "search", args={"n": next(numbers)})))
    go.set()
    by_thread = run_threads(16, charge)
    by_process = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0

    total = sum(by_thread, Counter()) + sum((Counter(o) for o, _ in by_process), Counter())
    assert total == {"ok": 100, "BUDGET_EXCEEDED": 400}
    assert token_state(engine, token, clock) == (USDC, 0, 0)
    jws = [r.jws for r in receipts] + [j for _, batch in by_process for j in batch]
    checked = [offline.verify_receipt(j) for j in jws]
    assert len({r.receipt_id for r in checked}) == 100
    # Each debit saw the balance the one before left: remainders 0.99, 0.98 ... 0.00, once each.
    assert sorted(r.remaining for r in checked) == [PRICE * i for i in range(100)]
    assert count_calls(engine, token.claims.jti) == 100


def test_threads_of_a_verifier_that_opens_its_ledger_never_spend_past_the_limit(
        engine: Engine, served: Verifier, offline: Verifier,
        new_token: Callable[..., IssuedToken], clock: FakeClock) -> None:
    """16 threads share the connections the verifier keeps open between paid calls."""
    token = new_token(limit=USDC)
    numbers = itertools.count()
    receipts: list[Any] = []

    def charge() -> None:
        receipts.append(served.charge(token.token, "search", args={"n": next(numbers)}))

    def in_block() -> None:
        with served.call(token.token, "search", args={"n": next(numbers)}) as call:
            pass
        receipts.append(call.receipt)

    by_thread = run_threads(16, lambda i: outcome_counter(25, charge if i % 2 else in_block)(),
                            indexed=True)
    assert sum(by_thread, Counter()) == {"ok": 100, "BUDGET_EXCEEDED": 300}
    assert token_state(engine, token, clock) == (USDC, 0, 0)
    checked = [offline.verify_receipt(r.jws) for r in receipts]
    assert len({r.receipt_id for r in checked}) == 100
    assert count_calls(engine, token.claims.jti) == 100


@pytest.mark.slow
def test_hold_then_capture_under_threads_never_overdraws(
        engine: Engine, verifier: Verifier, new_token: Callable[..., IssuedToken],
        clock: FakeClock) -> None:
    token = new_token(limit=USDC)
    numbers = itertools.count()

    def two_phase() -> None:
        verifier.capture(verifier.hold(token.token, "search", args={"n": next(numbers)}))

    def in_block() -> None:
        with verifier.call(token.token, "search", args={"n": next(numbers)}):
            pass

    by_thread = run_threads(16, lambda i: outcome_counter(25, two_phase if i % 2 else in_block)(),
                            indexed=True)
    assert sum(by_thread, Counter()) == {"ok": 100, "BUDGET_EXCEEDED": 300}
    assert token_state(engine, token, clock) == (USDC, 0, 0)


def test_retry_storm_on_one_key_is_billed_once_with_one_receipt(
        engine: Engine, verifier: Verifier, new_token: Callable[..., IssuedToken],
        clock: FakeClock) -> None:
    token = new_token(limit=USDC)
    args = {"q": "weather in Lisbon"}
    receipts = run_threads(8, lambda: verifier.charge(token.token, "search", args=args,
                                                      idempotency_key="storm-1"))
    assert len({r.jws for r in receipts}) == 1
    assert receipts[0].claims["idempotencyKey"] == "storm-1"
    assert token_state(engine, token, clock) == (PRICE, 0, USDC - PRICE)
    with reading(engine) as conn:
        charges = conn.execute(select(func.count()).select_from(transfers).where(
            transfers.c.code == "charge",
            transfers.c.debit_account_id == f"token:{token.claims.jti}")).scalar_one()
    assert charges == 1
    assert count_calls(engine, token.claims.jti) == 1


@pytest.mark.parametrize("change", [{"tool": "translate"}, {"args": {"q": "weather in Porto"}},
                                    {"args": None}])
def test_same_key_for_another_request_is_an_idempotency_conflict(
        engine: Engine, verifier: Verifier, new_token: Callable[..., IssuedToken],
        clock: FakeClock, change: dict[str, Any]) -> None:
    token = new_token(limit=USDC)
    verifier.charge(token.token, "search", args={"q": "weather in Lisbon"},
                    idempotency_key="storm-2")
    request = {"tool": "search", "args": {"q": "weather in Lisbon"}, **change}
    with pytest.raises(IdempotencyConflict) as refused:
        verifier.charge(token.token, request["tool"], args=request["args"],
                        idempotency_key="storm-2")
    assert refused.value.to_dict()["idempotencyKey"] == "storm-2"
    with pytest.raises(IdempotencyConflict):
        verifier.hold(token.token, request["tool"], args=request["args"],
                      idempotency_key="storm-2")
    assert token_state(engine, token, clock) == (PRICE, 0, USDC - PRICE)


def test_retry_storm_after_the_budget_is_gone_still_gets_the_receipt(
        engine: Engine, verifier: Verifier, new_token: Callable[..., IssuedToken],
        clock: FakeClock) -> None:
    token = new_token(limit=PRICE)
    receipts = run_threads(8, lambda: verifier.charge(token.token, "search",
                                                      idempotency_key="last-call"))
    assert len({r.jws for r in receipts}) == 1
    again = verifier.charge(token.token, "search", idempotency_key="last-call")
    assert again.jws == receipts[0].jws
    assert token_state(engine, token, clock) == (PRICE, 0, 0)


def test_retry_storm_of_holds_shares_one_hold_and_one_receipt(
        engine: Engine, verifier: Verifier, new_token: Callable[..., IssuedToken],
        clock: FakeClock) -> None:
    token = new_token(limit=USDC)

    def hold() -> Hold | str:
        try:
            return verifier.hold(token.token, "search", idempotency_key="h-1")
        except BillingError as exc:
            return exc.code

    outcomes = run_threads(8, hold)
    [held] = [h for h in outcomes if isinstance(h, Hold)]
    assert sorted(h for h in outcomes if isinstance(h, str)) == ["CALL_IN_PROGRESS"] * 7
    receipts = run_threads(8, lambda: verifier.capture(held))
    assert len({r.jws for r in receipts}) == 1
    assert verifier.hold(token.token, "search", idempotency_key="h-1").replayed == receipts[0]
    assert token_state(engine, token, clock) == (PRICE, 0, USDC - PRICE)


def test_a_storm_of_the_same_call_without_a_key_is_billed_once(
        engine: Engine, verifier: Verifier, new_token: Callable[..., IssuedToken],
        clock: FakeClock) -> None:
    token = new_token(limit=USDC)
    receipts = run_threads(8, lambda: verifier.charge(token.token, "search", args={"q": 1}))
    assert len({r.jws for r in receipts}) == 1
    assert receipts[0].claims["idempotencyKey"].startswith("drv_")
    clock.advance(11)  # past search's dedupe window: the same call again is a new one
    other = verifier.charge(token.token, "search", args={"q": 1})
    assert other.receipt_id != receipts[0].receipt_id
    assert other.claims["idempotencyKey"] == receipts[0].claims["idempotencyKey"]
    assert token_state(engine, token, clock) == (2 * PRICE, 0, USDC - 2 * PRICE)


@pytest.mark.slow
def test_kill_9_in_a_charge_loop_leaves_no_half_written_charge(
        engine: Engine, db_url: str, keys_dir: Path, verifier: Verifier, offline: Verifier,
        new_token: Callable[..., IssuedToken], clock: FakeClock) -> None:
    token = new_token(limit=50 * USDC)
    ctx = multiprocessing.get_context("spawn")
    progress = ctx.Queue()
    worker = ctx.Process(target=charge_until_killed,
                         args=(db_url, str(keys_dir), PRICING_DOC, token.token, progress))
    worker.start()
    try:
        assert progress.get(timeout=120) >= 5  # it is charging
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            progress.get(timeout=60)
    finally:
        assert worker.pid is not None
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(30)
    assert worker.exitcode == -signal.SIGKILL

    # The ledger is not left locked, and what the killed worker committed is whole.
    after = verifier.charge(token.token, "search", args={"after": "kill"})
    offline.verify_receipt(after.jws)
    spent, held, remaining = token_state(engine, token, clock)
    made = count_calls(engine, token.claims.jti)
    assert made >= 6
    assert (spent, held, remaining) == (made * PRICE, 0, 50 * USDC - made * PRICE)
    assert after.remaining == remaining
    with reading(engine) as conn:
        stored = conn.execute(select(calls.c.receipt).where(
            calls.c.jti == token.claims.jti)).scalars().all()
    assert all(offline.verify_receipt(jws).amount == PRICE for jws in stored)


def test_conflicting_key_in_a_storm_never_debits(
        engine: Engine, verifier: Verifier, new_token: Callable[..., IssuedToken],
        clock: FakeClock) -> None:
    token = new_token(limit=USDC)
    verifier.charge(token.token, "search", args={"n": 0}, idempotency_key="k")

    def conflicting() -> str:
        try:
            verifier.charge(token.token, "translate", args={"n": 1}, idempotency_key="k")
        except BillingError as exc:
            return exc.code
        return "ok"

    assert run_threads(8, conflicting) == ["IDEMPOTENCY_CONFLICT"] * 8
    assert token_state(engine, token, clock) == (PRICE, 0, USDC - PRICE)


def test_same_key_from_another_token_is_a_conflict_not_someone_elses_receipt(
        engine: Engine, verifier: Verifier, new_token: Callable[..., IssuedToken],
        clock: FakeClock) -> None:
    mine, theirs = new_token(limit=USDC), new_token(limit=USDC, agent="agent-2")
    verifier.charge(mine.token, "search", args={"q": 1}, idempotency_key="shared")
    with pytest.raises(IdempotencyConflict):
        verifier.charge(theirs.token, "search", args={"q": 1}, idempotency_key="shared")
    assert token_state(engine, theirs, clock) == (0, 0, USDC)

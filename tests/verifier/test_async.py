"""The async twins, under ``asyncio.run`` (no pytest-asyncio)."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Callable
from datetime import datetime

import pytest
from sqlalchemy import Engine, text

from mcpbill_cli.errors import BillingError
from mcpbill_cli.keys import KeySource
from mcpbill_cli.ledger.credit import IssuedToken, show
from mcpbill_cli.ledger.engine import reading, writing
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.verifier import Verifier

from .billing_support import PRICE, USDC, FakeClock
from .invariants import assert_ledger_invariants


class ToolError(Exception):
    pass


def state(engine: Engine, token: IssuedToken, clock: FakeClock) -> tuple[int, int, int]:
    with reading(engine) as conn:
        view = show(conn, token.claims.jti, now=clock())
        assert_ledger_invariants(conn)
    return view.spent, view.held, view.remaining


def test_async_twins_follow_the_sync_call_path(
        funded: Engine, verifier: Verifier, offline: Verifier,
        new_token: Callable[..., IssuedToken], clock: FakeClock) -> None:
    issued = new_token(limit=USDC)
    token = issued.token

    async def scenario() -> list[int]:
        quote = await verifier.apreflight(token, "search")
        charged = await verifier.acharge(token, "search", idempotency_key="a-1")
        replayed = await verifier.acharge(token, "search", idempotency_key="a-1")
        assert replayed.jws == charged.jws
        hold = await verifier.ahold(token, "summarize", max_units=1_000)
        captured = await verifier.acapture(hold, units=400)
        voided = await verifier.ahold(token, "translate")
        await verifier.avoid(voided)
        async with verifier.acall(token, "summarize") as billed:
            billed.report_units(250)
        with pytest.raises(ToolError):
            async with verifier.acall(token, "translate") as failed:
                raise ToolError
        assert billed.receipt is not None and failed.receipt is None
        for receipt in (charged, captured, billed.receipt):
            offline.verify_receipt(receipt.jws)
        with pytest.raises(BillingError) as refused:
            await verifier.acharge(token, "translate", idempotency_key="a-1")
        assert refused.value.code == "IDEMPOTENCY_CONFLICT"
        return [quote.remaining or 0, charged.amount, captured.amount, billed.receipt.amount]

    assert asyncio.run(scenario()) == [USDC, PRICE, 4_000, 2_500]
    spent = PRICE + 4_000 + 2_500
    assert state(funded, issued, clock) == (spent, 0, USDC - spent)


@pytest.mark.slow
def test_concurrent_async_charges_never_overdraw(
        funded: Engine, verifier: Verifier, new_token: Callable[..., IssuedToken],
        clock: FakeClock) -> None:
    issued = new_token(limit=20 * PRICE)

    async def attempt(n: int) -> str:
        try:
            await verifier.acharge(issued.token, "search", args={"n": n})
        except BillingError as exc:
            return exc.code
        return "ok"

    async def storm() -> Counter[str]:
        return Counter(await asyncio.gather(*(attempt(n) for n in range(60))))

    assert asyncio.run(storm()) == {"ok": 20, "BUDGET_EXCEEDED": 40}
    assert state(funded, issued, clock) == (20 * PRICE, 0, 0)


class ThreadsClock(FakeClock):
    """A :class:`FakeClock` that notes the thread each reading is taken on: a hold reads the
    clock before it writes, so the threads a hold ran on, attempts included, are told."""

    def __init__(self, start: datetime) -> None:
        super().__init__(start)
        self.threads: list[int] = []

    def __call__(self) -> datetime:
        self.threads.append(threading.get_ident())
        return self.now


def test_a_step_runs_on_the_loop_on_sqlite_and_never_stalls_it_behind_another_writer(
        funded: Engine, keys: KeySource, pricing: PricingTable,
        new_token: Callable[..., IssuedToken], clock: FakeClock) -> None:
    """On SQLite an uncontended hold runs on the loop's own thread (no trip to a worker). With
    another writer holding the ledger, it goes to a worker instead and waits there, while the
    loop goes on; on PostgreSQL every step runs on a worker. Either way each call is held and
    charged once."""
    issued = new_token(limit=USDC)
    timed = ThreadsClock(clock())
    verifier = Verifier(keys=keys, pricing=pricing, engine=funded, hold_timeout=300,
                        clock=timed)
    sqlite = funded.dialect.name == "sqlite"

    async def scenario() -> tuple[int, set[int], set[int], int]:
        loop_thread = threading.get_ident()
        timed.threads.clear()
        free = await verifier.ahold(issued.token, "search", args={"n": 1})
        uncontended = set(timed.threads)
        await verifier.acapture(free)
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        ticker = asyncio.ensure_future(tick())
        with writing(funded) as other:  # another writer: SQLite's lock, PG's balances
            if not sqlite:
                other.execute(text("LOCK TABLE accounts IN EXCLUSIVE MODE"))
            timed.threads.clear()
            opening = asyncio.ensure_future(verifier.ahold(issued.token, "search",
                                                            args={"n": 2}))
            await asyncio.sleep(0.5)
            assert not opening.done()  # it waits for the lock, somewhere
            ticked = ticks  # ... and the loop went on meanwhile
        hold = await opening
        contended = set(timed.threads)
        ticker.cancel()
        await verifier.acapture(hold)
        return loop_thread, uncontended, contended, ticked

    try:
        loop_thread, uncontended, contended, ticked = asyncio.run(scenario())
    finally:
        verifier.close()
    assert ticked >= 20, ticked  # 0.5 s of 10 ms ticks: the loop never stalled on the lock
    if sqlite:
        assert uncontended == {loop_thread}
        assert loop_thread in contended and len(contended) == 2  # tried here, then a worker
    else:
        assert loop_thread not in uncontended | contended
    with reading(funded) as conn:
        calls = conn.execute(text("SELECT status, amount FROM calls WHERE jti = :jti"),
                             {"jti": issued.claims.jti}).all()
    assert sorted(map(tuple, calls)) == [("captured", PRICE)] * 2  # the retry held it once
    assert state(funded, issued, clock) == (2 * PRICE, 0, USDC - 2 * PRICE)

"""The async twins, under ``asyncio.run`` (no pytest-asyncio)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

import pytest
from sqlalchemy import Engine

from mcpbill_cli.errors import BillingError
from mcpbill_cli.ledger.credit import IssuedToken, show
from mcpbill_cli.ledger.engine import reading
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

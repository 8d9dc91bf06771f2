"""Alert events are written in the transaction of what caused them, once per crossing: a token
at 80% and 100% of its limit, a tenant under its alert amount, a daily cap reached, a refund,
a reconcile with findings; a rolled-back transaction leaves none."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy import Engine

from mcpbill_cli.errors import BudgetExceeded
from mcpbill_cli.ledger import outbox
from mcpbill_cli.ledger.credit import IssuedToken
from mcpbill_cli.ledger.engine import writing
from mcpbill_cli.reconcile import ReconcileOptions, Window, reconcile
from mcpbill_cli.verifier import Verifier
from tests.verifier.billing_support import FakeClock

from .conftest import USDC, add_endpoint, emitted


def test_an_event_of_a_rolled_back_transaction_never_exists(engine: Engine) -> None:
    add_endpoint(engine, "http://127.0.0.1:9/hooks")
    with pytest.raises(RuntimeError), writing(engine) as conn:
        outbox.emit(conn, "refund.created", {"refund_id": "rfnd_x"},
                    at=FakeClock()())
        raise RuntimeError("the refund failed after its event")
    assert emitted(engine) == []
    from mcpbill_cli.ledger.engine import reading

    with reading(engine) as conn:
        assert outbox.deliveries(conn) == []


def test_a_token_crosses_80_and_100_percent_once_each(
        engine: Engine, verifier: Verifier, new_token: Callable[..., IssuedToken]) -> None:
    add_endpoint(engine, "http://127.0.0.1:9/hooks", ["token.threshold"])
    token = new_token(limit=USDC)
    for n in range(5):  # 0.2 each: 20% 40% 60% 80% 100%
        verifier.charge(token.token, "search", idempotency_key=f"k{n}")
        percents = [e["data"]["percent"] for e in emitted(engine, "token.threshold")]
        assert percents == [[], [], [], [80], [80, 100]][n]
    event = emitted(engine, "token.threshold")[1]["data"]
    assert event == {"jti": token.claims.jti, "tenant": "acme", "agent": "agent-1",
                     "percent": 100, "limit_usd": "1.00", "used_usd": "1.00",
                     "available_usd": "0.00"}
    with pytest.raises(BudgetExceeded):
        verifier.charge(token.token, "search", idempotency_key="over")
    assert len(emitted(engine, "token.threshold")) == 2
    from mcpbill_cli.ledger.engine import reading

    with reading(engine) as conn:
        assert {d.type for d in outbox.deliveries(conn)} == {"token.threshold"}


def test_a_crossing_under_concurrency_is_one_event(
        engine: Engine, verifier: Verifier, new_token: Callable[..., IssuedToken]) -> None:
    token = new_token(limit=2 * USDC)  # ten charges of 0.2: 80% at the eighth
    errors: list[Exception] = []

    def charge(n: int) -> None:
        try:
            verifier.charge(token.token, "search", idempotency_key=f"c{n}")
        except Exception as exc:  # noqa: BLE001 - collected, asserted below
            errors.append(exc)

    threads = [threading.Thread(target=charge, args=(n,)) for n in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(e["data"]["percent"] for e in emitted(engine, "token.threshold")) == [80, 100]


def test_a_hold_that_crosses_and_is_voided_crosses_again_later(
        engine: Engine, verifier: Verifier, new_token: Callable[..., IssuedToken]) -> None:
    token = new_token(limit=250_000)  # one 0.2 call is 80%
    hold = verifier.hold(token.token, "search", idempotency_key="h1")
    verifier.void(hold)
    verifier.charge(token.token, "search", idempotency_key="h2")
    assert [e["data"]["percent"] for e in emitted(engine, "token.threshold")] == [80, 80]


def test_a_refund_emits_refund_created(engine: Engine, verifier: Verifier,
                                       new_token: Callable[..., IssuedToken]) -> None:
    receipt = verifier.charge(new_token(limit=USDC).token, "search")
    done = verifier.refund(receipt.receipt_id, amount=50_000, reason="slow")
    [event] = emitted(engine, "refund.created")
    assert event["data"] | {} == {
        "refund_id": done.refund_id, "receipt_id": receipt.receipt_id,
        "jti": receipt.claims["jti"], "tenant": "acme", "agent": "agent-1", "tool": "search",
        "amount_usd": "0.05", "refundable_usd": "0.15",
        "credited_to": f"token:{receipt.claims['jti']}", "reason": "slow"}


def test_a_daily_cap_reached_is_one_event_per_tenant_and_day(
        engine: Engine, verifier: Verifier, new_token: Callable[..., IssuedToken],
        clock: FakeClock) -> None:
    token = new_token(tenant="capped", limit=5 * USDC).token
    for n in range(2):
        verifier.charge(token, "search", idempotency_key=f"d{n}")
    for n in range(3):
        with pytest.raises(BudgetExceeded):
            verifier.charge(token, "search", idempotency_key=f"over{n}")
    [event] = emitted(engine, "cap.reached")
    assert event["data"] == {"tenant": "capped", "agent": None, "window": "day",
                             "period": f"{clock():%Y-%m-%d}", "cap_usd": "0.40",
                             "spent_usd": "0.40"}
    clock.advance(86400)
    token = new_token(tenant="capped", limit=5 * USDC).token
    for n in range(3):
        try:
            verifier.charge(token, "search", idempotency_key=f"next{n}")
        except BudgetExceeded:
            pass
    assert len(emitted(engine, "cap.reached")) == 2


def test_a_reconcile_with_findings_emits_them(engine: Engine, verifier: Verifier,
                                              new_token: Callable[..., IssuedToken],
                                              clock: FakeClock) -> None:
    from sqlalchemy import update

    from mcpbill_cli.ledger.models import calls

    receipt = verifier.charge(new_token(limit=USDC).token, "search")
    with writing(engine) as conn:  # tamper: the call says it charged more than it did
        conn.execute(update(calls).where(calls.c.id == receipt.receipt_id).values(amount=1))
    window = Window(clock() - timedelta(hours=1), clock() + timedelta(hours=1))
    report = reconcile(engine, ReconcileOptions(window=window))
    assert report.findings
    [event] = emitted(engine, "reconcile.findings")
    assert event["data"]["errors"] == report.errors
    assert {f["name"] for f in event["data"]["findings"]} == {f.name for f in report.findings}

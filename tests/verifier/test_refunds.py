"""Refunds of captured calls: partial and full, never past the charge (also when 50 run at once
from threads and processes), idempotent per key, back to the token while it is active, else
to the tenant, each with a signed refund receipt and a `refund` event."""

from __future__ import annotations

import multiprocessing
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, func, select

from mcpbill_cli.errors import BillingError
from mcpbill_cli.keys import KeyRing, keys_from_jwks
from mcpbill_cli.ledger import credit
from mcpbill_cli.ledger.credit import IssuedToken, revoke, show, tenant_balance
from mcpbill_cli.ledger.engine import reading, writing
from mcpbill_cli.ledger.models import accounts, calls, events, refunds, tokens, transfers
from mcpbill_cli.receipts import InvalidReceipt, verify_receipt, verify_refund_receipt
from mcpbill_cli.verifier import Verifier

from .billing_support import PRICING_DOC, USDC, FakeClock, run_threads
from .billing_workers import refund_calls
from .invariants import assert_ledger_invariants

TRANSLATE = 50_000  # translate: 0.05 USDC


def refused(call: Callable[[], Any]) -> BillingError:
    with pytest.raises(BillingError) as caught:
        call()
    return caught.value


def ledger_rows(engine: Engine) -> dict[str, Any]:
    """Everything a refund writes, to show a refused one wrote nothing."""
    with reading(engine) as conn:
        return {
            "accounts": sorted(tuple(r) for r in conn.execute(select(accounts))),
            "transfers": conn.execute(select(func.count()).select_from(transfers)).scalar_one(),
            "events": conn.execute(select(func.count()).select_from(events)).scalar_one(),
            "refunds": conn.execute(select(func.count()).select_from(refunds)).scalar_one(),
            "calls": sorted(tuple(r) for r in conn.execute(select(calls.c.id, calls.c.refunded))),
            "limits": sorted(tuple(r) for r in conn.execute(
                select(tokens.c.jti, tokens.c.limit_micro))),
        }


def checked(engine: Engine, jti: str, clock: FakeClock) -> credit.TokenView:
    """The token's view, with the ledger's invariants and the tenant's identity asserted."""
    with reading(engine) as conn:
        assert_ledger_invariants(conn)
        bal = tenant_balance(conn, "acme")
        assert bal.funded == bal.available + bal.allotted + bal.held + bal.spent
        return show(conn, jti, now=clock())


def refunded_of(conn: Connection, call_id: str) -> int:
    return int(conn.execute(select(calls.c.refunded).where(calls.c.id == call_id)).scalar_one())


def refund_events(engine: Engine) -> list[Any]:
    with reading(engine) as conn:
        return list(conn.execute(select(events.c.ref, events.c.amount, events.c.detail)
                                 .where(events.c.kind == "refund").order_by(events.c.id)))


def test_a_partial_then_a_full_refund_go_back_to_the_active_token(
        verifier: Verifier, funded: Engine, ring: KeyRing,
        new_token: Callable[..., IssuedToken], clock: FakeClock) -> None:
    token = new_token(limit=USDC)
    receipt = verifier.charge(token.token, "translate", idempotency_key="t-1")
    jti = token.claims.jti

    part = verifier.refund(receipt.receipt_id, 20_000, reason="slow answer")
    assert (part.amount, part.refundable, part.replayed) == (20_000, 30_000, False)
    assert part.claims["creditedTo"] == f"token:{jti}"
    assert (part.claims["chargedUsd"], part.claims["refundedUsd"]) == ("0.05", "0.02")
    view = checked(funded, jti, clock)
    assert (view.limit, view.spent, view.remaining) == (USDC + 20_000, TRANSLATE,
                                                        USDC - TRANSLATE + 20_000)

    rest = verifier.refund(receipt.receipt_id)
    assert (rest.amount, rest.refundable) == (30_000, 0)
    assert rest.claims["refundedUsd"] == "0.05" and rest.claims["reason"] is None
    view = checked(funded, jti, clock)
    assert (view.limit, view.remaining) == (USDC + TRANSLATE, USDC)
    with reading(funded) as conn:
        assert refunded_of(conn, receipt.receipt_id) == TRANSLATE
        revenue = conn.execute(select(accounts.c.credits_posted - accounts.c.debits_posted)
                               .where(accounts.c.id == f"revenue:{jti}")).scalar_one()
    assert revenue == 0
    assert [(e.ref, e.amount) for e in refund_events(funded)] == [
        (part.refund_id, 20_000), (rest.refund_id, 30_000)]
    # The token spends what came back.
    assert verifier.charge(token.token, "translate", idempotency_key="t-2").amount == TRANSLATE


def test_refunding_past_the_charge_is_refused_and_changes_nothing(
        verifier: Verifier, funded: Engine, new_token: Callable[..., IssuedToken]) -> None:
    receipt = verifier.charge(new_token().token, "translate")
    verifier.refund(receipt.receipt_id, 40_000)
    before = ledger_rows(funded)

    error = refused(lambda: verifier.refund(receipt.receipt_id, 10_001))
    assert error.code == "REFUND_EXCEEDS_CHARGE"
    assert error.details["refundableUsd"] == "0.01"
    assert ledger_rows(funded) == before
    verifier.refund(receipt.receipt_id)  # the 0.01 left
    assert refused(lambda: verifier.refund(receipt.receipt_id)).code == "REFUND_EXCEEDS_CHARGE"
    assert refused(lambda: verifier.refund(receipt.receipt_id, 1)).code == (
        "REFUND_EXCEEDS_CHARGE")


def test_what_cannot_be_refunded_is_refused_with_its_code(
        verifier: Verifier, funded: Engine, new_token: Callable[..., IssuedToken]) -> None:
    token = new_token()
    held = verifier.hold(token.token, "search")
    voided = verifier.hold(token.token, "search", args={"n": 2})
    verifier.void(voided)
    before = ledger_rows(funded)
    assert refused(lambda: verifier.refund("rcpt_nope")).code == "NOT_FOUND"
    for call_id in (held.id, voided.id):
        error = refused(lambda: verifier.refund(call_id))  # noqa: B023 - called at once
        assert error.code == "CALL_NOT_CAPTURED"
    for bad in (0, -5, True, 1.5, 10**15 + 1, 2**63 - 1, 2**63):
        assert refused(lambda: verifier.refund(held.id, bad)).code == "INVALID_INPUT"  # noqa: B023
    assert refused(lambda: verifier.refund(held.id, 1, reason="\x00")).code == "INVALID_INPUT"
    assert ledger_rows(funded) == before


def test_an_amount_past_what_the_ledger_holds_is_invalid_input_not_a_database_error(
        verifier: Verifier, funded: Engine, new_token: Callable[..., IssuedToken]) -> None:
    """After a partial refund, refunded + amount would pass a 64-bit column: still a
    BillingError, before the ledger is asked; a hold of such an amount too."""
    token = new_token()
    receipt = verifier.charge(token.token, "translate")
    verifier.refund(receipt.receipt_id, 1)
    before = ledger_rows(funded)
    for amount in (10**15 + 1, 2**63 - 1, 2**63):
        error = refused(lambda: verifier.refund(receipt.receipt_id, amount))  # noqa: B023
        assert (error.code, error.details["field"]) == ("INVALID_INPUT", "amount")
    assert ledger_rows(funded) == before
    for amount in (10**15 + 1, 2**63 - 1, 2**63):
        error = refused(lambda: verifier.hold(token.token, "x", amount=amount))  # noqa: B023
        assert (error.code, error.details["field"]) == ("INVALID_INPUT", "amount")
    after = ledger_rows(funded)  # a refused call of a valid token is an event, no money moved
    assert {**after, "events": 0} == {**before, "events": 0}


def test_a_retried_refund_under_its_key_moves_money_once(
        verifier: Verifier, funded: Engine, new_token: Callable[..., IssuedToken]) -> None:
    token = new_token()
    first = verifier.charge(token.token, "translate", args={"n": 1})
    second = verifier.charge(token.token, "translate", args={"n": 2})
    done = verifier.refund(first.receipt_id, 10_000, idempotency_key="ticket-7")
    before = ledger_rows(funded)

    again = verifier.refund(first.receipt_id, 10_000, idempotency_key="ticket-7")
    assert again.replayed and again.refund_id == done.refund_id and again.jws == done.jws
    assert ledger_rows(funded) == before

    for other in (lambda: verifier.refund(first.receipt_id, 20_000, idempotency_key="ticket-7"),
                  lambda: verifier.refund(first.receipt_id, idempotency_key="ticket-7"),
                  lambda: verifier.refund(second.receipt_id, 10_000,
                                          idempotency_key="ticket-7")):
        error = refused(other)
        assert error.code == "IDEMPOTENCY_CONFLICT"
        assert error.details["amountUsd"] == "0.01"
    assert ledger_rows(funded) == before

    everything = verifier.refund(second.receipt_id, idempotency_key="all-of-it")
    assert verifier.refund(second.receipt_id, idempotency_key="all-of-it").jws == everything.jws
    assert everything.amount == TRANSLATE


def test_a_refund_goes_to_the_tenant_once_the_token_is_revoked_or_expired(
        verifier: Verifier, funded: Engine, new_token: Callable[..., IssuedToken],
        clock: FakeClock) -> None:
    revoked, expiring = new_token(limit=USDC), new_token(limit=USDC, ttl=60)
    paid = verifier.charge(revoked.token, "translate")
    paid_too = verifier.charge(expiring.token, "translate")
    with writing(funded) as conn:
        revoke(conn, [revoked.claims.jti], reason="leaked", clock=clock)
    clock.advance(120)
    with reading(funded) as conn:
        tenant_before = tenant_balance(conn, "acme")

    to_tenant = verifier.refund(paid.receipt_id, 30_000)
    assert to_tenant.claims["creditedTo"] == "tenant:acme"
    expired = verifier.refund(paid_too.receipt_id)
    assert expired.claims["creditedTo"] == "tenant:acme"

    for token in (revoked, expiring):
        view = checked(funded, token.claims.jti, clock)
        assert view.limit == USDC  # nothing came back to the token
    with reading(funded) as conn:
        after = tenant_balance(conn, "acme")
    assert after.available == tenant_before.available + 30_000 + TRANSLATE
    assert after.spent == tenant_before.spent - 30_000 - TRANSLATE


def test_a_refund_receipt_verifies_with_the_exported_jwks(
        verifier: Verifier, ring: KeyRing, new_token: Callable[..., IssuedToken]) -> None:
    receipt = verifier.charge(new_token().token, "translate")
    done = verifier.refund(receipt.receipt_id, 5_000, reason="partial outage",
                           idempotency_key="k-1")
    keys = keys_from_jwks(ring.jwks())
    checked_refund = verify_refund_receipt(done.jws, keys)
    assert checked_refund.claims == done.claims
    assert (checked_refund.receipt_id, checked_refund.amount) == (receipt.receipt_id, 5_000)
    assert checked_refund.claims["reason"] == "partial outage"
    assert checked_refund.claims["idempotencyKey"] == "k-1"
    with pytest.raises(InvalidReceipt):  # a refund receipt is not a call's receipt
        verify_receipt(done.jws, keys)
    with pytest.raises(InvalidReceipt):
        verify_refund_receipt(receipt.jws, keys)
    head, body, signature = done.jws.split(".")
    with pytest.raises(InvalidReceipt):
        verify_refund_receipt(f"{head}.{body}.{signature[::-1]}", keys)


def test_fifty_refunds_at_once_from_threads_never_pass_the_charge(
        verifier: Verifier, funded: Engine, new_token: Callable[..., IssuedToken],
        clock: FakeClock) -> None:
    token = new_token()
    receipt = verifier.charge(token.token, "translate")

    def one(index: int) -> str:
        amount = None if index % 10 == 0 else 2_000  # "all that is left" races the partials
        try:
            return str(verifier.refund(receipt.receipt_id, amount).amount)
        except BillingError as exc:
            return exc.code

    outcomes = Counter(run_threads(50, one, indexed=True))
    assert set(outcomes) <= {"2000", "REFUND_EXCEEDS_CHARGE"} | {
        str(n) for n in range(2_000, TRANSLATE + 1, 2_000)}
    with reading(funded) as conn:
        amounts = [int(a) for a in conn.execute(
            select(refunds.c.amount).where(refunds.c.call_id == receipt.receipt_id)).scalars()]
        assert refunded_of(conn, receipt.receipt_id) == sum(amounts) == TRANSLATE
    assert sum(int(k) * n for k, n in outcomes.items() if k.isdigit()) == TRANSLATE
    checked(funded, token.claims.jti, clock)


@pytest.mark.slow
def test_fifty_refunds_from_threads_and_processes_never_pass_the_charge(
        verifier: Verifier, funded: Engine, db_url: str, keys_dir: Path,
        new_token: Callable[..., IssuedToken], clock: FakeClock) -> None:
    token = new_token()
    receipt = verifier.charge(token.token, "translate")
    ctx = multiprocessing.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    workers = [ctx.Process(target=refund_calls, args=(
        db_url, str(keys_dir), PRICING_DOC, receipt.receipt_id, 3_000, 5, ready, go, results))
        for _ in range(5)]
    for worker in workers:
        worker.start()
    for _ in workers:
        assert ready.get(timeout=120) == "ready"

    def one() -> str:
        try:
            return str(verifier.refund(receipt.receipt_id, 3_000).amount)
        except BillingError as exc:
            return exc.code

    go.set()
    by_thread = Counter(run_threads(25, one))
    by_process = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    total = by_thread + sum((Counter(o) for o, _ in by_process), Counter())
    ok = total["ok"] + total["3000"]
    assert ok == TRANSLATE // 3_000  # 16 refunds of 0.003 fit in 0.05
    assert total["REFUND_EXCEEDS_CHARGE"] == 50 - ok
    with reading(funded) as conn:
        assert refunded_of(conn, receipt.receipt_id) == ok * 3_000
    last = verifier.refund(receipt.receipt_id)
    assert (last.amount, last.refundable) == (TRANSLATE - ok * 3_000, 0)
    view = checked(funded, token.claims.jti, clock)
    assert view.limit == USDC + TRANSLATE

"""Reconcile after refunds: clean when the refunds are the verifier's (to a token and to a
tenant, partial and full); a refund row or a call's refunded edited past the charge is found,
by name, with exactly the rows it concerns, on SQLite and PostgreSQL."""

from __future__ import annotations

from mcpbill_cli.ledger.credit import revoke
from mcpbill_cli.ledger.engine import writing
from mcpbill_cli.reconcile.model import Filters

from .support import Ledger, rows_of


def refunded(ledger: Ledger) -> dict[str, str]:
    """Refund half of acme's search charge to its token, then globex's whole translate charge
    after its token was revoked (to the tenant), sealed; the refund ids by call role."""
    verifier, clock = ledger.verifier, ledger.clock
    half = verifier.refund(ledger.calls["charge"], 2_000, reason="half")
    clock.advance(1)
    rest = verifier.refund(ledger.calls["charge"])
    with writing(ledger.engine) as conn:
        revoke(conn, [ledger.tokens["globex"].claims.jti], reason="done", clock=clock)
    clock.advance(1)
    whole = verifier.refund(ledger.calls["charge2"], idempotency_key="ticket-1")
    assert (half.claims["creditedTo"], whole.claims["creditedTo"]) == (
        f"token:{ledger.tokens['acme'].claims.jti}", "tenant:globex")
    clock.advance(60)
    ledger.seal()
    return {"half": half.refund_id, "rest": rest.refund_id, "whole": whole.refund_id}


def test_refunds_made_by_the_verifier_reconcile_clean(ledger: Ledger) -> None:
    refunded(ledger)
    report = ledger.reconcile(verify_receipts=True)
    assert rows_of(report) == []
    assert "refunds" in report.checks
    acme = ledger.call_row(ledger.calls["charge"]).amount
    globex = ledger.call_row(ledger.calls["charge2"]).amount
    assert (report.summary.refunds, report.summary.refunded) == (3, acme + globex)
    by_tenant = report.totals["tenant"]
    assert (by_tenant["acme"].refunds, by_tenant["acme"].refunded) == (2, acme)
    assert (by_tenant["globex"].refunds, by_tenant["globex"].refunded) == (1, globex)
    assert by_tenant["globex"].net == by_tenant["globex"].charged - globex
    assert report.totals["tool"]["translate"].refunded == globex
    only_globex = ledger.reconcile(filters=Filters(tenant="globex"))
    assert (only_globex.summary.refunds, only_globex.summary.refunded) == (1, globex)


def test_a_refund_row_edited_past_the_charge(ledger: Ledger) -> None:
    ids = refunded(ledger)
    call = ledger.calls["charge"]
    ledger.sql("UPDATE refunds SET amount = amount + 10000 WHERE id = :r", r=ids["rest"])
    assert rows_of(ledger.reconcile()) == [
        ("refund_exceeds_charge", "error", [f"calls/{call}"]),
        ("refund_mismatch", "error", [f"refunds/{ids['rest']}", f"calls/{call}"])]


def test_a_call_marked_refunded_past_its_charge(ledger: Ledger) -> None:
    refunded(ledger)
    call = ledger.calls["charge2"]
    ledger.sql("UPDATE calls SET refunded = amount + 1 WHERE id = :c", c=call)
    assert rows_of(ledger.reconcile()) == [
        ("refund_exceeds_charge", "error", [f"calls/{call}"]),
        ("refund_mismatch", "error", [f"calls/{call}"])]


def test_a_call_marked_refunded_without_any_refund(ledger: Ledger) -> None:
    call = ledger.calls["captured"]
    ledger.sql("UPDATE calls SET refunded = 1000 WHERE id = :c", c=call)
    assert rows_of(ledger.reconcile()) == [("refund_mismatch", "error", [f"calls/{call}"])]


def test_a_refund_row_without_its_transfer_and_event(ledger: Ledger) -> None:
    ids = refunded(ledger)
    call = ledger.calls["captured"]
    ledger.sql("INSERT INTO refunds (id, call_id, jti, tenant, amount, requested, "
               "refunded_after, credited_to, transfer_id, reason, idempotency_key, receipt, "
               "demo, created_at) SELECT 'rfnd_forged', :c, jti, tenant, 1000, 1000, 1000, "
               "credited_to, 'refund:rfnd_forged', NULL, NULL, receipt, demo, created_at "
               "FROM refunds WHERE id = :r", c=call, r=ids["half"])
    ledger.sql("UPDATE calls SET refunded = 1000 WHERE id = :c", c=call)
    assert rows_of(ledger.reconcile()) == [
        ("refund_mismatch", "error", ["refunds/rfnd_forged"])]

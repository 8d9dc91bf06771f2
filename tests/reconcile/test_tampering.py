"""Each kind of discrepancy, made by editing rows directly in SQL, is reported by name and
severity with exactly the rows it concerns: one test per attack, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import insert, select, update

from mcpbill_cli.clock import aware
from mcpbill_cli.ledger.engine import reading
from mcpbill_cli.ledger.models import audit_head, events, transfers

from .support import Ledger, rows_of


def jti_of(ledger: Ledger, name: str) -> str:
    return ledger.tokens[name].claims.jti


def move_money(ledger: Ledger, account: str, amount: int) -> None:
    """Keep the books balanced after a tampered transfer: the account paid ``amount`` more."""
    ledger.sql("UPDATE accounts SET debits_posted = debits_posted + :n WHERE id = :a",
               n=amount, a=account)
    ledger.sql("UPDATE accounts SET credits_posted = credits_posted + :n WHERE id = 'revenue'",
               n=amount)


def event_seq(ledger: Ledger, ref: str, kind: str) -> int:
    with reading(ledger.engine) as conn:
        return int(conn.execute(select(events.c.seq).where(
            events.c.ref == ref, events.c.kind == kind)).scalar_one())


def test_an_untouched_ledger_has_no_finding(ledger: Ledger) -> None:
    report = ledger.reconcile(verify_receipts=True)
    assert rows_of(report) == []
    assert report.summary.calls == 5 and not report.failed(strict=True)


def test_an_account_sum_edited(ledger: Ledger) -> None:
    ledger.sql("UPDATE accounts SET credits_posted = credits_posted + 1 WHERE id = 'revenue'")
    report = ledger.reconcile()
    assert rows_of(report) == [("ledger_unbalanced", "error", []),
                               ("account_sums_mismatch", "error", ["accounts/revenue"])]
    assert report.findings[0].message == "posted balances sum to 1, pending to 0"
    assert report.failed()


def test_a_receipt_deleted(ledger: Ledger) -> None:
    charge = ledger.calls["charge"]
    ledger.sql("UPDATE calls SET receipt = NULL WHERE id = :c", c=charge)
    assert rows_of(ledger.reconcile(verify_receipts=True)) == [
        ("captured_call_incomplete", "error", [f"calls/{charge}"])]


def test_a_call_row_deleted_leaves_its_charge_without_a_call(ledger: Ledger) -> None:
    charge = ledger.calls["charge"]
    ledger.sql("DELETE FROM calls WHERE id = :c", c=charge)
    assert rows_of(ledger.reconcile(verify_receipts=True)) == [
        ("charge_without_call", "error", [f"transfers/charge:{charge}"])]


def test_an_audit_event_edited(ledger: Ledger) -> None:
    seq = event_seq(ledger, ledger.calls["charge"], "charge")
    ledger.sql("UPDATE events SET amount = 1 WHERE seq = :s", s=seq)
    report = ledger.reconcile()
    assert rows_of(report) == [("audit_chain_broken", "error", [f"events/{seq}"])]
    assert report.findings[0].rows[0].detail == "the event was changed after it was written"


def test_an_audit_event_deleted(ledger: Ledger) -> None:
    seq = event_seq(ledger, ledger.calls["charge2"], "charge")
    ledger.sql("DELETE FROM events WHERE seq = :s", s=seq)
    report = ledger.reconcile()
    assert rows_of(report) == [("audit_chain_broken", "error",
                                [f"events/{seq}", f"events/{seq + 1}"])]
    assert [r.detail for r in report.findings[0].rows] == [
        f"events {seq}..{seq} are missing", "prev_hash does not match the event before"]


def test_the_last_audit_event_deleted(ledger: Ledger) -> None:
    with reading(ledger.engine) as conn:
        last = conn.execute(select(audit_head.c.seq)).scalar_one()
    ledger.sql("DELETE FROM events WHERE seq = :s", s=last)
    assert rows_of(ledger.reconcile()) == [("audit_chain_broken", "error", [f"events/{last}"])]


def test_a_second_outcome_inserted_for_a_captured_call(ledger: Ledger) -> None:
    captured = ledger.calls["captured"]
    with ledger.engine.begin() as conn:
        conn.execute(insert(transfers).values(
            id=f"void:{captured}", debit_account_id=f"token:{jti_of(ledger, 'acme')}",
            credit_account_id="revenue", amount=5000, kind="void_pending",
            pending_id=f"hold:{captured}", code="void", ref=captured, demo=False,
            created_at=ledger.clock()))
    assert rows_of(ledger.reconcile()) == [
        ("idempotency_key_two_outcomes", "error", [f"calls/{captured}"])]


def test_a_call_charged_twice(ledger: Ledger) -> None:
    charge = ledger.calls["charge"]
    account = f"token:{jti_of(ledger, 'acme')}"
    with ledger.engine.begin() as conn:
        conn.execute(insert(transfers).values(
            id=f"charge:{charge}:again", debit_account_id=account, credit_account_id="revenue",
            amount=5000, kind="posted", code="charge", ref=charge, demo=False,
            created_at=ledger.clock()))
    move_money(ledger, account, 5000)
    assert rows_of(ledger.reconcile()) == [
        ("captured_call_incomplete", "error", [f"calls/{charge}"]),
        ("idempotency_key_two_outcomes", "error", [f"calls/{charge}"])]


def test_a_captured_call_rewritten_as_voided(ledger: Ledger) -> None:
    captured = ledger.calls["captured"]
    ledger.sql("UPDATE calls SET status = 'voided' WHERE id = :c", c=captured)
    assert rows_of(ledger.reconcile()) == [
        ("idempotency_key_two_outcomes", "error", [f"calls/{captured}"])]


def test_a_transfer_amount_changed_with_balanced_books(ledger: Ledger) -> None:
    charge = ledger.calls["charge"]
    ledger.sql("UPDATE transfers SET amount = amount + 5 WHERE id = :t", t=f"charge:{charge}")
    move_money(ledger, f"token:{jti_of(ledger, 'acme')}", 5)
    report = ledger.reconcile()
    assert rows_of(report) == [("charge_amount_mismatch", "error", [f"calls/{charge}"])]
    assert report.findings[0].rows[0].detail == (
        f"call charged 0.005 but charge:{charge} moved 0.005005")


def test_a_charge_posted_after_the_token_was_revoked(ledger: Ledger) -> None:
    first = ledger.call_row(ledger.calls["charge"])
    ledger.sql("UPDATE tokens SET revoked_at = :at WHERE jti = :j",
               at=aware(first.created_at) + timedelta(seconds=1), j=jti_of(ledger, "acme"))
    assert rows_of(ledger.reconcile()) == [("charge_after_revocation", "error", [
        f"calls/{ledger.calls['captured']}", f"calls/{ledger.calls['metered']}"])]


def test_a_charge_posted_after_expiry_beyond_the_leeway(ledger: Ledger) -> None:
    charged = aware(ledger.call_row(ledger.calls["charge2"]).created_at)
    globex = jti_of(ledger, "globex")
    ledger.sql("UPDATE tokens SET expires_at = :at WHERE jti = :j",
               at=charged - timedelta(seconds=29), j=globex)
    assert rows_of(ledger.reconcile(leeway=30)) == []
    ledger.sql("UPDATE tokens SET expires_at = :at WHERE jti = :j",
               at=charged - timedelta(seconds=31), j=globex)
    assert rows_of(ledger.reconcile(leeway=30)) == [
        ("charge_after_expiry", "error", [f"calls/{ledger.calls['charge2']}"])]


def test_a_charge_that_differs_from_its_pricing_version(ledger: Ledger) -> None:
    charge2 = ledger.calls["charge2"]  # translate for globex: 0.05 in version 1
    ledger.sql("UPDATE calls SET amount = 60000, amount_held = 60000 WHERE id = :c", c=charge2)
    ledger.sql("UPDATE transfers SET amount = 60000 WHERE id = :t", t=f"charge:{charge2}")
    move_money(ledger, f"token:{jti_of(ledger, 'globex')}", 10_000)
    report = ledger.reconcile()
    assert rows_of(report) == [("charge_price_mismatch", "error", [f"calls/{charge2}"])]
    assert report.findings[0].rows[0].detail == (
        "charged 0.06, version 1 prices it 0.05 (tools.translate)")
    signed = ledger.reconcile(verify_receipts=True)
    assert rows_of(signed)[-1] == ("receipt_mismatch", "error", [f"calls/{charge2}"])
    assert signed.findings[-1].rows[0].detail == "amount: signed '50000', ledger '60000'"


def test_a_metered_capture_above_what_its_units_cost(ledger: Ledger) -> None:
    metered = ledger.calls["metered"]  # 1234 units at 0.00001 less 20%: 0.009872
    ledger.sql("UPDATE calls SET amount = amount + 1 WHERE id = :c", c=metered)
    ledger.sql("UPDATE transfers SET amount = amount + 1 WHERE id = :t", t=f"capture:{metered}")
    move_money(ledger, f"token:{jti_of(ledger, 'acme')}", 1)
    assert rows_of(ledger.reconcile()) == [
        ("charge_price_mismatch", "error", [f"calls/{metered}"])]


def test_pricing_versions_deleted(ledger: Ledger) -> None:
    ledger.sql("DELETE FROM pricing_versions")
    report = ledger.reconcile()
    [(name, severity, rows)] = rows_of(report)
    captured = [ledger.calls[k] for k in ("charge", "charge2", "captured", "metered")]
    assert (name, severity, sorted(rows)) == (
        "pricing_version_unrecorded", "warning", sorted(f"calls/{c}" for c in captured))
    assert report.findings[0].count == 4
    assert not report.failed() and report.failed(strict=True)


def test_a_hold_left_past_its_timeout(ledger: Ledger) -> None:
    stale = ledger.verifier.hold(ledger.tokens["acme"].token, "search")
    ledger.clock.advance(301)
    report = ledger.reconcile()
    assert rows_of(report) == [("hold_past_timeout", "warning", [f"transfers/hold:{stale.id}"])]
    assert report.summary.held == 1
    assert not report.failed() and report.failed(strict=True)


def test_a_token_spent_beyond_its_limit(ledger: Ledger) -> None:
    acme = jti_of(ledger, "acme")
    ledger.sql("UPDATE tokens SET limit_micro = 1000 WHERE jti = :j", j=acme)
    assert rows_of(ledger.reconcile()) == [("token_overspent", "error", [f"tokens/{acme}"])]


def test_a_forged_receipt_signature(ledger: Ledger) -> None:
    charge = ledger.calls["charge"]
    jws = ledger.call_row(charge).receipt
    head, body, signature = jws.split(".")
    middle = len(signature) // 2
    flipped = "A" if signature[middle] != "A" else "B"
    forged = f"{head}.{body}.{signature[:middle]}{flipped}{signature[middle + 1:]}"
    ledger.sql("UPDATE calls SET receipt = :r WHERE id = :c", r=forged, c=charge)
    assert rows_of(ledger.reconcile()) == []  # signatures are checked on request only
    report = ledger.reconcile(verify_receipts=True)
    assert rows_of(report) == [("receipt_invalid", "error", [f"calls/{charge}"])]
    assert report.findings[0].rows[0].detail == "receipt signature does not verify"


def test_a_receipt_swapped_with_another_calls(ledger: Ledger) -> None:
    charge, other = ledger.calls["charge"], ledger.call_row(ledger.calls["captured"])
    ledger.sql("UPDATE calls SET receipt = :r WHERE id = :c", r=other.receipt, c=charge)
    report = ledger.reconcile(verify_receipts=True)
    assert rows_of(report) == [("receipt_mismatch", "error", [f"calls/{charge}"])]
    assert report.findings[0].rows[0].detail.startswith(
        f"receiptId: signed '{other.id}', ledger '{charge}'")


def test_rows_listed_are_capped_but_all_counted(ledger: Ledger) -> None:
    ledger.sql("UPDATE tokens SET revoked_at = :at", at=ledger.clock() - timedelta(hours=2))
    report = ledger.reconcile(max_rows=2)
    [finding] = report.findings
    assert (finding.name, finding.count, len(finding.rows)) == ("charge_after_revocation", 4, 2)


def test_a_rewritten_chain_verifies_but_moves_the_anchor(ledger: Ledger) -> None:
    """An attacker who re-hashes every later event hides an edit from the chain check alone:
    the anchor a previous reconcile printed is what exposes it."""
    from mcpbill_cli.ledger.audit import GENESIS, event_hash

    before = ledger.reconcile().audit_anchor
    ledger.sql("UPDATE events SET amount = 1 WHERE seq = 3")
    with ledger.engine.begin() as conn:
        previous = GENESIS
        for row in conn.execute(select(events).order_by(events.c.seq)).mappings().all():
            digest = event_hash(previous, dict(row))
            conn.execute(update(events).where(events.c.seq == row["seq"]).values(
                prev_hash=previous, hash=digest))
            previous = digest
        conn.execute(update(audit_head).values(hash=previous))
    after = ledger.reconcile()
    assert rows_of(after) == []
    assert before is not None and after.audit_anchor is not None
    assert after.audit_anchor[0] == before[0] and after.audit_anchor[1] != before[1]

"""Each kind of discrepancy, made by editing rows directly in SQL, is reported by name and
severity with exactly the rows it concerns: one test per attack, on SQLite and PostgreSQL.

The small ledger's trail is sealed in two seals (see ``support.small_ledger``); the attacks on
it come last, each by someone who can write to the database but does not hold the signing key.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, insert, select, update

from mcpbill_cli.clock import aware
from mcpbill_cli.keys import KeyRing, init_keyring
from mcpbill_cli.ledger import audit
from mcpbill_cli.ledger.credit import fund_demo
from mcpbill_cli.ledger.engine import reading, writing
from mcpbill_cli.ledger.models import events, transfers
from mcpbill_cli.ledger.sealing import seal_all
from mcpbill_cli.ledger.seals import read_seals, signer
from mcpbill_cli.reconcile import Window

from .support import USDC, Ledger, rows_of


def jti_of(ledger: Ledger, name: str) -> str:
    return ledger.tokens[name].claims.jti


def move_money(ledger: Ledger, account: str, amount: int) -> None:
    """Keep the books balanced after a tampered transfer: the token's account paid ``amount``
    more, its revenue account earned it."""
    ledger.sql("UPDATE accounts SET debits_posted = debits_posted + :n WHERE id = :a",
               n=amount, a=account)
    ledger.sql("UPDATE accounts SET credits_posted = credits_posted + :n WHERE id = :r",
               n=amount, r=account.replace("token:", "revenue:", 1))


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


def test_a_second_outcome_inserted_for_a_captured_call(ledger: Ledger) -> None:
    captured = ledger.calls["captured"]
    with ledger.engine.begin() as conn:
        conn.execute(insert(transfers).values(
            id=f"void:{captured}", debit_account_id=f"token:{jti_of(ledger, 'acme')}",
            credit_account_id=f"revenue:{jti_of(ledger, 'acme')}", amount=5000, kind="void_pending",
            pending_id=f"hold:{captured}", code="void", ref=captured, demo=False,
            created_at=ledger.clock()))
    assert rows_of(ledger.reconcile()) == [
        ("idempotency_key_two_outcomes", "error", [f"calls/{captured}"]),
        ("event_transfer_mismatch", "error", [f"transfers/void:{captured}"])]


def test_a_call_charged_twice(ledger: Ledger) -> None:
    charge = ledger.calls["charge"]
    account = f"token:{jti_of(ledger, 'acme')}"
    with ledger.engine.begin() as conn:
        conn.execute(insert(transfers).values(
            id=f"charge:{charge}:again", debit_account_id=account,
            credit_account_id=f"revenue:{jti_of(ledger, 'acme')}",
            amount=5000, kind="posted", code="charge", ref=charge, demo=False,
            created_at=ledger.clock()))
    move_money(ledger, account, 5000)
    assert rows_of(ledger.reconcile()) == [
        ("captured_call_incomplete", "error", [f"calls/{charge}"]),
        ("idempotency_key_two_outcomes", "error", [f"calls/{charge}"]),
        ("event_transfer_mismatch", "error", [f"transfers/charge:{charge}:again"])]


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
    assert rows_of(report) == [("charge_amount_mismatch", "error", [f"calls/{charge}"]),
                               ("seal_money_mismatch", "error", ["seals/1"]),
                               ("event_transfer_mismatch", "error", [f"transfers/charge:{charge}"])]
    assert report.findings[0].rows[0].detail == (
        f"call charged 0.005 but charge:{charge} moved 0.005005")
    assert report.findings[1].rows[0].detail.startswith("the transfers its events name add up")


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
    assert rows_of(report) == [("charge_price_mismatch", "error", [f"calls/{charge2}"]),
                               ("seal_money_mismatch", "error", ["seals/1"]),
                               ("event_transfer_mismatch", "error",
                                [f"transfers/charge:{charge2}"])]
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
        ("charge_price_mismatch", "error", [f"calls/{metered}"]),
        ("seal_money_mismatch", "error", ["seals/2"]),
        ("event_transfer_mismatch", "error", [f"transfers/capture:{metered}"])]


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
    ledger.seal()
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


# --- the sealed audit trail -------------------------------------------------------------------


def event_of(ledger: Ledger, ref: str, kind: str) -> dict[str, Any]:
    with reading(ledger.engine) as conn:
        return dict(conn.execute(select(events).where(
            events.c.ref == ref, events.c.kind == kind)).mappings().one())


def rewrite_event(ledger: Ledger, event_id: int, **values: Any) -> None:
    with ledger.engine.begin() as conn:
        conn.execute(update(events).where(events.c.id == event_id).values(**values))


def own_hash(event: dict[str, Any]) -> str:
    """The hash a sealer writes for ``event``: what a forger who knows the form can compute."""
    return audit.event_digest(event)


def seal_hash(claims: dict[str, Any]) -> str:
    """A seal's hash over its fields (``ledger.seals``' documented form)."""
    fields = {name: value for name, value in claims.items()
              if name not in ("hash", "kid", "jws")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
                          ).hexdigest()


def other_signing_key(tmp_path: Path) -> tuple[str, Any]:
    """(alg, key) of a key ring the operator never made."""
    info, key = init_keyring(tmp_path / "forger", "EdDSA", now=datetime.now().astimezone(),
                             force=False).signing_key()
    return info.alg, key


def real_kid(ledger: Ledger) -> str:
    return KeyRing.load(ledger.keys_dir).active().kid


def test_the_trail_is_sealed_in_two_signed_seals(ledger: Ledger) -> None:
    with reading(ledger.engine) as conn:
        written = list(read_seals(conn))
        unsealed = conn.execute(select(events.c.id).where(events.c.seal.is_(None))).all()
    assert [seal.number for seal in written] == [1, 2] and unsealed == []
    assert written[1].prev_hash == written[0].hash
    assert ledger.reconcile().audit_anchor == (2, written[1].hash)


def test_an_audit_event_edited(ledger: Ledger) -> None:
    event = event_of(ledger, ledger.calls["charge"], "charge")
    rewrite_event(ledger, event["id"], amount=1)
    report = ledger.reconcile()
    assert rows_of(report) == [
        ("audit_chain_broken", "error", [f"events/{event['id']}", "seals/1"]),
        ("event_transfer_mismatch", "error", [f"transfers/charge:{ledger.calls['charge']}"])]
    assert [row.detail for row in report.findings[0].rows] == [
        "changed after seal 1 took it",
        "its events no longer hash to its batch hash (an event was reordered or rewritten with "
        "its hash)"]


@pytest.mark.parametrize("field", ["tool", "ref", "detail"])
def test_an_audit_event_given_a_blob_where_text_was_sealed(ledger: Ledger, field: str) -> None:
    """SQLite keeps whatever type it is given: a BLOB in a text field is no value a sealer
    hashed, and is found as an edit, not a crash of the check (PostgreSQL refuses the type)."""
    if ledger.engine.dialect.name != "sqlite":
        pytest.skip("PostgreSQL refuses a BLOB in a text column")
    event = event_of(ledger, ledger.calls["charge"], "charge")
    ledger.sql(f"UPDATE events SET {field} = CAST(ifnull({field}, '{{}}') AS BLOB) "  # noqa: S608
               "WHERE id = :i", i=event["id"])
    report = ledger.reconcile()
    assert ("audit_chain_broken", "error", [f"events/{event['id']}", "seals/1"]) in rows_of(
        report)


def test_an_audit_event_edited_with_its_hash_recomputed(ledger: Ledger) -> None:
    event = event_of(ledger, ledger.calls["charge"], "charge")
    rewrite_event(ledger, event["id"], amount=1, hash=own_hash({**event, "amount": 1}))
    report = ledger.reconcile()
    assert rows_of(report) == [
        ("audit_chain_broken", "error", ["seals/1"]),
        ("event_transfer_mismatch", "error", [f"transfers/charge:{ledger.calls['charge']}"])]
    assert report.findings[0].rows[0].detail.startswith(
        "its events no longer hash to its batch hash")


def test_an_event_inserted_into_a_seal(ledger: Ledger) -> None:
    """A second charge event for a charged call, stamped with the seal of the first and
    carrying a hash of its own: the seal counts one event more than it took."""
    charge = ledger.calls["charge"]
    event = event_of(ledger, charge, "charge")
    forged = {**event, "id": 10_000}
    with ledger.engine.begin() as conn:
        conn.execute(insert(events).values(**{**forged, "hash": own_hash(forged)}))
    report = ledger.reconcile()
    assert rows_of(report) == [("audit_chain_broken", "error", ["seals/1"]),
                               ("seal_money_mismatch", "error", ["seals/1"]),
                               ("event_transfer_mismatch", "error", [f"transfers/charge:{charge}"])]
    assert report.findings[0].rows[0].detail.startswith("holds ")
    assert report.findings[2].rows[0].detail == (
        f"2 charge events for one call (events {event['id']}..10000)")


def test_events_without_transfers_listed_are_capped_but_all_counted(ledger: Ledger) -> None:
    """Found on a connection of its own, the mismatches beyond ``max_rows`` still count."""
    event = event_of(ledger, ledger.calls["charge"], "charge")
    with ledger.engine.begin() as conn:
        forged = [conn.execute(insert(events).values(
            **{**{name: value for name, value in event.items() if name != "id"},
               "ref": f"rcpt_forged{n}", "seal": None, "hash": None}
        ).returning(events.c.id)).scalar_one() for n in range(3)]
    ledger.seal()
    [finding] = ledger.reconcile(max_rows=2).findings
    assert (finding.name, finding.count) == ("event_transfer_mismatch", 3)
    assert [row.key for row in finding.rows] == [str(event_id) for event_id in forged[:2]]


def test_an_event_inserted_with_a_seal_number_no_seal_has(ledger: Ledger) -> None:
    event = event_of(ledger, ledger.calls["charge"], "charge")
    forged = {**event, "id": 10_000, "kind": "issue", "seal": 3}
    with ledger.engine.begin() as conn:
        conn.execute(insert(events).values(**{**forged, "hash": own_hash(forged)}))
    report = ledger.reconcile()
    assert rows_of(report) == [("audit_chain_broken", "error", ["seals/3"]),
                               ("event_transfer_mismatch", "error", ["events/10000"])]
    assert report.findings[0].rows[0].detail.startswith("events carry this seal number")
    assert report.findings[1].rows[0].detail.endswith("which is not in the window")


def test_an_event_inserted_unsealed(ledger: Ledger) -> None:
    """Left unsealed it is a warning; once a sealer took it (a sealer cannot tell a forged
    insert from a late commit), its seal verifies, but a charge event needs its transfer."""
    event = event_of(ledger, ledger.calls["charge"], "charge")
    with ledger.engine.begin() as conn:
        forged = conn.execute(insert(events).values(
            **{**{name: value for name, value in event.items() if name != "id"},
               "ref": "rcpt_forged", "seal": None, "hash": None}
        ).returning(events.c.id)).scalar_one()
    report = ledger.reconcile()
    assert rows_of(report) == [("audit_unsealed", "warning", [f"events/{forged}"]),
                               ("event_transfer_mismatch", "error", [f"events/{forged}"])]
    assert "`mcpbill audit seal`" in report.findings[0].message
    assert report.findings[1].rows[0].detail == (
        "charge event of call rcpt_forged has no transfer charge:rcpt_forged")
    ledger.seal()
    assert rows_of(ledger.reconcile()) == [
        ("event_transfer_mismatch", "error", [f"events/{forged}"])]


def test_events_left_unsealed_past_the_window(ledger: Ledger) -> None:
    held = ledger.verifier.hold(ledger.tokens["acme"].token, "search")
    ledger.verifier.void(held)
    ledger.clock.advance(5)
    assert rows_of(ledger.reconcile()) == []  # a sealer has 5 s
    ledger.clock.advance(1)
    report = ledger.reconcile()
    hold = event_of(ledger, held.id, "hold")["id"]
    assert rows_of(report) == [("audit_unsealed", "warning", [f"events/{hold}"])]
    assert report.findings[0].count == 2
    assert not report.failed() and report.failed(strict=True)
    ledger.seal()
    assert rows_of(ledger.reconcile()) == []


def test_an_audit_event_deleted(ledger: Ledger) -> None:
    charge2 = ledger.calls["charge2"]
    event = event_of(ledger, charge2, "charge")
    with ledger.engine.begin() as conn:
        conn.execute(delete(events).where(events.c.id == event["id"]))
    report = ledger.reconcile()
    assert rows_of(report) == [
        ("audit_chain_broken", "error", ["seals/1"]),
        ("seal_money_mismatch", "error", ["seals/1"]),
        ("event_transfer_mismatch", "error", [f"transfers/charge:{charge2}"])]
    assert "events were inserted or deleted" in report.findings[0].rows[0].detail


def swap_ids(ledger: Ledger, first: int, second: int) -> None:
    with ledger.engine.begin() as conn:
        for old, new in ((first, -1), (second, first), (-1, second)):
            conn.execute(update(events).where(events.c.id == old).values(id=new))


def test_two_audit_events_swapped(ledger: Ledger) -> None:
    charge = event_of(ledger, ledger.calls["charge"], "charge")["id"]
    charge2 = event_of(ledger, ledger.calls["charge2"], "charge")["id"]
    swap_ids(ledger, charge, charge2)
    assert rows_of(ledger.reconcile()) == [
        ("audit_chain_broken", "error", [f"events/{charge}", f"events/{charge2}", "seals/1"])]


def test_two_audit_events_swapped_with_their_hashes_recomputed(ledger: Ledger) -> None:
    charge = event_of(ledger, ledger.calls["charge"], "charge")["id"]
    charge2 = event_of(ledger, ledger.calls["charge2"], "charge")["id"]
    swap_ids(ledger, charge, charge2)
    for ref in (ledger.calls["charge"], ledger.calls["charge2"]):
        event = event_of(ledger, ref, "charge")
        rewrite_event(ledger, event["id"], hash=own_hash(event))
    report = ledger.reconcile()
    assert rows_of(report) == [("audit_chain_broken", "error", ["seals/1"])]
    assert "reordered" in report.findings[0].rows[0].detail


def first_seal(ledger: Ledger) -> dict[str, Any]:
    with reading(ledger.engine) as conn:
        return list(read_seals(conn))[0].to_dict()


def test_a_seal_edited(ledger: Ledger) -> None:
    ledger.sql("UPDATE seals SET batch_hash = :h WHERE number = 1", h="0" * 64)
    report = ledger.reconcile()
    assert rows_of(report) == [("audit_chain_broken", "error", ["seals/1"])]
    assert report.findings[0].rows[0].detail.startswith("its hash does not match its fields")


def test_a_seal_edited_with_its_hash_recomputed(ledger: Ledger) -> None:
    """Its signature no longer covers it, and the seal after no longer links to it."""
    claims = {**first_seal(ledger), "batchHash": "0" * 64}
    ledger.sql("UPDATE seals SET batch_hash = :b, hash = :h WHERE number = 1",
               b="0" * 64, h=seal_hash(claims))
    report = ledger.reconcile()
    assert rows_of(report) == [("audit_chain_broken", "error", ["seals/1", "seals/2"])]
    assert [row.detail for row in report.findings[0].rows] == [
        "its signature covers other fields than the seal's",
        "does not link to the seal before it (a seal was removed, added or rewritten)"]


def test_a_seal_deleted(ledger: Ledger) -> None:
    ledger.sql("DELETE FROM seals WHERE number = 1")
    report = ledger.reconcile()
    assert rows_of(report) == [("audit_chain_broken", "error", ["seals/1", "seals/2"])]
    assert report.findings[0].rows[0].detail == "missing: later seals exist (deleted?)"


def test_the_last_seal_deleted(ledger: Ledger) -> None:
    ledger.sql("DELETE FROM seals WHERE number = 2")
    report = ledger.reconcile()
    assert rows_of(report) == [("audit_chain_broken", "error", ["seals/2"])]
    assert report.findings[0].rows[0].detail.startswith("events carry this seal number")


def test_a_seal_forged_with_another_key(ledger: Ledger, tmp_path: Path) -> None:
    """Re-signed under the operator's kid with a key the operator never had."""
    alg, key = other_signing_key(tmp_path)
    claims = {name: value for name, value in first_seal(ledger).items()
              if name not in ("kid", "jws")}
    _, jws = signer(alg, real_kid(ledger), key)(claims)
    ledger.sql("UPDATE seals SET jws = :j WHERE number = 1", j=jws)
    report = ledger.reconcile()
    assert rows_of(report) == [("audit_chain_broken", "error", ["seals/1"])]
    assert report.findings[0].rows[0].detail == "its signature does not verify"
    assert rows_of(ledger.reconcile(keys_dir=None)) == []


def test_a_history_rechained_and_resigned_with_another_key(ledger: Ledger,
                                                           tmp_path: Path) -> None:
    """Every seal rewritten over an edited event, linked and signed by a key ring the forger
    made: every seal fails its signature. Without the key ring nothing shows but the anchor a
    previous reconcile printed."""
    before = ledger.reconcile().audit_anchor
    event = event_of(ledger, ledger.calls["charge"], "charge")
    rewrite_event(ledger, event["id"], amount=1)
    ledger.sql("UPDATE events SET seal = NULL, hash = NULL")
    ledger.sql("DELETE FROM seals")
    forger = init_keyring(tmp_path / "forger", "EdDSA", now=datetime.now().astimezone(),
                          force=False)
    info, key = forger.signing_key()
    seal_all(ledger.engine, signer(info.alg, info.kid, key), clock=ledger.clock)
    report = ledger.reconcile()
    # The edited event no longer says what its transfer moved: found with or without keys.
    edited = ("event_transfer_mismatch", "error", [f"transfers/charge:{ledger.calls['charge']}"])
    assert rows_of(report) == [("audit_chain_broken", "error", ["seals/1"]), edited]
    assert report.findings[0].rows[0].detail == (
        f"signed by key {info.kid!r}, which the key ring does not hold")
    blind = ledger.reconcile(keys_dir=None)
    assert rows_of(blind) == [edited] and "seal_signatures (keys_dir)" in blind.skipped
    assert blind.audit_anchor is not None and blind.audit_anchor != before


def test_a_sealed_deposit_moved_to_another_tenant_with_the_sums_edited(ledger: Ledger) -> None:
    """The seal's money signs nets per class of account: a deposit moved from one tenant to
    another keeps them, and the accounts' sums were edited to match. Its sealed event still
    names the tenant it was for."""
    with writing(ledger.engine) as conn:
        fund_demo(conn, "initech", 7 * USDC, now=ledger.clock())
    ledger.seal()
    with reading(ledger.engine) as conn:
        deposit, amount = conn.execute(select(transfers.c.id, transfers.c.amount).where(
            transfers.c.code == "deposit",
            transfers.c.credit_account_id == "tenant:initech")).one()
    ledger.sql("UPDATE transfers SET credit_account_id = 'tenant:globex' WHERE id = :d",
               d=deposit)
    ledger.sql("UPDATE accounts SET credits_posted = credits_posted - :n "
               "WHERE id = 'tenant:initech'", n=amount)
    ledger.sql("UPDATE accounts SET credits_posted = credits_posted + :n "
               "WHERE id = 'tenant:globex'", n=amount)
    report = ledger.reconcile()
    assert rows_of(report) == [("event_transfer_mismatch", "error", [f"transfers/{deposit}"])]
    detail = report.findings[0].rows[0].detail
    assert "names tenant:initech and 7000000" in detail and "from tenant:globex" in detail


def test_a_sealed_charge_moved_to_another_tenants_token_with_the_sums_edited(
        ledger: Ledger) -> None:
    """acme's charge made globex's: its transfer, its call row and both tokens' sums."""
    charge, acme, globex = (ledger.calls["charge"], jti_of(ledger, "acme"),
                            jti_of(ledger, "globex"))
    amount = ledger.call_row(charge).amount
    ledger.sql("UPDATE transfers SET debit_account_id = :g WHERE id = 'charge:' || :c",
               g=f"token:{globex}", c=charge)
    ledger.sql("UPDATE calls SET jti = :g, tenant = 'globex' WHERE id = :c", g=globex, c=charge)
    ledger.sql("UPDATE accounts SET debits_posted = debits_posted - :n WHERE id = :a",
               n=amount, a=f"token:{acme}")
    ledger.sql("UPDATE accounts SET debits_posted = debits_posted + :n WHERE id = :g",
               n=amount, g=f"token:{globex}")
    report = ledger.reconcile()
    assert ("event_transfer_mismatch", "error", [f"transfers/charge:{charge}"]) in rows_of(
        report)
    assert report.failed()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # PostgreSQL keeps a timestamp
def test_a_sealed_time_restated_with_an_offset_to_move_it_to_the_next_day(
        ledger: Ledger) -> None:
    """The same instant written with a UTC offset hashes as the sealed one, but SQLite
    compares the text: the charge and its transfer would move to the next day."""
    charge = ledger.calls["charge"]
    event = event_of(ledger, charge, "charge")
    instant = aware(event["at"])
    restated = (instant + timedelta(hours=23, minutes=59)).strftime(
        "%Y-%m-%d %H:%M:%S.%f") + "+23:59"
    ledger.sql("UPDATE events SET at = :at WHERE id = :i", at=restated, i=event["id"])
    ledger.sql("UPDATE transfers SET created_at = :at WHERE id = :t", at=restated,
               t=f"charge:{charge}")
    assert restated[:10] > instant.strftime("%Y-%m-%d")  # as text, the next day's
    report = ledger.reconcile(window=Window(instant - timedelta(days=1),
                                            instant + timedelta(days=2)))
    broken = [row for finding in report.findings if finding.name == "audit_chain_broken"
              for row in finding.rows]
    assert [(row.table, row.key) for row in broken][:1] == [("events", str(event["id"]))]
    assert "+23:59" in broken[0].detail

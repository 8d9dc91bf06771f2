"""`mcpbill refund RCPT`: exit codes and --json as a script meets them, money back to the token
or to the tenant, a refund receipt that `receipt verify` checks against `keys export-jwks`."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select

from mcpbill_cli import Receipt, Verifier
from mcpbill_cli.ledger.engine import make_engine, reading
from mcpbill_cli.ledger.models import events, refunds, transfers
from tests.cli.conftest import Invoke, error_json, ok_json
from tests.cli.data_contract import assert_contract
from tests.verifier.invariants import assert_ledger_invariants


def charged(token: str, key: str) -> Receipt:
    verifier = Verifier.from_settings()
    try:
        return verifier.charge(token, "search", idempotency_key=key)
    finally:
        verifier.close()


def ledger_counts(db_url: str) -> tuple[int, int, int]:
    """(refund rows, refund transfers, refund events), with the invariants asserted."""
    engine = make_engine(db_url)
    try:
        with reading(engine) as conn:
            assert_ledger_invariants(conn)
            return tuple(int(conn.execute(query).scalar_one()) for query in (  # type: ignore[return-value]
                select(func.count()).select_from(refunds),
                select(func.count()).where(transfers.c.code == "refund"),
                select(func.count()).where(events.c.kind == "refund")))
    finally:
        engine.dispose()


def a_paid_call(cli: Invoke, limit: str = "1") -> tuple[dict[str, str], Receipt]:
    ok_json(cli("wallet", "fund", "--demo", "5", "--json"))
    issued = ok_json(cli("token", "issue", "--limit", limit, "--json"))
    ok_json(cli("pricing", "set", "search", "0.05", "--json"))
    return issued, charged(issued["token"], "call-1")


def test_partial_then_full_refund_back_to_the_token(ledger_cli: Invoke, db_url: str) -> None:
    issued, receipt = a_paid_call(ledger_cli)
    part = ok_json(ledger_cli("refund", receipt.receipt_id, "--amount", "0.02", "--reason",
                              "slow answer", "--json"))
    assert_contract(("refund",), part)
    assert (part["amount_usd"], part["refundable_usd"], part["credited_to"]) == (
        "0.02", "0.03", f"token:{issued['jti']}")
    assert (part["reason"], part["replayed"], part["receipt_id"]) == (
        "slow answer", False, receipt.receipt_id)
    shown = ok_json(ledger_cli("token", "show", issued["jti"], "--json"))
    assert (shown["limit_usd"], shown["remaining_usd"]) == ("1.02", "0.97")

    rest = ok_json(ledger_cli("refund", receipt.receipt_id, "--json"))
    assert (rest["amount_usd"], rest["refunded_usd"], rest["refundable_usd"]) == (
        "0.03", "0.05", "0.00")
    balance = ok_json(ledger_cli("wallet", "balance", "--json"))
    assert (balance["spent_usd"], balance["allotted_usd"], balance["available_usd"]) == (
        "0.00", "1.00", "4.00")
    assert ledger_counts(db_url) == (2, 2, 2)


def test_refusals_exit_with_their_codes_and_change_nothing(ledger_cli: Invoke,
                                                           db_url: str) -> None:
    _, receipt = a_paid_call(ledger_cli)
    ok_json(ledger_cli("refund", receipt.receipt_id, "--amount", "0.04", "--json"))
    before = ledger_counts(db_url)

    over = ledger_cli("refund", receipt.receipt_id, "--amount", "0.011", "--json")
    assert over.exit_code == 5
    assert error_json(over, "REFUND_EXCEEDS_CHARGE")["refundableUsd"] == "0.01"
    missing = ledger_cli("refund", "rcpt_nothing", "--json")
    assert missing.exit_code == 4
    error_json(missing, "NOT_FOUND")
    bad = ledger_cli("refund", receipt.receipt_id, "--amount", "-1", "--json")
    assert bad.exit_code == 3
    error_json(bad, "INVALID_INPUT")
    human = ledger_cli("refund", receipt.receipt_id, "--amount", "1")
    assert human.exit_code == 5 and "REFUND_EXCEEDS_CHARGE" in human.stderr
    assert human.stdout == ""
    assert ledger_counts(db_url) == before


def test_a_voided_call_is_not_refundable(ledger_cli: Invoke) -> None:
    ok_json(ledger_cli("wallet", "fund", "--demo", "5", "--json"))
    issued = ok_json(ledger_cli("token", "issue", "--limit", "1", "--json"))
    verifier = Verifier.from_settings()
    try:
        hold = verifier.hold(issued["token"], "search")
        verifier.void(hold)
    finally:
        verifier.close()
    result = ledger_cli("refund", hold.id, "--json")
    assert result.exit_code == 7
    assert error_json(result, "CALL_NOT_CAPTURED")["status"] == "voided"


def test_a_retry_with_its_key_refunds_once(ledger_cli: Invoke, db_url: str) -> None:
    _, receipt = a_paid_call(ledger_cli)
    first = ok_json(ledger_cli("refund", receipt.receipt_id, "--amount", "0.01",
                               "--idempotency-key", "ticket-1", "--json"))
    again = ok_json(ledger_cli("refund", receipt.receipt_id, "--amount", "0.01",
                               "--idempotency-key", "ticket-1", "--json"))
    assert again["replayed"] is True and again["refund_id"] == first["refund_id"]
    assert again["jws"] == first["jws"]
    other = ledger_cli("refund", receipt.receipt_id, "--amount", "0.02",
                       "--idempotency-key", "ticket-1", "--json")
    assert other.exit_code == 7
    error_json(other, "IDEMPOTENCY_CONFLICT")
    assert ledger_counts(db_url) == (1, 1, 1)


def test_after_revoke_the_refund_goes_to_the_tenant(ledger_cli: Invoke, db_url: str) -> None:
    issued, receipt = a_paid_call(ledger_cli)
    ok_json(ledger_cli("revoke", issued["jti"], "--json"))
    before = ok_json(ledger_cli("wallet", "balance", "--json"))
    assert before["available_usd"] == "4.95"
    done = ok_json(ledger_cli("refund", receipt.receipt_id, "--json"))
    assert done["credited_to"] == "tenant:default"
    after = ok_json(ledger_cli("wallet", "balance", "--json"))
    assert (after["available_usd"], after["spent_usd"]) == ("5.00", "0.00")
    assert ok_json(ledger_cli("token", "show", issued["jti"], "--json"))["limit_usd"] == "1.00"
    assert ledger_counts(db_url) == (1, 1, 1)


def test_the_refund_receipt_verifies_with_the_exported_jwks(ledger_cli: Invoke,
                                                            tmp_path: Path) -> None:
    _, receipt = a_paid_call(ledger_cli)
    done = ok_json(ledger_cli("refund", receipt.receipt_id, "--amount", "0.01", "--json"))
    jwks = tmp_path / "jwks.json"
    exported = ledger_cli("keys", "export-jwks")
    assert exported.exit_code == 0, exported.output
    jwks.write_text(exported.stdout)

    verified = ok_json(ledger_cli("receipt", "verify", done["jws"], "--jwks", str(jwks),
                                  "--json"))
    assert_contract(("receipt", "verify"), verified)
    assert verified["valid"] is True
    assert (verified["refund_id"], verified["amount_micro"]) == (done["refund_id"], 10_000)
    head, body, signature = done["jws"].split(".")
    forged = ledger_cli("receipt", "verify", f"{head}.{body}x.{signature}", "--jwks",
                        str(jwks), "--json")
    assert forged.exit_code == 6
    error_json(forged, "INVALID_RECEIPT")

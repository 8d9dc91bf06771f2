"""`wallet fund --demo X --idempotency-key KEY`: a retried funding credits once."""

from __future__ import annotations

from sqlalchemy import Engine, func, select

from mcpbill_cli.clock import utcnow
from mcpbill_cli.ledger import credit
from mcpbill_cli.ledger.engine import make_engine, reading, writing
from mcpbill_cli.ledger.models import events, transfers
from tests.cli.conftest import Invoke, error_json, ok_json
from tests.verifier.billing_support import run_threads
from tests.verifier.invariants import assert_ledger_invariants


def deposits(db_url: str) -> int:
    """Deposit transfers in the ledger, checked to match their audit events one to one."""
    engine = make_engine(db_url)
    try:
        with reading(engine) as conn:
            assert_ledger_invariants(conn)
            moved = conn.execute(select(func.count()).where(
                transfers.c.code == "deposit")).scalar_one()
            audited = conn.execute(select(func.count()).where(
                events.c.kind == "deposit")).scalar_one()
    finally:
        engine.dispose()
    assert moved == audited
    return int(moved)


def test_the_same_key_twice_funds_once(ledger_cli: Invoke, db_url: str) -> None:
    first = ok_json(ledger_cli("wallet", "fund", "--demo", "5", "--idempotency-key", "order-7",
                               "--json"))
    again = ok_json(ledger_cli("wallet", "fund", "--demo", "5.00", "--idempotency-key",
                               "order-7", "--json"))
    assert (first["replayed"], again["replayed"]) == (False, True)
    assert again["transfer_id"] == first["transfer_id"]
    assert again["available_usd"] == "5.00"
    assert deposits(db_url) == 1


def test_another_amount_with_the_same_key_is_a_conflict(ledger_cli: Invoke, db_url: str) -> None:
    ok_json(ledger_cli("wallet", "fund", "--demo", "5", "--idempotency-key", "order-7", "--json"))
    result = ledger_cli("wallet", "fund", "--demo", "6", "--idempotency-key", "order-7", "--json")
    assert result.exit_code == 7, result.output
    error = error_json(result, "IDEMPOTENCY_CONFLICT")
    assert "5.00" in error["message"] and "order-7" in error["message"]
    assert ok_json(ledger_cli("wallet", "balance", "--json"))["available_usd"] == "5.00"
    assert deposits(db_url) == 1


def test_keys_belong_to_the_tenant(ledger_cli: Invoke, db_url: str) -> None:
    for tenant in ("acme", "zeta"):
        ok_json(ledger_cli("wallet", "fund", "--tenant", tenant, "--demo", "2",
                           "--idempotency-key", "k", "--json"))
    assert deposits(db_url) == 2


def test_without_a_key_every_funding_counts(ledger_cli: Invoke, db_url: str) -> None:
    for _ in range(2):
        ok_json(ledger_cli("wallet", "fund", "--demo", "1", "--json"))
    assert ok_json(ledger_cli("wallet", "balance", "--json"))["available_usd"] == "2.00"


def test_a_bad_key_or_a_key_with_tx_is_refused(ledger_cli: Invoke) -> None:
    for args in (("--demo", "1", "--idempotency-key", ""),
                 ("--demo", "1", "--idempotency-key", "x" * 129),
                 ("--tx", "0x" + "ab" * 32, "--idempotency-key", "k")):
        result = ledger_cli("wallet", "fund", *args, "--json")
        assert result.exit_code == 3, result.output
        error_json(result, "INVALID_INPUT")


def test_racing_retries_of_one_key_fund_once(engine: Engine) -> None:
    def fund() -> credit.Funding:
        with writing(engine) as conn:
            return credit.fund_demo(conn, "acme", 3_000_000, now=utcnow(),
                                    idempotency_key="race")

    outcomes = run_threads(8, fund)
    assert sorted(f.replayed for f in outcomes) == [False] + [True] * 7
    with reading(engine) as conn:
        assert credit.tenant_balance(conn, "acme").funded == 3_000_000
        assert_ledger_invariants(conn)

"""`token topup JTI --amount X`: more credit for a live token, exactly, never past the tenant."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

from mcpbill_cli import Verifier
from mcpbill_cli.clock import utcnow
from mcpbill_cli.errors import BillingError
from mcpbill_cli.keys import KeyRing, KeySource, init_keyring
from mcpbill_cli.ledger import credit
from mcpbill_cli.ledger.engine import make_engine, reading, writing
from mcpbill_cli.ledger.models import events
from mcpbill_cli.ledger.token_changes import topup
from mcpbill_cli.pricing import PricingTable
from tests.cli.conftest import Invoke, error_json, ok_json, tree_snapshot
from tests.verifier.billing_support import PRICE, PRICING_DOC, USDC, fund, mint, run_threads
from tests.verifier.invariants import assert_ledger_invariants


def check_ledger(db_url: str) -> int:
    """Assert the invariants; the number of topup events."""
    engine = make_engine(db_url)
    try:
        with reading(engine) as conn:
            assert_ledger_invariants(conn)
            return int(conn.execute(select(func.count()).where(
                events.c.kind == "topup")).scalar_one())
    finally:
        engine.dispose()


def test_topup_moves_credit_from_the_tenant_to_the_token(ledger_cli: Invoke,
                                                         db_url: str) -> None:
    ok_json(ledger_cli("wallet", "fund", "--demo", "5", "--json"))
    issued = ok_json(ledger_cli("token", "issue", "--limit", "1", "--json"))
    done = ok_json(ledger_cli("token", "topup", issued["jti"], "--amount", "2.5", "--json"))
    assert (done["amount_usd"], done["limit_usd"], done["remaining_usd"]) == (
        "2.50", "3.50", "3.50")
    assert done["source"] == "tenant:default"
    shown = ok_json(ledger_cli("token", "show", issued["jti"], "--json"))
    assert (shown["limit_usd"], shown["remaining_usd"]) == ("3.50", "3.50")
    balance = ok_json(ledger_cli("wallet", "balance", "--json"))
    assert (balance["available_usd"], balance["allotted_usd"]) == ("1.50", "3.50")
    assert check_ledger(db_url) == 1


def test_the_same_token_spends_its_topup(ledger_cli: Invoke, db_url: str) -> None:
    ok_json(ledger_cli("wallet", "fund", "--demo", "1", "--json"))
    issued = ok_json(ledger_cli("token", "issue", "--limit", "0.002", "--json"))
    verifier = Verifier.from_settings()
    try:
        verifier.charge(issued["token"], "search", idempotency_key="one")
        with pytest.raises(BillingError) as refused:
            verifier.charge(issued["token"], "search", idempotency_key="two")
        assert refused.value.code == "BUDGET_EXCEEDED"
        ok_json(ledger_cli("token", "topup", issued["jti"], "--amount", "0.002", "--json"))
        receipt = verifier.charge(issued["token"], "search", idempotency_key="three")
    finally:
        verifier.close()
    assert receipt.claims["remainingUsd"] == "0.00"
    check_ledger(db_url)


def test_a_child_is_topped_up_from_its_parent(ledger_cli: Invoke) -> None:
    ok_json(ledger_cli("wallet", "fund", "--demo", "5", "--json"))
    parent = ok_json(ledger_cli("token", "issue", "--limit", "2", "--json"))["jti"]
    child = ok_json(ledger_cli("token", "issue", "--limit", "0.5", "--parent", parent,
                               "--json"))["jti"]
    done = ok_json(ledger_cli("token", "topup", child, "--amount", "1", "--json"))
    assert (done["source"], done["limit_usd"]) == (f"token:{parent}", "1.50")
    assert ok_json(ledger_cli("token", "show", parent, "--json"))["remaining_usd"] == "0.50"
    result = ledger_cli("token", "topup", child, "--amount", "0.6", "--json")
    assert result.exit_code == 5
    assert "parent token" in error_json(result, "INSUFFICIENT_FUNDS")["message"]


def test_more_than_the_tenant_has_is_refused_and_nothing_moves(
        ledger_cli: Invoke, db_url: str, isolated_home: Path) -> None:
    ok_json(ledger_cli("wallet", "fund", "--demo", "2", "--json"))
    jti = ok_json(ledger_cli("token", "issue", "--limit", "1", "--json"))["jti"]
    before = (tree_snapshot(isolated_home), ok_json(ledger_cli("token", "show", jti, "--json")))
    result = ledger_cli("token", "topup", jti, "--amount", "1.000001", "--json")
    assert result.exit_code == 5, result.output
    assert "1.00" in error_json(result, "INSUFFICIENT_FUNDS")["message"]
    after = (tree_snapshot(isolated_home), ok_json(ledger_cli("token", "show", jti, "--json")))
    assert after == before
    assert ok_json(ledger_cli("wallet", "balance", "--json"))["available_usd"] == "1.00"
    assert check_ledger(db_url) == 0


def test_revoked_expired_and_unknown_tokens_are_refused(ledger_cli: Invoke, db_url: str) -> None:
    ok_json(ledger_cli("wallet", "fund", "--demo", "5", "--json"))
    revoked = ok_json(ledger_cli("token", "issue", "--limit", "1", "--json"))["jti"]
    ok_json(ledger_cli("revoke", revoked, "--json"))
    expired = ok_json(ledger_cli("token", "issue", "--limit", "1", "--ttl", "1s", "--json"))
    time.sleep(1.2)
    for jti, code, exit_code in [(revoked, "TOKEN_REVOKED", 6),
                                 (expired["jti"], "INVALID_CREDIT_TOKEN", 6),
                                 ("tok_nope", "NOT_FOUND", 4)]:
        result = ledger_cli("token", "topup", jti, "--amount", "1", "--json")
        assert result.exit_code == exit_code, result.output
        error_json(result, code)
    assert check_ledger(db_url) == 0


@pytest.mark.parametrize("amount", ["0", "-1", "1e3", "0.0000001"])
def test_bad_amounts_are_refused(ledger_cli: Invoke, amount: str) -> None:
    ok_json(ledger_cli("wallet", "fund", "--demo", "5", "--json"))
    jti = ok_json(ledger_cli("token", "issue", "--limit", "1", "--json"))["jti"]
    result = ledger_cli("token", "topup", jti, "--amount", amount, "--json")
    assert result.exit_code == 3, result.output
    error_json(result, "INVALID_INPUT")


def test_topups_racing_charges_never_overspend_the_tenant(pg_engine: Engine,
                                                          tmp_path: Path) -> None:
    """PostgreSQL: 12 topups of 1 USDC race 200 charges on one token; the tenant has 5 left
    after the issue, so exactly 5 topups succeed, and no charge spends past the limit (a charge
    that runs before enough topups is refused, never overdrawn)."""
    now = utcnow()
    init_keyring(tmp_path / "keys", "EdDSA", now=now, force=False).save()
    ring = KeyRing.load(tmp_path / "keys")
    fund(pg_engine, "acme", 6 * USDC, now=now)
    token = mint(pg_engine, ring, now=now, limit=USDC)
    verifier = Verifier(keys=KeySource(directory=tmp_path / "keys"),
                        pricing=PricingTable.from_document(PRICING_DOC), engine=pg_engine)

    def work(index: int) -> Counter[str]:
        outcomes: Counter[str] = Counter()
        for n in range(20):
            try:
                if index < 4:
                    with writing(pg_engine) as conn:
                        topup(conn, token.claims.jti, USDC, now=utcnow())
                    outcomes["topup"] += 1
                else:
                    verifier.charge(token.token, "search", args={"i": index, "n": n})
                    outcomes["charge"] += 1
            except BillingError as exc:
                outcomes[exc.code] += 1
            if index < 4 and n == 2:
                break
        return outcomes

    try:
        outcomes = sum(run_threads(14, work, indexed=True), Counter())
    finally:
        verifier.close()
    assert outcomes["topup"] == 5 and outcomes["INSUFFICIENT_FUNDS"] == 7
    assert outcomes["charge"] + outcomes["BUDGET_EXCEEDED"] == 200, outcomes
    with reading(pg_engine) as conn:
        assert_ledger_invariants(conn)
        balance = credit.tenant_balance(conn, "acme")
        view = credit.show(conn, token.claims.jti, now=utcnow())
    assert balance.available == 0 and balance.funded == 6 * USDC
    assert view.limit == 6 * USDC and view.spent == outcomes["charge"] * PRICE <= view.limit


def test_a_retried_topup_with_its_key_moves_credit_once(ledger_cli: Invoke,
                                                        db_url: str) -> None:
    ok_json(ledger_cli("wallet", "fund", "--demo", "5", "--json"))
    jti = ok_json(ledger_cli("token", "issue", "--limit", "1", "--json"))["jti"]
    topup_once = ("token", "topup", jti, "--amount", "2", "--idempotency-key", "run-42", "--json")

    first, again = ok_json(ledger_cli(*topup_once)), ok_json(ledger_cli(*topup_once))

    assert (first["replayed"], again["replayed"]) == (False, True)
    assert first["transfer_id"] == again["transfer_id"]
    assert again["limit_usd"] == again["remaining_usd"] == "3.00"
    assert ok_json(ledger_cli("wallet", "balance", "--json"))["available_usd"] == "2.00"
    conflict = ledger_cli("token", "topup", jti, "--amount", "1", "--idempotency-key", "run-42",
                          "--json")
    assert conflict.exit_code == 7
    assert error_json(conflict, "IDEMPOTENCY_CONFLICT")["amount_usd"] == "2.00"
    # The key is the token's: another token's topup with the same key is its own.
    other = ok_json(ledger_cli("token", "issue", "--limit", "1", "--json"))["jti"]
    assert not ok_json(ledger_cli("token", "topup", other, "--amount", "1",
                                  "--idempotency-key", "run-42", "--json"))["replayed"]
    assert ok_json(ledger_cli("token", "show", jti, "--json"))["limit_usd"] == "3.00"
    assert check_ledger(db_url) == 2


def test_topups_racing_with_one_key_move_credit_once(pg_engine: Engine, tmp_path: Path) -> None:
    """PostgreSQL: 8 threads retry one keyed topup at once: one moves, the others replay it."""
    now = utcnow()
    init_keyring(tmp_path / "keys", "EdDSA", now=now, force=False).save()
    fund(pg_engine, "acme", 6 * USDC, now=now)
    token = mint(pg_engine, KeyRing.load(tmp_path / "keys"), now=now, limit=USDC)

    def work() -> bool:
        with writing(pg_engine) as conn:
            return topup(conn, token.claims.jti, USDC, now=utcnow(),
                         idempotency_key="retry").replayed

    replayed = run_threads(8, work)

    assert sorted(replayed) == [False] + [True] * 7
    with reading(pg_engine) as conn:
        assert_ledger_invariants(conn)
        assert credit.show(conn, token.claims.jti, now=utcnow()).limit == 2 * USDC
        assert credit.tenant_balance(conn, "acme").available == 4 * USDC

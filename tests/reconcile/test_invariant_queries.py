"""``ledger.invariants`` finds what its first, plainer queries found, row for row: a query
per side and per sum, joined to the accounts, and the posted transfers counted per call
joined to the captured calls (faster forms replaced them; these tests keep them honest)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Connection, Engine, and_, case, func, literal, select, text

from mcpbill_cli.ledger import invariants
from mcpbill_cli.ledger.engine import reading
from mcpbill_cli.ledger.models import accounts, calls, tokens, transfers

from .support import Ledger
from .test_tampering import jti_of

a, t, c, tk = accounts.c, transfers.c, calls.c, tokens.c


def defined_sums(conn: Connection) -> list[str]:
    is_posted = t.kind.in_(("posted", "post_pending"))
    is_pending = and_(t.kind == "pending", t.status == "pending")

    def side(column: Any, condition: Any) -> Any:
        return (select(column.label("account"),
                       func.sum(case((condition, t.amount), else_=0)).label("n"))
                .group_by(column).subquery())

    dp, cp = side(t.debit_account_id, is_posted), side(t.credit_account_id, is_posted)
    dq, cq = side(t.debit_account_id, is_pending), side(t.credit_account_id, is_pending)
    zero = literal(0)
    query = (select(a.id)
             .outerjoin(dp, dp.c.account == a.id).outerjoin(cp, cp.c.account == a.id)
             .outerjoin(dq, dq.c.account == a.id).outerjoin(cq, cq.c.account == a.id)
             .where((a.debits_posted != func.coalesce(dp.c.n, zero))
                    | (a.credits_posted != func.coalesce(cp.c.n, zero))
                    | (a.debits_pending != func.coalesce(dq.c.n, zero))
                    | (a.credits_pending != func.coalesce(cq.c.n, zero))))
    return sorted(r.id for r in conn.execute(query))


def defined_overspent(conn: Connection) -> list[str]:
    spent = (select(t.debit_account_id.label("account"), func.sum(t.amount).label("spent"))
             .where(t.code.in_(("charge", "capture"))).group_by(t.debit_account_id).subquery())
    return sorted(r.jti for r in conn.execute(
        select(tk.jti).join(spent, spent.c.account == "token:" + tk.jti)
        .where(spent.c.spent > tk.limit_micro)))


def defined_incomplete(conn: Connection) -> list[str]:
    posted = (select(t.ref.label("call"), func.count().label("n"))
              .where(t.code.in_(("charge", "capture"))).group_by(t.ref).subquery())
    return sorted(r.id for r in conn.execute(
        select(c.id).outerjoin(posted, posted.c.call == c.id)
        .where(c.status == "captured",
               (func.coalesce(posted.c.n, 0) != 1) | c.receipt.is_(None))))


def found(ledger: Ledger) -> dict[str, list[str]]:
    with reading(ledger.engine) as conn:
        return {v.check: sorted(map(str, v.rows)) for v in invariants.check(conn) if v.rows}


def defined(ledger: Ledger) -> dict[str, list[str]]:
    with reading(ledger.engine) as conn:
        rows = {"sums_match_transfers": defined_sums(conn),
                "spent_within_limit": defined_overspent(conn),
                "captured_calls_posted": defined_incomplete(conn)}
    return {check: listed for check, listed in rows.items() if listed}


TAMPERING = {
    "clean": [],
    "posted_sum": ["UPDATE accounts SET credits_posted = credits_posted + 1 WHERE id = 'revenue'"],
    "pending_sums": ["UPDATE accounts SET debits_pending = debits_pending + 7, "
                     "credits_pending = credits_pending + 7 WHERE kind = 'token'"],
    "transfer_gone": ["DELETE FROM transfers WHERE id = 'charge:' || :charge"],
    "charge_moved_to_another_call": ["UPDATE transfers SET ref = :charge2 "
                                     "WHERE id = 'charge:' || :charge"],
    "receipt_gone": ["UPDATE calls SET receipt = NULL WHERE id = :captured"],
    "limit_cut": ["UPDATE tokens SET limit_micro = 1000 WHERE jti = :acme"],
    "overspent_token_account_gone": ["UPDATE tokens SET limit_micro = 1000 WHERE jti = :acme",
                                      "DELETE FROM accounts WHERE id = 'token:' || :acme"],
}


def without_foreign_keys(engine: Engine, statements: list[str], params: dict[str, str]) -> None:
    """Tamper as someone editing the database by hand would, foreign keys not enforced."""
    raw: Any = engine.raw_connection()
    try:
        cursor = raw.cursor()
        if engine.dialect.name == "sqlite":
            cursor.execute("PRAGMA foreign_keys = OFF")
            statements = [s.replace(":acme", "?") for s in statements]
            for statement in statements:
                cursor.execute(statement, [params["acme"]])
        else:
            cursor.execute("SET session_replication_role = replica")
            for statement in statements:
                cursor.execute(statement.replace(":acme", "%s"), [params["acme"]])
            cursor.execute("SET session_replication_role = DEFAULT")
        raw.commit()
    finally:
        raw.close()


@pytest.mark.parametrize("tampering", list(TAMPERING))
def test_the_invariants_find_what_the_plain_queries_find(ledger: Ledger, tampering: str) -> None:
    params = {**ledger.calls, "acme": jti_of(ledger, "acme")}
    if tampering.endswith("_gone") and "account" in tampering:
        without_foreign_keys(ledger.engine, TAMPERING[tampering], params)
        assert found(ledger) == defined(ledger) == {"spent_within_limit": [params["acme"]]}
        return
    with ledger.engine.begin() as conn:
        for statement in TAMPERING[tampering]:
            conn.execute(text(statement), {k: v for k, v in params.items()
                                           if f":{k}" in statement})
    expected = defined(ledger)
    assert found(ledger) == expected
    assert bool(expected) == (tampering != "clean")


"""The ledger's invariants, checked in SQL: what reconcile reports and every test asserts.

- every transfer balances, so all accounts' posted balances sum to zero and pending debits
  equal pending credits;
- no guarded account is below zero;
- each account's stored sums equal the sums of its transfers;
- no token spent more than its limit;
- every captured call with an amount has exactly one posted transfer and a receipt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, case, func, literal, select

from mcpbill_cli.ledger.models import accounts, calls, tokens, transfers

a = accounts.c
t = transfers.c
c = calls.c
tk = tokens.c


@dataclass(frozen=True)
class Violation:
    check: str
    detail: str
    rows: list[Any]


def check(conn: Connection) -> list[Violation]:
    """Every invariant violation in the ledger (an empty list: the ledger is sound)."""
    found: list[Violation] = []
    for probe in (_balances_sum_to_zero, _no_overdraft, _sums_match_transfers,
                  _spent_within_limit, _captured_calls_posted):
        found.extend(probe(conn))
    return found


def _balances_sum_to_zero(conn: Connection) -> list[Violation]:
    posted, pending = conn.execute(select(
        func.coalesce(func.sum(a.credits_posted - a.debits_posted), 0),
        func.coalesce(func.sum(a.credits_pending - a.debits_pending), 0))).one()
    if posted or pending:
        return [Violation("balances_sum_to_zero",
                          f"posted balances sum to {posted}, pending to {pending}", [])]
    return []


def _no_overdraft(conn: Connection) -> list[Violation]:
    rows = conn.execute(select(a.id).where(
        a.guarded.is_(True), a.credits_posted - a.debits_posted - a.debits_pending < 0)).all()
    return [Violation("no_overdraft", "guarded accounts below zero", [r.id for r in rows])
            ] if rows else []


def _sums_match_transfers(conn: Connection) -> list[Violation]:
    is_posted = t.kind.in_(("posted", "post_pending"))
    is_pending = and_(t.kind == "pending", t.status == "pending")

    def side(column: Any, condition: Any, name: str) -> Any:
        return (select(column.label("account"),
                       func.sum(case((condition, t.amount), else_=0)).label(name))
                .group_by(column).subquery())

    dp = side(t.debit_account_id, is_posted, "n")
    cp = side(t.credit_account_id, is_posted, "n")
    dq = side(t.debit_account_id, is_pending, "n")
    cq = side(t.credit_account_id, is_pending, "n")
    zero = literal(0)
    query = (select(a.id)
             .outerjoin(dp, dp.c.account == a.id).outerjoin(cp, cp.c.account == a.id)
             .outerjoin(dq, dq.c.account == a.id).outerjoin(cq, cq.c.account == a.id)
             .where((a.debits_posted != func.coalesce(dp.c.n, zero))
                    | (a.credits_posted != func.coalesce(cp.c.n, zero))
                    | (a.debits_pending != func.coalesce(dq.c.n, zero))
                    | (a.credits_pending != func.coalesce(cq.c.n, zero))))
    rows = [r.id for r in conn.execute(query)]
    return [Violation("sums_match_transfers", "stored sums differ from the transfers", rows)
            ] if rows else []


def _spent_within_limit(conn: Connection) -> list[Violation]:
    spent = (select(t.debit_account_id.label("account"), func.sum(t.amount).label("spent"))
             .where(t.code.in_(("charge", "capture"))).group_by(t.debit_account_id).subquery())
    rows = conn.execute(select(tk.jti).join(spent, spent.c.account == "token:" + tk.jti)
                        .where(spent.c.spent > tk.limit_micro)).all()
    return [Violation("spent_within_limit", "tokens spent beyond their limit",
                      [r.jti for r in rows])] if rows else []


def _captured_calls_posted(conn: Connection) -> list[Violation]:
    posted = (select(t.ref.label("call"), func.count().label("n"))
              .where(t.code.in_(("charge", "capture"))).group_by(t.ref).subquery())
    rows = conn.execute(
        select(c.id).outerjoin(posted, posted.c.call == c.id)
        .where(c.status == "captured",
               (func.coalesce(posted.c.n, 0) != 1) | c.receipt.is_(None))).all()
    return [Violation("captured_calls_posted", "captured calls without exactly one posted "
                      "transfer and a receipt", [r.id for r in rows])] if rows else []

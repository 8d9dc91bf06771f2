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

from sqlalchemy import Connection, and_, case, func, literal, select, union_all

from mcpbill_cli.ledger.models import accounts, calls, tokens, transfers

a = accounts.c
t = transfers.c
c = calls.c
tk = tokens.c
SPEND_CODES = ("charge", "capture")
TOKEN = "token:"  # noqa: S105 - the account id prefix of a token, not a secret


@dataclass(frozen=True)
class Violation:
    check: str
    detail: str
    rows: list[Any]


def check(conn: Connection) -> list[Violation]:
    """Every invariant violation in the ledger (an empty list: the ledger is sound)."""
    found: list[Violation] = []
    for probe in (_balances_sum_to_zero, _no_overdraft, _sums_and_spending,
                  _captured_calls_posted):
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


def _sums_and_spending(conn: Connection) -> list[Violation]:
    """Each account's stored sums against its transfers (one scan of the transfers per side,
    posted and pending summed together), and, from the same debit sums, each token's
    spending (charges and captures) against its limit."""
    is_posted = t.kind.in_(("posted", "post_pending"))
    is_pending = and_(t.kind == "pending", t.status == "pending")
    sums = (func.sum(case((is_posted, t.amount), else_=0)).label("posted"),
            func.sum(case((is_pending, t.amount), else_=0)).label("pending"))
    spending = func.sum(case((t.code.in_(SPEND_CODES), t.amount))).label("spent")
    debits = _by_account(t.debit_account_id, *sums, spending)
    credits = _by_account(t.credit_account_id, *sums)
    zero = literal(0)
    differs = ((a.debits_posted != func.coalesce(debits.c.posted, zero))
               | (a.credits_posted != func.coalesce(credits.c.posted, zero))
               | (a.debits_pending != func.coalesce(debits.c.pending, zero))
               | (a.credits_pending != func.coalesce(credits.c.pending, zero)))
    overspent = debits.c.spent > tk.limit_micro
    token_of = and_(func.substr(a.id, 1, len(TOKEN)) == TOKEN,
                    tk.jti == func.substr(a.id, len(TOKEN) + 1))
    query = (select(a.id, tk.jti, differs.label("differs"), overspent.label("overspent"))
             .outerjoin(debits, debits.c.account == a.id)
             .outerjoin(credits, credits.c.account == a.id)
             .outerjoin(tokens, token_of)
             .where(differs | overspent))
    mismatched, overspending = [], []
    for row in conn.execute(query):
        if row.differs:
            mismatched.append(row.id)
        if row.overspent:
            overspending.append(row.jti)
    overspending += _overspent_without_account(conn)
    found = []
    if mismatched:
        found.append(Violation("sums_match_transfers", "stored sums differ from the transfers",
                               mismatched))
    if overspending:
        found.append(Violation("spent_within_limit", "tokens spent beyond their limit",
                               overspending))
    return found


def _overspent_without_account(conn: Connection) -> list[str]:
    """Tokens spent beyond their limit from an account whose row is gone (a ledger edited
    by hand): the accounts do not lead to them. Found first, then summed by the index."""
    orphans = conn.execute(select(tk.jti, tk.limit_micro).where(
        ~select(a.id).where(a.id == TOKEN + tk.jti).exists())).all()
    overspent = []
    for jti, limit in orphans:
        spent = conn.execute(select(func.sum(t.amount)).where(
            t.debit_account_id == TOKEN + jti, t.code.in_(SPEND_CODES))).scalar_one()
        if spent is not None and spent > limit:
            overspent.append(jti)
    return overspent


def _by_account(account: Any, *sums: Any, where: Any = None) -> Any:
    """``sums`` of the transfers per ``account`` column, as a subquery with an ``account``
    column. Grouped by an expression, not the bare column: SQLite would walk the column's
    index to skip a sort, and read the table at random a row at a time (4x slower at a
    million transfers than a scan and a sort)."""
    key = account.concat("")
    query = select(key.label("account"), *sums).group_by(key)
    return (query if where is None else query.where(where)).subquery()


def _captured_calls_posted(conn: Connection) -> list[Violation]:
    query = (_incomplete_by_sorting() if conn.dialect.name == "sqlite"
             else _incomplete_by_hashing())
    rows = conn.execute(query).all()
    return [Violation("captured_calls_posted", "captured calls without exactly one posted "
                      "transfer and a receipt", [r.id for r in rows])] if rows else []


def _incomplete_by_hashing() -> Any:
    """PostgreSQL: the posted transfers counted per call (hashed), joined to the calls."""
    posted = (select(t.ref.label("call"), func.count().label("n"))
              .where(t.code.in_(SPEND_CODES)).group_by(t.ref).subquery())
    return (select(c.id).outerjoin(posted, posted.c.call == c.id)
            .where(c.status == "captured",
                   (func.coalesce(posted.c.n, 0) != 1) | c.receipt.is_(None)))


def _incomplete_by_sorting() -> Any:
    """SQLite, which groups by sorting: captured calls and posted transfers in one stream,
    sorted once by call id (grouping the transfers, then indexing the groups to join them
    to the calls, sorted twice: twice as slow)."""
    captured = select(c.id.label("id"), literal(1).label("captured"), literal(0).label("posted"),
                      case((c.receipt.is_(None), 1), else_=0).label("unsigned")
                      ).where(c.status == "captured")
    posted = select(t.ref, literal(0), literal(1), literal(0)).where(t.code.in_(SPEND_CODES))
    both = union_all(captured, posted).subquery()
    return (select(both.c.id).group_by(both.c.id)
            .having(func.sum(both.c.captured) > 0)
            .having((func.sum(both.c.posted) != 1) | (func.max(both.c.unsigned) == 1)))

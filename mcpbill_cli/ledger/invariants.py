"""The ledger's invariants, checked in SQL: what reconcile reports and every test asserts.

- every transfer balances, so all accounts' posted balances sum to zero and pending debits
  equal pending credits;
- no guarded account is below zero;
- each account's stored sums equal the sums of its transfers;
- no token spent more than its limit;
- every captured call with an amount has exactly one posted transfer and a receipt.

``check`` reads every transfer ever made. ``check_from`` starts from a snapshot instead (each
account's posted sums and spending as of a moment, summed from the transfers created before
it: its latest row of ``account_snapshots`` at or before that moment) and reads only the
transfers created from that moment on:

- posted sums: the snapshot's, plus the ``posted`` and ``post_pending`` transfers since (a
  transfer adds to them once, when it is created, and is never changed after);
- pending sums: the holds still open (``status = 'pending'``), as ``check`` reads them, through
  ``ix_transfers_pending_open``: their number follows the calls in flight, not the history. (A
  hold's status is what it is now, not what it was at the snapshot, so the snapshot keeps no
  pending sums: they could not be checked against it without joining every resolution to its
  hold.)
- spending: the snapshot's, plus the charges and captures since;
- captured calls: those created since, and those captured since (held before).

Both can also return, from the same scans, the sums as of a later moment of the accounts that
moved since the snapshot: the rows of the next snapshot (the others' sums are unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Connection,
    String,
    and_,
    case,
    cast,
    func,
    literal,
    or_,
    select,
    true,
    union_all,
)

from mcpbill_cli.ledger.models import account_snapshots, accounts, calls, tokens, transfers

a = accounts.c
t = transfers.c
c = calls.c
tk = tokens.c
snap = account_snapshots.c
SPEND_CODES = ("charge", "capture")
POSTED_KINDS = ("posted", "post_pending")
TOKEN = "token:"  # noqa: S105 - the account id prefix of a token, not a secret
IN_CHUNKS = 500
BATCH = 5000


@dataclass(frozen=True)
class Violation:
    check: str
    detail: str
    rows: list[Any]


@dataclass(frozen=True)
class AccountSums:
    """An account's posted sums and spending (charges and captures it paid) at a moment."""

    account: str
    debits_posted: int
    credits_posted: int
    spent: int


@dataclass(frozen=True)
class Checked:
    """The violations found and, when asked, the sums at ``sums_at`` of every account that
    moved between the snapshot and then (without a snapshot: of every account with a sum
    other than zero); every other account's are the snapshot's."""

    violations: list[Violation]
    sums: list[AccountSums] | None = None


def check(conn: Connection) -> list[Violation]:
    """Every invariant violation in the ledger (an empty list: the ledger is sound)."""
    return check_from(conn, None).violations


def check_from(conn: Connection, base: datetime | None, *,
               sums_at: datetime | None = None) -> Checked:
    """The invariants, each account starting from its snapshot at ``base`` (``None``: from
    nothing, reading every transfer); with ``sums_at`` (not before ``base``), also the sums
    then of the accounts that moved since ``base``, for the next snapshot."""
    found = _balances_sum_to_zero(conn) + _no_overdraft(conn)
    sums, at_moment = _sums_and_spending(conn, base, sums_at)
    found += sums
    found += (_captured_calls_posted(conn) if base is None
              else _captured_calls_posted_since(conn, base))
    return Checked(found, at_moment)


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


def _sums_and_spending(conn: Connection, base: datetime | None, at: datetime | None
                       ) -> tuple[list[Violation], list[AccountSums] | None]:
    """Each account's stored sums against its snapshot at ``base`` plus its transfers since
    (one scan of them per side) and its open holds, and, from the same debit sums, each
    token's spending against its limit; with ``at``, the sums then of those that moved."""
    mismatched, overspending, sums = [], [], []
    query = _sums_query(base, at, lateral=conn.dialect.name == "postgresql")
    for row in conn.execute(query.execution_options(yield_per=BATCH)):
        if row.differs:
            mismatched.append(row.id)
        if row.overspent:
            overspending.append(row.jti)
        if at is not None and row.moved:
            sums.append(AccountSums(row.id, int(row.debits_posted_at),
                                    int(row.credits_posted_at), int(row.spent_at)))
    overspending += _overspent_without_account(conn, base)
    found = []
    if mismatched:
        found.append(Violation("sums_match_transfers", "stored sums differ from the transfers",
                               mismatched))
    if overspending:
        found.append(Violation("spent_within_limit", "tokens spent beyond their limit",
                               overspending))
    return found, (sums if at is not None else None)


def _sums_query(base: datetime | None, at: datetime | None, *, lateral: bool) -> Any:
    """Per account: ``differs``, ``overspent`` (with the token's ``jti``) and, with ``at``,
    ``moved`` (since ``base``, before ``at``) and ``*_at``, its sums then. Only the accounts
    with a problem, or that moved."""
    posted = and_(t.kind.in_(POSTED_KINDS), *_since(base))
    open_hold = and_(t.status == "pending", t.kind == "pending")
    debits = _by_account(t.debit_account_id, *_posted_sums(at, spending=True), where=posted)
    credits = _by_account(t.credit_account_id, *_posted_sums(at), where=posted)
    held_debits = _by_account(t.debit_account_id, func.sum(t.amount).label("held"),
                              where=open_hold)
    held_credits = _by_account(t.credit_account_id, func.sum(t.amount).label("held"),
                               where=open_hold)
    start, on_start = _snapshot(base, lateral=lateral)

    def total(name: str, side: Any, column: str) -> Any:  # the snapshot's, plus what moved
        moved = func.coalesce(side.c[column], 0)
        return moved if start is None else func.coalesce(start.c[name], 0) + moved

    differs = ((a.debits_posted != total("debits_posted", debits, "posted"))
               | (a.credits_posted != total("credits_posted", credits, "posted"))
               | (a.debits_pending != func.coalesce(held_debits.c.held, 0))
               | (a.credits_pending != func.coalesce(held_credits.c.held, 0)))
    overspent = total("spent", debits, "spent") > tk.limit_micro
    moved = (func.coalesce(debits.c.posted_at, 0) + func.coalesce(credits.c.posted_at, 0) > 0
             if at is not None else None)
    then = [] if moved is None else [
        moved.label("moved"),
        total("debits_posted", debits, "posted_at").label("debits_posted_at"),
        total("credits_posted", credits, "posted_at").label("credits_posted_at"),
        total("spent", debits, "spent_at").label("spent_at")]
    token_of = and_(func.substr(a.id, 1, len(TOKEN)) == TOKEN,
                    tk.jti == func.substr(a.id, len(TOKEN) + 1))
    query = (select(a.id, tk.jti, differs.label("differs"), overspent.label("overspent"), *then)
             .outerjoin(debits, debits.c.account == a.id)
             .outerjoin(credits, credits.c.account == a.id)
             .outerjoin(held_debits, held_debits.c.account == a.id)
             .outerjoin(held_credits, held_credits.c.account == a.id)
             .outerjoin(tokens, token_of))
    if start is not None:
        query = query.outerjoin(start, on_start)
    return query.where(differs | overspent if moved is None else differs | overspent | moved)


def _since(base: datetime | None) -> list[Any]:
    return [] if base is None else [t.created_at >= base]


def _posted_sums(at: datetime | None, *, spending: bool = False) -> list[Any]:
    """What the posted transfers add per account: ``posted`` (and ``spent``: charges and
    captures), and with ``at`` the part created before it (``posted_at``, ``spent_at``)."""
    spend, before = t.code.in_(SPEND_CODES), t.created_at < at if at is not None else None
    sums = {"posted": t.amount, "spent": case((spend, t.amount)) if spending else None,
            "posted_at": case((before, t.amount)) if before is not None else None,
            "spent_at": case((and_(before, spend), t.amount))
            if spending and before is not None else None}
    # As bigint: PostgreSQL sums bigints as numeric, slower to add and compare per account.
    return [cast(func.sum(value), BigInteger).label(name) for name, value in sums.items()
            if value is not None]


def _snapshot(base: datetime | None, *, lateral: bool) -> tuple[Any, Any]:
    """Each account's latest snapshot row at or before ``base`` (none: ``None, None``), and
    how to join it to the account: one probe of ``ix_account_snapshots_account`` per account.
    Grouping every row up to ``base`` instead read all the days the snapshots kept (their rows
    grow with each day reconciled). PostgreSQL probes in a lateral subquery (it would hash the
    rows and filter them on the correlated ``max``); SQLite, which has no LATERAL, seeks the
    ``max`` in the index, then the row."""
    if base is None:
        return None, None
    if lateral:
        latest = (select(snap.debits_posted, snap.credits_posted, snap.spent)
                  .where(snap.account == a.id, snap.at <= base)
                  .order_by(snap.at.desc()).limit(1).lateral("start"))
        return latest, true()
    latest_at = (select(func.max(snap.at)).where(snap.account == a.id, snap.at <= base)
                 .scalar_subquery())
    start = account_snapshots.alias("start")
    return start, and_(start.c.account == a.id, start.c.at == latest_at)


def _overspent_without_account(conn: Connection, base: datetime | None) -> list[str]:
    """Tokens spent beyond their limit from an account whose row is gone (a ledger edited
    by hand): the accounts do not lead to them. Found first, then summed by the index."""
    orphans = conn.execute(select(tk.jti, tk.limit_micro).where(
        ~select(a.id).where(a.id == TOKEN + tk.jti).exists())).all()
    overspent = []
    for jti, limit in orphans:
        spent = conn.execute(select(func.sum(t.amount)).where(
            t.debit_account_id == TOKEN + jti, t.code.in_(SPEND_CODES), *_since(base))
        ).scalar_one()
        if base is not None:
            before = conn.execute(select(snap.spent).where(
                snap.account == TOKEN + jti, snap.at <= base).order_by(snap.at.desc()).limit(1)
            ).scalar()
            spent = None if spent is None and before is None else (spent or 0) + (before or 0)
        if spent is not None and spent > limit:
            overspent.append(jti)
    return overspent


def _by_account(account: Any, *sums: Any, where: Any = None) -> Any:
    """``sums`` of the transfers per ``account`` column, as a subquery with an ``account``
    column. Grouped by an expression, not the bare column: SQLite would walk the column's
    index to skip a sort, and read the table at random a row at a time (4x slower at a
    million transfers than a scan and a sort). Cast back to text: an expression has no type
    affinity, and SQLite would not index the groups to join them to the accounts, but scan
    every group for every account (0.3 s at 2,000 accounts, 23 s at 22,000)."""
    key = cast(account.concat(""), String)
    query = select(key.label("account"), *sums).group_by(key)
    return (query if where is None else query.where(where)).subquery()


def _captured_calls_posted(conn: Connection) -> list[Violation]:
    rows = conn.execute(_incomplete()).all()
    return [Violation("captured_calls_posted", "captured calls without exactly one posted "
                      "transfer and a receipt", [r.id for r in rows])] if rows else []


def _captured_calls_posted_since(conn: Connection, since: datetime) -> list[Violation]:
    """The captured calls created since ``since``, and those a charge or capture since names
    (a call held before and captured since), each with exactly one posted transfer and a
    receipt. One grouped stream of the calls and the transfers since; the calls held before
    are then read by primary key."""
    captured = select(c.id.label("id"), literal(1).label("captured"), literal(0).label("posted"),
                      case((c.receipt.is_(None), 1), else_=0).label("unsigned")
                      ).where(c.created_at >= since, c.status == "captured")
    posted = select(t.ref, literal(0), literal(1), literal(0)).where(
        t.created_at >= since, t.code.in_(SPEND_CODES))
    both = union_all(captured, posted).subquery()
    n_captured, n_posted = func.sum(both.c.captured), func.sum(both.c.posted)
    unsigned = func.max(both.c.unsigned)
    query = (select(both.c.id, n_captured.label("captured"), n_posted.label("posted"),
                    unsigned.label("unsigned"))
             .where(both.c.id.is_not(None)).group_by(both.c.id)
             .having(or_(n_captured == 0, n_posted != 1, unsigned == 1)))
    incomplete, earlier = [], {}
    for row in conn.execute(query):
        if row.captured:
            incomplete.append(row.id)
        else:
            earlier[row.id] = int(row.posted)
    incomplete += _incomplete_among(conn, earlier)
    return [Violation("captured_calls_posted", "captured calls without exactly one posted "
                      "transfer and a receipt", sorted(incomplete))] if incomplete else []


def _incomplete_among(conn: Connection, posted: dict[str, int]) -> list[str]:
    """Of the calls named (with how many posted transfers since), the captured ones with
    other than one, or without a receipt."""
    ids = sorted(posted)
    incomplete = []
    for start in range(0, len(ids), IN_CHUNKS):
        rows = conn.execute(select(c.id, c.receipt.is_(None).label("unsigned")).where(
            c.id.in_(ids[start:start + IN_CHUNKS]), c.status == "captured"))
        incomplete += [row.id for row in rows if row.unsigned or posted[row.id] != 1]
    return incomplete


def _incomplete() -> Any:
    """The captured calls and the posted transfers in one stream, grouped once by call id.
    SQLite groups it by sorting once (grouping the transfers, then indexing the groups to join
    them to the calls, sorted twice: twice as slow); PostgreSQL hashes it once (grouping the
    transfers, then hashing the groups to join the calls to them cost 2.53-3.62 s of server
    CPU at 1M calls against 2.11-2.64 s)."""
    captured = select(c.id.label("id"), literal(1).label("captured"), literal(0).label("posted"),
                      case((c.receipt.is_(None), 1), else_=0).label("unsigned")
                      ).where(c.status == "captured")
    posted = select(t.ref, literal(0), literal(1), literal(0)).where(t.code.in_(SPEND_CODES))
    both = union_all(captured, posted).subquery()
    return (select(both.c.id).group_by(both.c.id)
            .having(func.sum(both.c.captured) > 0)
            .having((func.sum(both.c.posted) != 1) | (func.max(both.c.unsigned) == 1)))

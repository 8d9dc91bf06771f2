"""Where the ledger-wide check of a reconcile starts, and the snapshot it leaves for the next.

A snapshot is a moment (``ledger_snapshots``: a reconciled window's end) and, for every account
that moved since the snapshot it was taken from, a row of its posted sums and spending then
(``account_snapshots``). An account's sums at a snapshot are its latest row at or before it
(none: zero): rows follow what moved each day, not the number of accounts, which grows with
every token ever issued.

The check (``ledger.invariants.check_from``) starts from the latest snapshot at or before the
window's start and reads the transfers from there on; with none, from the first transfer ever
made. A check that finds every account's stored sums right then takes a snapshot at the
window's end, so that the next window starts from it:

- only once the window's end is ``SETTLED`` in the past (a transfer dated before it by a
  transaction still open, or by a server whose clock runs behind, has committed by then);
- its rows are the sums the check computed in the read snapshot, from the same scans (the
  snapshot it started from plus the transfers up to the end), of the accounts that moved in
  between; written in a short transaction of its own after the read one;
- once: a snapshot already there is kept as it is (writers take turns; the same window
  reconciled twice leaves the same rows);
- snapshots older than ``RETENTION`` before it are forgotten (a window older than every
  snapshot kept starts from the first transfer again), and the rows no snapshot kept needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, Engine, and_, delete, func, insert, select, text

from mcpbill_cli.clock import aware, rfc3339, utcnow
from mcpbill_cli.ledger.engine import writing
from mcpbill_cli.ledger.invariants import AccountSums
from mcpbill_cli.ledger.models import account_snapshots, ledger_snapshots
from mcpbill_cli.reconcile.model import ReconcileOptions

s = account_snapshots.c
m = ledger_snapshots.c
SETTLED = timedelta(minutes=5)
RETENTION = timedelta(days=35)
INSERT_BATCH = 5000


@dataclass(frozen=True)
class SnapshotPlan:
    """``base``: the snapshot the check starts from (``None``: the first transfer). ``take``:
    the moment to compute the moved accounts' sums at, for a snapshot there (``None``: none
    is taken). ``kept``: a snapshot at the window's end is there already."""

    base: datetime | None
    take: datetime | None
    kept: datetime | None

    @property
    def label(self) -> str:
        """The check's name in the report, with where it started."""
        start = "full history" if self.base is None else f"from snapshot {rfc3339(self.base)}"
        return f"ledger_invariants ({start})"


def plan(conn: Connection, options: ReconcileOptions, now: datetime) -> SnapshotPlan:
    """Where the check starts, and whether it computes a snapshot at the window's end (one
    that has settled by ``now``)."""
    start, end = utc(options.window.start), utc(options.window.end)
    base = None if options.full_history else latest(conn, start)
    if taken(conn, end):
        return SnapshotPlan(base, None, end)
    settled = end + SETTLED <= now
    return SnapshotPlan(base, end if options.snapshots and settled else None, None)


def latest(conn: Connection, moment: datetime) -> datetime | None:
    """The latest snapshot at or before ``moment``, if any."""
    found = conn.execute(select(func.max(m.at)).where(m.at <= moment)).scalar()
    return None if found is None else utc(aware(found))


def taken(conn: Connection, moment: datetime) -> bool:
    return conn.execute(select(m.at).where(m.at == moment)).first() is not None


def write(engine: Engine, at: datetime, base: datetime | None,
          moved: Sequence[AccountSums]) -> None:
    """Take the snapshot at ``at`` (from ``base``, with the sums of the accounts that moved
    since) unless one is there; forget those past ``RETENTION``."""
    with writing(engine) as conn:
        if conn.dialect.name == "postgresql":  # one writer at a time (SQLite: BEGIN IMMEDIATE)
            conn.execute(text("LOCK TABLE ledger_snapshots IN SHARE ROW EXCLUSIVE MODE"))
        if taken(conn, at):
            return
        rows = [{"at": at, "account": row.account, "debits_posted": row.debits_posted,
                 "credits_posted": row.credits_posted, "spent": row.spent} for row in moved]
        for start in range(0, len(rows), INSERT_BATCH):
            conn.execute(insert(account_snapshots), rows[start:start + INSERT_BATCH])
        conn.execute(insert(ledger_snapshots).values(at=at, base=base, accounts=len(rows),
                                                     written_at=utcnow()))
        _forget_before(conn, at - RETENTION)


def _forget_before(conn: Connection, cutoff: datetime) -> None:
    """Forget the snapshots before ``cutoff``, and the rows no later snapshot needs (an
    account's rows before its latest at or before ``cutoff``)."""
    oldest = conn.execute(select(func.min(m.at))).scalar()
    if oldest is None or aware(oldest) >= cutoff:
        return  # nothing to forget (and PostgreSQL would scan the table to find so)
    conn.execute(delete(ledger_snapshots).where(m.at < cutoff))
    newer = account_snapshots.alias("newer")
    conn.execute(delete(account_snapshots).where(s.at < cutoff, select(newer.c.at).where(
        and_(newer.c.account == s.account, newer.c.at > s.at, newer.c.at <= cutoff)).exists()))


def utc(moment: datetime) -> datetime:
    """Snapshots are keyed in UTC (SQLite keeps the wall time of what it is given)."""
    return moment.astimezone(UTC)

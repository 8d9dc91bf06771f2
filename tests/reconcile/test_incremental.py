"""Reconcile is incremental: a day's ledger-wide check starts from the snapshot of the sums at
the day's start and reads the transfers from there on, never the whole history; a clean check
leaves the snapshot at the day's end for the next day."""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, case, event, func, select, text, update

from mcpbill_cli.clock import rfc3339
from mcpbill_cli.ledger.engine import make_engine, reading
from mcpbill_cli.ledger.models import (
    account_snapshots,
    accounts,
    calls,
    events,
    tokens,
    transfers,
)
from mcpbill_cli.reconcile import ReconcileOptions, ReconcileReport, Window, reconcile, snapshots

from .support import DAY, USDC, Ledger, rows_of, three_days
from .test_tampering import jti_of

t, s = transfers.c, account_snapshots.c
DAYS = [Window.day(DAY + timedelta(days=n)) for n in range(3)]
FIRST, SECOND, THIRD = DAYS


@pytest.fixture
def days(engine: Engine, tmp_path: Path) -> Ledger:
    return three_days(engine, tmp_path / "keys")


def ledger_check(report: ReconcileReport) -> str:
    [name] = [check for check in report.checks if check.startswith("ledger_invariants")]
    return name


def from_snapshot(moment: datetime) -> str:
    return f"ledger_invariants (from snapshot {rfc3339(moment)})"


def found(report: ReconcileReport) -> dict[str, list[str]]:
    return {name: keys for name, _, keys in rows_of(report)}


def snapshot(engine: Engine, moment: datetime) -> dict[str, tuple[int, int, int]] | None:
    """Every account's sums at the snapshot ``moment`` (its latest row then), or None: there
    is no snapshot at ``moment``."""
    with reading(engine) as conn:
        if not snapshots.taken(conn, moment):
            return None
        sums: dict[str, tuple[int, int, int]] = {}
        for row in conn.execute(select(s.account, s.debits_posted, s.credits_posted, s.spent)
                                .where(s.at <= moment).order_by(s.at)):
            sums[row.account] = (row.debits_posted, row.credits_posted, row.spent)
        return sums


def rows_at(engine: Engine, moment: datetime) -> set[str]:
    with reading(engine) as conn:
        return set(conn.execute(select(s.account).where(s.at == moment)).scalars())


def recomputed(conn: Connection, moment: datetime) -> dict[str, tuple[int, int, int]]:
    """Each account's posted sums and spending at ``moment``, the plain way: every transfer
    created before it, one query per side."""
    before = (t.kind.in_(("posted", "post_pending")), t.created_at < moment)
    spent = func.sum(case((t.code.in_(("charge", "capture")), t.amount), else_=0))
    sums: dict[str, list[int]] = {}
    for account, debited, paid in conn.execute(select(t.debit_account_id, func.sum(t.amount),
                                                      spent).where(*before)
                                               .group_by(t.debit_account_id)):
        sums.setdefault(account, [0, 0, 0])[0::2] = [int(debited), int(paid)]
    for account, credited in conn.execute(select(t.credit_account_id, func.sum(t.amount))
                                          .where(*before).group_by(t.credit_account_id)):
        sums.setdefault(account, [0, 0, 0])[1] = int(credited)
    return {account: (dp, cp, sp) for account, (dp, cp, sp) in sums.items()}


def reconcile_days(ledger: Ledger, *windows: Window) -> list[ReconcileReport]:
    return [ledger.reconcile(window=window) for window in windows]


def test_each_day_starts_from_the_snapshot_the_day_before_left(days: Ledger) -> None:
    reports = reconcile_days(days, *DAYS)

    assert [rows_of(report) for report in reports] == [[], [], []]
    assert [ledger_check(report) for report in reports] == [
        "ledger_invariants (full history)", from_snapshot(FIRST.end),
        from_snapshot(SECOND.end)]
    assert [report.snapshot_at for report in reports] == [w.end for w in DAYS]


def test_the_snapshot_written_is_the_sums_recomputed_from_every_transfer(days: Ledger) -> None:
    reconcile_days(days, *DAYS)
    with reading(days.engine) as conn:
        for window in DAYS:
            assert snapshot(days.engine, window.end) == recomputed(conn, window.end)
    late = f"token:{jti_of(days, 'late1')}"  # held before the first midnight, captured after
    assert snapshot(days.engine, FIRST.end)[late] == (0, 10 * USDC, 0)  # type: ignore[index]
    assert snapshot(days.engine, SECOND.end)[late] == (  # type: ignore[index]
        10_000, 10 * USDC, 10_000)


def test_a_snapshot_has_rows_for_the_accounts_that_moved_only(days: Ledger) -> None:
    reconcile_days(days, *DAYS)
    acme, day1 = f"token:{jti_of(days, 'acme')}", f"token:{jti_of(days, 'day1')}"
    assert acme in rows_at(days.engine, FIRST.end)
    assert acme not in rows_at(days.engine, SECOND.end) | rows_at(days.engine, THIRD.end)
    assert day1 in rows_at(days.engine, SECOND.end) and day1 not in rows_at(days.engine,
                                                                             THIRD.end)
    assert "tenant:acme" in rows_at(days.engine, THIRD.end)  # day2 allotted from it
    with reading(days.engine) as conn:
        assert len(rows_at(days.engine, THIRD.end)) < len(recomputed(conn, THIRD.end))


def test_a_day_after_a_snapshot_reads_no_transfer_before_it(days: Ledger) -> None:
    """Every transfer before the third day is altered (the amounts, and nothing that sums
    them): only a check reading them could tell. The third day, checked from the snapshot at
    its start, is clean; the same day checked over the full history is not. (The seals that
    hold the third day's events, and the seal before them, are checked whole, their money
    too: the transfers their events name are left as they are.)"""
    reconcile_days(days, FIRST, SECOND)
    with days.engine.begin() as conn:
        first_seal = conn.execute(select(func.min(events.c.seal)).where(
            events.c.at >= THIRD.start)).scalar_one() - 1
        sealed_from = conn.execute(select(func.min(events.c.at)).where(
            events.c.seal >= first_seal)).scalar_one()
        changed = conn.execute(update(transfers).where(
            t.created_at < THIRD.start, t.created_at < sealed_from)
                               .values(amount=t.amount + 1)).rowcount
    assert changed > 10

    incremental = days.reconcile(window=THIRD)
    full = days.reconcile(window=THIRD, full_history=True)

    assert ledger_check(incremental) == from_snapshot(THIRD.start)
    assert rows_of(incremental) == []
    assert ledger_check(full) == "ledger_invariants (full history)"
    assert "account_sums_mismatch" in found(full)


def test_no_statement_scans_a_table_of_the_day(days: Ledger) -> None:
    """Every read of the tables that grow with the days (the transfers, calls, events, refunds,
    deposits and the snapshots' rows) goes through an index (by time from the snapshot or the
    day on, by status for the open holds, by seal, account or id): no plan scans one of them,
    as a check reading the whole history does. (PostgreSQL is asked with sequential scans
    off: it scans tables this small anyway when it may.)"""
    reconcile_days(days, FIRST, SECOND)
    incremental = statements_of(days.engine, lambda: days.reconcile(window=THIRD))
    full = statements_of(days.engine, lambda: days.reconcile(window=THIRD, full_history=True))
    assert {table for sql, _ in incremental for table in DAY_TABLES
            if table_names(sql, table)} == set(DAY_TABLES)
    assert full_scans(days.engine, incremental) == []
    assert [scan for scan in full_scans(days.engine, full) if scan.startswith("transfers")]


DAY_TABLES = ("transfers", "calls", "events", "refunds", "deposits", "account_snapshots")


def statements_of(engine: Engine, work: Any) -> list[tuple[str, Any]]:
    """The SELECTs ``work`` runs that read a table of :data:`DAY_TABLES`, with their
    parameters."""
    seen: list[tuple[str, Any]] = []

    def before(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any,
               executemany: bool) -> None:
        if statement.lstrip().upper().startswith("SELECT") and any(
                table_names(statement, table) for table in DAY_TABLES):
            seen.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", before)
    try:
        work()
    finally:
        event.remove(engine, "before_cursor_execute", before)
    return seen


def table_names(sql: str, table: str) -> set[str]:
    """The names ``table`` goes by in ``sql`` (itself and its aliases)."""
    if not re.search(rf"\b{table}\b", sql):
        return set()
    return {table, *re.findall(rf"\b{table} AS (\w+)", sql)}


def full_scans(engine: Engine, statements: list[tuple[str, Any]]) -> list[str]:
    """The plan steps that read a whole table of :data:`DAY_TABLES` (or a whole index of
    it), each as ``table: step: statement``."""
    raw: Any = engine.raw_connection()
    try:
        cursor = raw.cursor()
        if engine.dialect.name == "sqlite":
            return [f"{table}: {detail}: {sql[:60]}" for sql, params in statements
                    for *_, detail in cursor.execute(f"EXPLAIN QUERY PLAN {sql}", params)
                    if (m := re.match(r"SCAN (\w+)", detail))
                    for table in DAY_TABLES if m[1] in table_names(sql, table)]
        cursor.execute("SET enable_seqscan = off")
        scans = []
        for sql, params in statements:
            cursor.execute(f"EXPLAIN (FORMAT JSON) {sql}", params)
            scans += [f"{node['Relation Name']}: {node['Node Type']}: {sql[:60]}"
                      for node in plan_nodes(cursor.fetchone()[0][0]["Plan"])
                      if node.get("Relation Name") in DAY_TABLES
                      and (node["Node Type"] == "Seq Scan" or "Index Cond" not in node
                           and node["Node Type"] in ("Index Scan", "Index Only Scan"))]
        return scans
    finally:
        raw.rollback()
        raw.close()


def plan_nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [node, *(n for child in node.get("Plans", ()) for n in plan_nodes(child))]


@pytest.mark.parametrize("tampering", ["a charge of the day", "a charge after the day",
                                       "an account's stored sum", "the snapshot"])
def test_tampering_from_the_snapshot_on_is_found(days: Ledger, tampering: str) -> None:
    reconcile_days(days, FIRST)
    charge = {"a charge of the day": days.calls["day1-charge1"],
              "a charge after the day": days.calls["day2-charge0"]}.get(tampering)
    with days.engine.begin() as conn:
        if charge is not None:
            conn.execute(update(transfers).where(t.id == f"charge:{charge}")
                         .values(amount=t.amount + 1))
        elif tampering == "the snapshot":
            conn.execute(update(account_snapshots).where(s.account == "tenant:acme")
                         .values(credits_posted=s.credits_posted + 1))
        else:
            conn.execute(update(accounts).where(accounts.c.id == "tenant:globex")
                         .values(credits_posted=accounts.c.credits_posted + 1))

    report = days.reconcile(window=SECOND)

    assert ledger_check(report) == from_snapshot(SECOND.start)
    assert "account_sums_mismatch" in found(report)
    assert report.snapshot_at is None
    assert snapshot(days.engine, SECOND.end) is None


def test_a_token_past_its_limit_is_found_from_the_snapshot(days: Ledger) -> None:
    """The acme token spent only on the first day: its spending comes from the snapshot."""
    reconcile_days(days, FIRST, SECOND)
    jti = jti_of(days, "acme")
    with days.engine.begin() as conn:
        conn.execute(update(tokens).where(tokens.c.jti == jti).values(limit_micro=1000))
    report = days.reconcile(window=THIRD)
    assert ledger_check(report) == from_snapshot(THIRD.start)
    assert found(report) == {"token_overspent": [f"tokens/{jti}"]}


@pytest.mark.parametrize("call", ["day2-charge1", "late2"])
def test_a_receipt_deleted_from_a_call_created_or_captured_in_the_day(days: Ledger,
                                                                      call: str) -> None:
    """late2 was held before the third day and captured in it."""
    reconcile_days(days, FIRST, SECOND)
    with days.engine.begin() as conn:
        conn.execute(update(calls).where(calls.c.id == days.calls[call]).values(receipt=None))
    report = days.reconcile(window=THIRD)
    assert ledger_check(report) == from_snapshot(THIRD.start)
    assert found(report) == {"captured_call_incomplete": [f"calls/{days.calls[call]}"]}
    assert report.snapshot_at == THIRD.end  # the sums are right: the snapshot is written


def test_without_a_snapshot_the_full_check_runs_and_leaves_one(days: Ledger) -> None:
    second, third = reconcile_days(days, SECOND, THIRD)
    assert ledger_check(second) == "ledger_invariants (full history)"
    assert ledger_check(third) == from_snapshot(SECOND.end)
    with reading(days.engine) as conn:
        assert snapshot(days.engine, SECOND.end) == recomputed(conn, SECOND.end)


def test_the_latest_snapshot_before_the_day_and_the_transfers_since_are_used(
        days: Ledger) -> None:
    reconcile_days(days, FIRST)
    with days.engine.begin() as conn:  # the second day was never reconciled: found now
        conn.execute(update(transfers).where(t.id == f"charge:{days.calls['day1-charge0']}")
                     .values(amount=t.amount + 1))
    assert "account_sums_mismatch" in found(days.reconcile(window=THIRD))
    with days.engine.begin() as conn:
        conn.execute(update(transfers).where(t.id == f"charge:{days.calls['day1-charge0']}")
                     .values(amount=t.amount - 1))

    third = days.reconcile(window=THIRD)

    assert ledger_check(third) == from_snapshot(FIRST.end)
    assert rows_of(third) == [] and third.snapshot_at == THIRD.end
    with reading(days.engine) as conn:
        assert snapshot(days.engine, THIRD.end) == recomputed(conn, THIRD.end)
    assert snapshot(days.engine, SECOND.end) is None


def test_the_same_snapshot_written_twice_is_the_same_rows(days: Ledger) -> None:
    first = days.reconcile(window=FIRST)
    written = snapshot(days.engine, FIRST.end)
    again = days.reconcile(window=FIRST)
    assert first.snapshot_at == again.snapshot_at == FIRST.end
    assert snapshot(days.engine, FIRST.end) == written and written


@pytest.mark.parametrize(("options", "why"), [
    ({"now": FIRST.end + timedelta(minutes=4)}, "the day ended too recently"),
    ({"snapshots": False}, "asked not to"),
    ({"ledger_wide": False}, "nothing was checked"),
])
def test_no_snapshot_is_written_when(days: Ledger, options: dict[str, Any], why: str) -> None:
    report = days.reconcile(window=FIRST, **options)
    assert rows_of(report) == [], why
    assert report.snapshot_at is None
    assert snapshot(days.engine, FIRST.end) is None


def test_a_window_in_another_timezone_is_snapshotted_in_utc(days: Ledger) -> None:
    from datetime import timezone

    paris = timezone(timedelta(hours=1))
    window = Window(FIRST.start.astimezone(paris), FIRST.end.astimezone(paris))
    report = days.reconcile(window=window)
    assert report.snapshot_at == FIRST.end
    assert ledger_check(days.reconcile(window=SECOND)) == from_snapshot(FIRST.end)


def test_snapshots_older_than_the_retention_are_dropped(days: Ledger) -> None:
    from mcpbill_cli.reconcile.snapshots import RETENTION

    reconcile_days(days, FIRST)
    later = Window.day((FIRST.end + RETENTION).date())
    days.clock.now = later.end + timedelta(hours=1)
    report = days.reconcile(window=later)
    assert ledger_check(report) == from_snapshot(FIRST.end)
    assert snapshot(days.engine, FIRST.end) is None
    with reading(days.engine) as conn:
        assert snapshot(days.engine, later.end) == recomputed(conn, later.end)


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)  # roles are PostgreSQL's
def test_a_read_only_role_gets_its_report_without_a_snapshot(days: Ledger) -> None:
    """A role that may only read (a replica's, an auditor's) forgot --no-snapshot: the
    report stands, no snapshot is written, and the run says so in its log."""
    schema = days.engine.url.query["options"].removeprefix("-csearch_path=")
    role = f"ro_{uuid.uuid4().hex[:10]}"
    with days.engine.begin() as conn:
        conn.execute(text(f'CREATE ROLE "{role}" LOGIN'))
        conn.execute(text(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"'))
        conn.execute(text(f'GRANT SELECT ON ALL TABLES IN SCHEMA "{schema}" TO "{role}"'))
    reader = make_engine(days.engine.url.set(username=role).render_as_string(
        hide_password=False))
    try:
        report = reconcile(reader, ReconcileOptions(window=THIRD, keys_dir=days.keys_dir,
                                                    now=days.clock(), jobs=1))
    finally:
        reader.dispose()
        with days.engine.begin() as conn:
            conn.execute(text(f'DROP OWNED BY "{role}"'))
            conn.execute(text(f'DROP ROLE "{role}"'))
    assert rows_of(report) == [] and report.summary.calls > 0
    assert report.snapshot_at is None
    with reading(days.engine) as conn:
        assert conn.execute(text("SELECT count(*) FROM ledger_snapshots")).scalar_one() == 0

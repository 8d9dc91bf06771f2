"""The runner: every check of ``checks.CHECKS`` over one window, in one read snapshot, then the
report; and, after it, the snapshot of the ledger's sums for the next reconcile. Never prints,
never exits.

How the checks run is decided here, not in them. Those that may start ``BESIDE`` the others
run on connections of their own that share the main one's snapshot, started before anything
reads on it (``alongside``: the database works them in parallel), each set up for its
``planning`` (``tuning``); those that start ``FIRST`` hand their work to workers before any
check runs; the rest run in turn on the main connection, planned as they ask. Findings and
totals are recorded on this thread only, in the list's order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from functools import partial
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

from mcpbill_cli.clock import rfc3339
from mcpbill_cli.errors import InvalidInput
from mcpbill_cli.ledger import outbox
from mcpbill_cli.ledger.clock import ledger_clock
from mcpbill_cli.ledger.engine import reading, writing
from mcpbill_cli.reconcile import snapshots, tuning
from mcpbill_cli.reconcile.alongside import start_beside
from mcpbill_cli.reconcile.checks import CHECKS, Check, Context, LedgerCheck, Start
from mcpbill_cli.reconcile.collect import Findings
from mcpbill_cli.reconcile.model import ReconcileOptions, ReconcileReport

log = logging.getLogger(__name__)


def reconcile(engine: Engine, options: ReconcileOptions) -> ReconcileReport:
    """Reconcile the ledger over ``options.window``; see :mod:`mcpbill_cli.reconcile`."""
    if options.verify_receipts and options.keys_dir is None:
        raise InvalidInput("verifying receipts needs the key ring: pass keys_dir")
    now = options.now or ledger_clock(engine)()
    ctx = Context(engine, options, Findings(options.max_rows), now)
    with reading(engine) as conn:
        tuning.begin(conn, options.jobs)
        checks, skipped = run_checks(conn, ctx, CHECKS)
    summary, totals = ctx.totals.frozen()
    report = ReconcileReport(window=options.window, filters=options.filters, summary=summary,
                             totals=totals, findings=ctx.found.findings(), checks=checks,
                             skipped=skipped, audit_anchor=ctx.anchor,
                             snapshot_at=leave_snapshot(engine, ctx.ledger))
    if report.findings and options.snapshots:  # --no-snapshot writes nothing, alerts neither
        try:
            alert_findings(engine, report, now)
        except DBAPIError as error:  # the report is what the run is for: it is not lost
            log.warning("reconcile: the findings' webhook event was not written: %s", error)
    return report


def alert_findings(engine: Engine, report: ReconcileReport, at: datetime) -> None:
    """A ``reconcile.findings`` webhook event naming each finding (its name, severity and
    count); the rows stay in the report, for whoever runs it."""
    with writing(engine) as conn:
        outbox.emit(conn, "reconcile.findings", {
            "window_start_at": rfc3339(report.window.start),
            "window_end_at": rfc3339(report.window.end),
            "errors": report.errors, "warnings": report.warnings,
            "findings": [{"name": f.name, "severity": f.severity, "count": f.count,
                          "message": f.message} for f in report.findings]}, at=at)


def run_checks(conn: Connection, ctx: Context, checks: tuple[Check, ...]
               ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Run ``checks``; the names of those that ran (their labels) and why the others did not."""
    why = {check.name: check.skip(ctx) for check in checks}
    beside = [check for check in checks
              if why[check.name] is None and check.start is Start.BESIDE]
    started = dict(zip([check.name for check in beside], start_beside(
        ctx.engine, conn, [(partial(check.find, ctx), tuning.prepare(check.planning))
                           for check in beside]), strict=True))
    started |= {check.name: _start_first(conn, ctx, check) for check in checks
                if why[check.name] is None and check.start is Start.FIRST}
    ran, skipped = [], []
    for check in checks:
        reason = why[check.name]
        if reason is not None:
            skipped += [reason] if reason else []
            continue
        if check.name in started:
            found = started[check.name]()
        else:
            with tuning.planned(conn, check.planning):
                found = check.find(ctx, conn)
        check.note(ctx, conn, found)
        ran.append(check.label(ctx) if check.label is not None else check.name)
    return tuple(ran), tuple(skipped)


def _start_first(conn: Connection, ctx: Context, check: Check) -> Callable[[], Any]:
    """Start ``check`` now; call the result at its place for what its ``find`` returned."""
    with tuning.planned(conn, check.planning):
        started = check.find(ctx, conn)
    return lambda: started


def leave_snapshot(engine: Engine, ledger: LedgerCheck | None) -> datetime | None:
    """After a ledger check that found every account's sums right, the snapshot at the
    window's end (in a write transaction of its own, after the read one): its moment, when
    the ledger's sums are kept as of the window's end."""
    if ledger is None or any(v.check == "sums_match_transfers"
                             for v in ledger.checked.violations):
        return None
    plan, moved = ledger.plan, ledger.checked.sums
    if plan.take is not None and moved is not None:
        try:
            snapshots.write(engine, plan.take, plan.base, moved)
        except DBAPIError as error:  # a read-only role: the report stands, unsnapshotted
            log.warning("reconcile: no snapshot was written (%s); the next reconcile reads "
                        "from the last one. A read-only role runs with --no-snapshot",
                        type(error.orig).__name__)
            return plan.kept
        return plan.take
    return plan.kept

"""The reconcile itself: run every check over one window, in one read snapshot, and return the
report. Never prints, never exits."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

from sqlalchemy import Connection, Engine, text

from mcpbill_cli.clock import utcnow
from mcpbill_cli.errors import InvalidInput
from mcpbill_cli.ledger import invariants
from mcpbill_cli.ledger.engine import reading
from mcpbill_cli.reconcile import deposit_check, ledger_checks, receipt_check, seal_check
from mcpbill_cli.reconcile.alongside import alongside
from mcpbill_cli.reconcile.call_checks import PriceCheck, check_token_validity
from mcpbill_cli.reconcile.calls_pass import TokenTally, call_groups
from mcpbill_cli.reconcile.collect import Findings
from mcpbill_cli.reconcile.event_transfers import check_event_transfers
from mcpbill_cli.reconcile.model import ReconcileOptions, ReconcileReport, Window
from mcpbill_cli.reconcile.totals import TotalsBuilder
from mcpbill_cli.reconcile.transfers_pass import (
    TransferGroup,
    TransferTally,
    tenant_name,
    token_jti,
    transfer_groups,
)

PG_WORK_MEM = "64MB"  # per hash or sort of the reconcile's queries, on the server
SQLITE_SORT_THREADS = 4


@dataclass
class _Run:
    options: ReconcileOptions
    found: Findings
    totals: TotalsBuilder = field(default_factory=TotalsBuilder)
    by_calls: dict[str, TokenTally] = field(default_factory=dict)
    by_transfers: dict[str, TransferTally] = field(default_factory=dict)
    chain_accounts: set[str] = field(default_factory=set)
    checks: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    anchor: tuple[int, str] | None = None


def reconcile(engine: Engine, options: ReconcileOptions) -> ReconcileReport:
    """Reconcile the ledger over ``options.window``; see :mod:`mcpbill_cli.reconcile`."""
    if options.verify_receipts and options.keys_dir is None:
        raise InvalidInput("verifying receipts needs the key ring: pass keys_dir")
    run = _Run(options, Findings(options.max_rows))
    with reading(engine) as conn:
        _snapshot(conn, options.jobs)
        # The big queries do not depend on each other: on PostgreSQL they run side by side.
        sealed = _start_seals(engine, conn, run)
        violations = (alongside(engine, conn, invariants.check, _serial_settings)
                      if options.ledger_wide else None)
        moved = alongside(engine, conn, partial(_transfer_groups, options.window),
                          _hashing_settings)
        with _hashed_groups(conn):
            _read_calls(conn, run)
            _read_transfers(moved(), run)
        _ledger_checks(conn, run, violations)
        sealed()
        _receipts(engine, conn, run)
        _onchain(engine, conn, run)
    summary, totals = run.totals.frozen()
    return ReconcileReport(window=options.window, filters=options.filters, summary=summary,
                           totals=totals, findings=run.found.findings(),
                           checks=tuple(run.checks), skipped=tuple(run.skipped),
                           audit_anchor=run.anchor)


def _snapshot(conn: Connection, jobs: int) -> None:
    """Every query of this reconcile sees the same committed state (SQLite's read transaction
    already does: WAL snapshots). SQLite sorts its GROUP BYs with up to ``jobs`` threads (its
    sorter's memory stays bounded: it spills)."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql(f"PRAGMA threads = {max(1, min(jobs, SQLITE_SORT_THREADS))}")
    if conn.dialect.name == "postgresql":
        conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"))
        _settings(conn)


def _settings(conn: Connection) -> None:
    """PostgreSQL: plan the streamed aggregates for the whole result (not the first rows),
    with room to hash their groups in memory."""
    conn.execute(text("SET LOCAL cursor_tuple_fraction = 1"))
    conn.execute(text(f"SET LOCAL work_mem = '{PG_WORK_MEM}'"))
    conn.execute(text("SET LOCAL jit = off"))  # compiling the scans costs more than it saves


def _serial_settings(conn: Connection) -> None:
    """The ledger-wide invariants, in one server process: its parallel workers would ship
    every call row (receipts and all) to one process to hash-join them, no faster at 1M
    calls (2.4-3.2 s either way) for twice the CPU, which the queries beside need."""
    _settings(conn)
    conn.execute(text("SET LOCAL max_parallel_workers_per_gather = 0"))


def _hashing_settings(conn: Connection) -> None:
    _settings(conn)
    conn.execute(text("SET LOCAL enable_sort = off"))  # see _hashed_groups


def _transfer_groups(window: Window, conn: Connection) -> list[TransferGroup]:
    return list(transfer_groups(conn, window))


@contextmanager
def _hashed_groups(conn: Connection) -> Iterator[None]:
    """PostgreSQL cannot tell how few groups the window scans make (it guesses one per call)
    and would sort a million rows to group them; make it hash them (a hash that outgrows
    work_mem spills to disk, so memory stays bounded)."""
    postgres = conn.dialect.name == "postgresql"
    if postgres:
        conn.execute(text("SET LOCAL enable_sort = off"))
    yield
    if postgres:
        conn.execute(text("SET LOCAL enable_sort = on"))


def _read_calls(conn: Connection, run: _Run) -> None:
    window, filters = run.options.window, run.options.filters
    prices = PriceCheck(conn, window, run.found)
    for group in call_groups(conn, window, prices.terms()):
        run.by_calls.setdefault(group.jti, TokenTally(group.tenant, group.agent)).add(group)
        if filters.admits(group.tenant, group.agent, group.tool):
            run.totals.add_calls(group)
            prices.check(group)
    prices.list_rows()
    run.totals.add_refusals(conn, window, filters)
    run.checks += ["prices"]


def _read_transfers(groups: Iterable[TransferGroup], run: _Run) -> None:
    for group in groups:
        if group.code == "deposit":
            run.chain_accounts.add(group.debit)
            tenant = tenant_name(group.credit)
            if tenant is not None and run.options.filters.admits(tenant, None):
                run.totals.add_deposit(tenant, group.count, group.amount)
        jti = token_jti(group.debit)
        if jti is not None:
            run.by_transfers.setdefault(jti, TransferTally()).add(group)


def _ledger_checks(conn: Connection, run: _Run,
                   violations: Callable[[], list[invariants.Violation]] | None) -> None:
    options, found = run.options, run.found
    ledger_checks.check_control_totals(conn, options.window, run.by_calls, run.by_transfers,
                                       found)
    check_token_validity(conn, options.window, run.by_calls, options.leeway, options.filters,
                         found)
    check_event_transfers(conn, options.window, found)
    run.checks += ["control_totals", "token_validity", "event_transfers"]
    if violations is not None:
        ledger_checks.check_invariants(violations(), found)
        run.checks.append("ledger_invariants")
    else:
        run.skipped.append("ledger_invariants (--window-only)")
    ledger_checks.check_stale_holds(conn, options.now or utcnow(), found)
    ledger_checks.check_refused_captures(conn, options.window, found)
    deposit_check.check_deposits(conn, options.window, run.chain_accounts, options.filters,
                                 found)
    run.checks += ["stale_holds", "refused_captures", "deposits"]


def _start_seals(engine: Engine, conn: Connection, run: _Run) -> Callable[[], None]:
    """Start the sealed trail's check (its batches hash while the SQL checks run); call the
    result to finish it."""
    options = run.options
    if options.chain == "off":
        run.skipped.append("audit_chain (--chain off)")
        return lambda: None
    keys = seal_check.seal_keys(options.keys_dir)
    scope = seal_check.seal_scope(conn, options.chain, options.window)
    collect = seal_check.start_seal_check(engine, conn, scope, keys, options.jobs, run.found,
                                          _settings)

    def finish() -> None:
        run.anchor = collect()
        seal_check.check_unsealed(conn, options.now or utcnow(), run.found)
        run.checks.append(f"audit_chain ({options.chain})")
        if keys is not None:
            run.checks.append("seal_signatures")
        else:
            run.skipped.append("seal_signatures (keys_dir)" if options.keys_dir is None
                               else f"seal_signatures (no key ring in {options.keys_dir})")

    return finish


def _receipts(engine: Engine, conn: Connection, run: _Run) -> None:
    options = run.options
    if not options.verify_receipts or options.keys_dir is None:
        run.skipped.append("receipt_signatures (--verify-receipts)")
        return
    receipt_check.check_receipts(engine, conn, options.window, options.filters,
                                 options.keys_dir, options.jobs, run.found)
    run.checks.append("receipt_signatures")


def _onchain(engine: Engine, conn: Connection, run: _Run) -> None:
    options = run.options
    if options.onchain is None:
        run.skipped.append("onchain (--onchain)")
        return
    deposit_check.check_onchain(engine, conn, options.window, options.filters,
                                options.onchain, run.found)
    run.checks.append("onchain")

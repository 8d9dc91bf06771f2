"""What a reconcile checks: :data:`CHECKS`, one declarative list in report order.

Each :class:`Check` has a name, what it reads, a ``find`` that reads (and, for most, records
its findings) and a ``note`` that records what ``find`` returned. It says when it may start
(:class:`Start`) and how its queries are best planned (``tuning.Planning``); when it is
skipped and why; and its name in the report when that says more than ``name``. How they run
(a connection of their own beside the main one, workers, PostgreSQL's settings) is the
runner's business (``run``), as is the one read transaction they share.

The passes over the window's calls (``prices``) and transfers (``control_totals``) leave their
groups in the :class:`Context` for the checks after them.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine

from mcpbill_cli.ledger import invariants
from mcpbill_cli.reconcile import deposit_check, ledger_checks, receipt_check, seal_check, snapshots
from mcpbill_cli.reconcile.call_checks import PriceCheck, check_token_validity
from mcpbill_cli.reconcile.calls_pass import TokenTally, call_groups
from mcpbill_cli.reconcile.collect import Findings
from mcpbill_cli.reconcile.event_transfers import (
    Mismatches,
    event_transfer_mismatches,
    note_mismatches,
)
from mcpbill_cli.reconcile.model import ReconcileOptions
from mcpbill_cli.reconcile.refund_check import check_refunds
from mcpbill_cli.reconcile.totals import TotalsBuilder
from mcpbill_cli.reconcile.transfers_pass import (
    TransferGroup,
    TransferTally,
    tenant_name,
    token_jti,
    transfer_groups,
)
from mcpbill_cli.reconcile.tuning import Planning, prepare


class Start(enum.Enum):
    """When a check runs. ``IN_TURN``: on the main connection, at its place in the list.
    ``BESIDE``: started before any check, on a connection of its own in the same snapshot
    (SQLite: at its place when no write lock can be had), its result taken at its place.
    ``FIRST``: started on the main connection before any check (it hands its work to
    workers), finished at its place."""

    IN_TURN = "in turn"
    BESIDE = "beside"
    FIRST = "first"


@dataclass(frozen=True)
class LedgerCheck:
    """Where the ledger-wide check started, and what it found."""

    plan: snapshots.SnapshotPlan
    checked: invariants.Checked


@dataclass
class Context:
    """One reconcile: what it was asked, what it found, and what the passes leave for the
    checks after them."""

    engine: Engine
    options: ReconcileOptions
    found: Findings
    now: datetime  # when holds count as stale and events as left unsealed
    totals: TotalsBuilder = field(default_factory=TotalsBuilder)
    by_calls: dict[str, TokenTally] = field(default_factory=dict)
    by_transfers: dict[str, TransferTally] = field(default_factory=dict)
    chain_accounts: set[str] = field(default_factory=set)
    anchor: tuple[int, str] | None = None
    ledger: LedgerCheck | None = None
    _keys: list[seal_check.Keys | None] = field(default_factory=list)

    def seal_keys(self) -> seal_check.Keys | None:
        """The key ring's keys, by kid (loaded once); None without a key ring."""
        if not self._keys:
            self._keys.append(seal_check.seal_keys(self.options.keys_dir))
        return self._keys[0]


Find = Callable[[Context, Connection], Any]
Note = Callable[[Context, Connection, Any], None]


def _nothing(_ctx: Context, _conn: Connection, _found: Any = None) -> None:
    return None


def _always(_ctx: Context) -> str | None:
    return None


@dataclass(frozen=True)
class Check:
    """One check. ``skip`` gives why it does not run (``""``: not worth saying), or None."""

    name: str
    reads: str
    find: Find
    note: Note = _nothing
    start: Start = Start.IN_TURN
    planning: Planning = Planning.STREAMED
    skip: Callable[[Context], str | None] = _always
    label: Callable[[Context], str] | None = None


# --- the passes over the window -----------------------------------------------------------


def _prices(ctx: Context, conn: Connection) -> None:
    window, filters = ctx.options.window, ctx.options.filters
    prices = PriceCheck(conn, window, ctx.found)
    for group in call_groups(conn, window, prices.terms()):
        ctx.by_calls.setdefault(group.jti, TokenTally(group.tenant, group.agent)).add(group)
        if filters.admits(group.tenant, group.agent, group.tool):
            ctx.totals.add_calls(group)
            prices.check(group)
    prices.list_rows()
    ctx.totals.add_refusals(conn, window, filters)


def _transfer_groups(ctx: Context, conn: Connection) -> list[TransferGroup]:
    return list(transfer_groups(conn, ctx.options.window))


def _control_totals(ctx: Context, conn: Connection, groups: list[TransferGroup]) -> None:
    for group in groups:
        if group.code == "deposit":
            ctx.chain_accounts.add(group.debit)
            tenant = tenant_name(group.credit)
            if tenant is not None and ctx.options.filters.admits(tenant, None):
                ctx.totals.add_deposit(tenant, group.count, group.amount)
        jti = token_jti(group.debit)
        if jti is not None:
            ctx.by_transfers.setdefault(jti, TransferTally()).add(group)
    ledger_checks.check_control_totals(conn, ctx.options.window, ctx.by_calls,
                                       ctx.by_transfers, ctx.found)


# --- the window's other checks ------------------------------------------------------------


def _token_validity(ctx: Context, conn: Connection) -> None:
    options = ctx.options
    check_token_validity(conn, options.window, ctx.by_calls, options.leeway, options.filters,
                         ctx.found)


def _event_transfers(ctx: Context, conn: Connection) -> Mismatches:
    return event_transfer_mismatches(conn, ctx.options.window, ctx.found.max_rows)


def _event_transfers_noted(ctx: Context, _conn: Connection, mismatches: Mismatches) -> None:
    note_mismatches(mismatches, ctx.found)


def _refunds(ctx: Context, conn: Connection) -> None:
    ctx.totals.add_refunds(conn, ctx.options.window, ctx.options.filters)
    refunded = [jti for jti, tally in ctx.by_calls.items() if tally.refunded]
    check_refunds(conn, ctx.options.window, refunded, ctx.found)


def _stale_holds(ctx: Context, conn: Connection) -> None:
    ledger_checks.check_stale_holds(conn, ctx.now, ctx.found)
    ledger_checks.check_stale_x402(conn, ctx.now, ctx.found)


def _refused_captures(ctx: Context, conn: Connection) -> None:
    ledger_checks.check_refused_captures(conn, ctx.options.window, ctx.found)


def _deposits(ctx: Context, conn: Connection) -> None:
    deposit_check.check_deposits(conn, ctx.options.window, ctx.chain_accounts,
                                 ctx.options.filters, ctx.found)


def _receipts(ctx: Context, conn: Connection) -> None:
    options = ctx.options
    if options.keys_dir is not None:  # reconcile refuses to verify receipts without one
        receipt_check.check_receipts(ctx.engine, conn, options.window, options.filters,
                                     options.keys_dir, options.jobs, ctx.found)


def _onchain(ctx: Context, conn: Connection) -> None:
    options = ctx.options
    if options.onchain is not None:  # skipped without
        deposit_check.check_onchain(ctx.engine, conn, options.window, options.filters,
                                    options.onchain, ctx.found)


# --- the whole ledger ---------------------------------------------------------------------


def _ledger_wide(ctx: Context, conn: Connection) -> LedgerCheck:
    plan = snapshots.plan(conn, ctx.options, ctx.now)
    return LedgerCheck(plan, invariants.check_from(conn, plan.base, sums_at=plan.take))


def _ledger_noted(ctx: Context, _conn: Connection, ledger: LedgerCheck) -> None:
    ledger_checks.check_invariants(ledger.checked.violations, ctx.found)
    ctx.ledger = ledger


def _ledger_label(ctx: Context) -> str:
    return ctx.ledger.plan.label if ctx.ledger is not None else "ledger_invariants"


# --- the sealed audit trail ---------------------------------------------------------------


def _start_seals(ctx: Context, conn: Connection) -> Callable[[], tuple[int, str] | None]:
    """Start hashing the batches (they hash while the SQL checks run). Their connections
    group each seal's money by hashing: sorting the day's million named transfers first cost
    2.19-2.45 s of server CPU against 1.99-2.11 s (the batches themselves must sort)."""
    options = ctx.options
    scope = seal_check.seal_scope(conn, options.chain, options.window)
    return seal_check.start_seal_check(ctx.engine, conn, scope, ctx.seal_keys(), options.jobs,
                                       ctx.found, prepare(Planning.HASHED))


def _finish_seals(ctx: Context, conn: Connection,
                  finish: Callable[[], tuple[int, str] | None]) -> None:
    ctx.anchor = finish()
    seal_check.check_unsealed(conn, ctx.now, ctx.found)


def _no_chain(ctx: Context) -> str | None:
    return "audit_chain (--chain off)" if ctx.options.chain == "off" else None


def _no_key_ring(ctx: Context) -> str | None:
    keys_dir = ctx.options.keys_dir
    if ctx.options.chain == "off":
        return ""  # said of the audit chain already
    if keys_dir is None:
        return "seal_signatures (keys_dir)"
    if ctx.seal_keys() is None:
        return f"seal_signatures (no key ring in {keys_dir})"
    return None


CHECKS: tuple[Check, ...] = (
    Check("prices", "the window's calls, grouped in one scan; its refusals", _prices,
          planning=Planning.HASHED),
    Check("control_totals", "the window's transfers, grouped in one scan, against the calls' "
          "groups; a token whose totals differ, row by row", _transfer_groups, _control_totals,
          start=Start.BESIDE, planning=Planning.HASHED),
    Check("token_validity", "the tokens the window charged, by primary key", _token_validity),
    Check("event_transfers", "the window's events and transfers, grouped together",
          _event_transfers, _event_transfers_noted, start=Start.BESIDE),
    Check("ledger_invariants", "every account and token; the transfers since the latest "
          "snapshot at or before the window's start (with none, every transfer); the open "
          "holds; the calls created or captured since", _ledger_wide, _ledger_noted,
          start=Start.BESIDE, planning=Planning.SERIAL,
          skip=lambda ctx: None if ctx.options.ledger_wide
          else "ledger_invariants (--window-only)", label=_ledger_label),
    Check("refunds", "the window's refunds (rows, transfers and events) and the calls they "
          "name or the window's calls with something refunded (of the tokens whose groups "
          "count some)", _refunds),
    Check("stale_holds", "the open holds and the x402 payments still reserved", _stale_holds),
    Check("refused_captures", "the window's refusals of lapsed holds", _refused_captures),
    Check("deposits", "the window's deposits and their transfers", _deposits),
    Check("audit_chain", "the seals holding the window's events (or every seal) and their "
          "events; the events still unsealed", _start_seals, _finish_seals, start=Start.FIRST,
          skip=_no_chain, label=lambda ctx: f"audit_chain ({ctx.options.chain})"),
    Check("seal_signatures", "the seals' signatures, checked by audit_chain", _nothing,
          skip=_no_key_ring),
    Check("receipt_signatures", "the window's captured calls' receipts", _receipts,
          skip=lambda ctx: None if ctx.options.verify_receipts
          else "receipt_signatures (--verify-receipts)"),
    Check("onchain", "each of the window's deposits on its chain", _onchain,
          skip=lambda ctx: None if ctx.options.onchain is not None else "onchain (--onchain)"),
)

"""Reconcile: one window of the ledger (a UTC day, or any span) checked end to end.

``reconcile(engine, ReconcileOptions(window=Window.day(date(2026, 11, 27))))`` returns a
:class:`ReconcileReport`: totals per tenant, agent, tool and token (calls, amount charged,
voids, refusals by code, deposits) and named findings, each with a severity and the rows it
concerns (:data:`FINDINGS` lists them all). It never prints and never exits; the CLI renders.

What is checked, and how it scales:

- **The window's calls**, in one grouped SQL scan: totals; every captured call re-priced with
  the pricing version it recorded; no charge after its token's revocation or expiry.
- **The window's transfers**, in one grouped SQL scan: per token, charges, captures and holds
  (by outcome) must add up the same as the calls say (control totals). A token where they
  do not is compared row by row, which names the calls charged twice, the charges whose call
  is gone, the amounts that differ and the holds with two outcomes.
- **The whole ledger** with ``ledger.invariants.check_from``, incrementally: balances sum to
  zero, no guarded account below zero, stored sums equal the transfers, no token past its
  limit, every captured call posted once with a receipt; plus holds still pending past their
  timeout. See "Incremental" below.
- **Deposits** against their transfers; with ``onchain``, against the chain itself.
- **The audit trail against the money**: every hold, capture, charge, void and expire event of
  the window has its transfer and every such transfer its event, one to one (one grouped SQL
  pass over both; only mismatches leave the database).
- **The sealed audit trail**: the seals holding the window's events (``chain="window"``, the
  first linked to the seal before it), every seal (``"full"``), or none (``"off"``): their
  numbers, links, hashes and signatures (with ``keys_dir``), and each seal's batch re-hashed;
  each seal's money (``ledger.seal_money``: the transfers its events name, per class of
  account) sums to zero and matches those transfers now; events left unsealed too long.
- **Receipt signatures** (``verify_receipts``): every captured call's receipt verified with
  every key of the key ring and its signed fields compared with the call.

**Incremental.** A day's reconcile reads that day's rows (and those written since) and the
sums each account had at its start, never the whole history: its cost follows the day, not
the ledger's age. A snapshot is a moment (``ledger_snapshots``) and each account's posted sums
and spending (charges and captures it paid) then, summed from the transfers created before
it: its latest row of ``account_snapshots`` at or before the moment (none: zero). The
ledger-wide check starts from the latest snapshot at or before the window's start (the
report's check is ``ledger_invariants (from snapshot <moment>)``):

- each account's posted sums must equal its snapshot's plus the ``posted`` and
  ``post_pending`` transfers created since: a transfer adds to them once, at its
  ``created_at``, and is never changed after; its pending sums, the holds still open (their
  number follows the calls in flight, read through ``ix_transfers_pending_open``, not the
  history: a hold's status is what it is now, not what it was at the snapshot, so snapshots
  keep no pending sums);
- each token's spending is the snapshot's plus its charges and captures since, against its
  limit (every token: one cut after the fact is found too);
- the captured calls checked are those created since the snapshot, and those a charge or
  capture since names (held before, captured since);
- balances and overdrafts read the accounts only.

That reads every account and its latest snapshot row (their number grows with tokens, not
with calls), the transfers from the snapshot on (by ``ix_transfers_created``) and the calls
from there on. With no snapshot at or before the start (a ledger just upgraded to schema
0006, a window older than the snapshots kept, or ``full_history``) it reads every transfer
once (``ledger_invariants (full history)``). The window's own checks read the window's rows
through an index of their time (the deposits too: ``ix_deposits_credited``, ``ix_deposits_seen``,
schema 0014); ``tests/reconcile/test_incremental.py`` checks that no plan scans a table that
grows with the days.

A check that finds every account's stored sums right takes the snapshot at the window's end
for the next one (``snapshots``; ``ReconcileReport.snapshot_at``): a row for each account that
moved since the snapshot it started from, with the sums it just checked, from the same scans.
It is written in a short transaction of its own after the read one, only once the window's
end is five minutes past (a transfer dated before it by a transaction still open has
committed by then), once (a snapshot there is kept as it is), and not with
``snapshots=False`` (``--no-snapshot``: a read-only role, a replica). Snapshots are kept 35
days. A snapshot is as trustworthy as the rows it is written beside: someone able to edit both
an account and its snapshot row is found by ``full_history`` only, which sums every transfer
again.

**How it runs.** ``checks.CHECKS`` declares every check in report order: its name, what it
reads, what it does, whether it may run beside the others and how its queries are best planned;
``run`` runs them (``alongside``, ``tuning``, ``parallel``) in one read snapshot.

Memory stays flat whatever the row count: SQL aggregates, results stream (``yield_per``), and
findings keep at most ``max_rows`` rows each (with the full count); a seal's batch, at most
5,000 events, is the most the audit check holds. Hashing events and verifying signatures are
per-row Python work; they run in ``jobs`` worker processes. On PostgreSQL the server hashes the
sealed batches (``seal_sql``). The big queries run side by side on connections that share the
reconcile's snapshot (``alongside``; on SQLite all take it together, under a write lock held
for as long as that takes).
"""

from __future__ import annotations

from mcpbill_cli.reconcile.model import (
    FINDINGS,
    ChainReader,
    Filters,
    Finding,
    ReconcileOptions,
    ReconcileReport,
    Row,
    Severity,
    Totals,
    Window,
)
from mcpbill_cli.reconcile.run import reconcile

__all__ = ["FINDINGS", "ChainReader", "Filters", "Finding", "ReconcileOptions",
           "ReconcileReport", "Row", "Severity", "Totals", "Window", "reconcile"]

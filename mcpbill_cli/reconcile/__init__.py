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
- **The whole ledger** with ``ledger.invariants.check``: balances sum to zero, no guarded
  account below zero, stored sums equal the transfers, no token past its limit, every captured
  call posted once with a receipt; plus holds still pending past their timeout.
- **Deposits** against their transfers; with ``onchain``, against the chain itself.
- **The audit trail against the money**: every hold, capture, charge, void and expire event of
  the window has its transfer and every such transfer its event, one to one (one grouped SQL
  pass over both; only mismatches leave the database).
- **The sealed audit trail**: the seals holding the window's events (``chain="window"``, the
  first linked to the seal before it), every seal (``"full"``), or none (``"off"``): their
  numbers, links, hashes and signatures (with ``keys_dir``), and each seal's batch re-hashed;
  events left unsealed too long.
- **Receipt signatures** (``verify_receipts``): every captured call's receipt verified with
  every key of the key ring and its signed fields compared with the call.

Memory stays flat whatever the row count: SQL aggregates, results stream (``yield_per``), and
findings keep at most ``max_rows`` rows each (with the full count); a seal's batch, at most
5,000 events, is the most the audit check holds. Hashing events and verifying signatures are
per-row Python work; they run in ``jobs`` worker processes. On PostgreSQL the server hashes the
sealed batches (``seal_sql``), and the big queries run side by side on connections that share
the reconcile's snapshot (``alongside``).
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

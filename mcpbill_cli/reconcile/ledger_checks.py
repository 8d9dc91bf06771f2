"""The ledger's own invariants (``ledger.invariants``, ledger-wide) under reconcile's finding
names, holds left past their timeout, calls whose tool ran but whose capture was refused, and
the window's control totals: each token's calls against its transfers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta

from sqlalchemy import Connection, func, select

from mcpbill_cli.clock import aware, rfc3339
from mcpbill_cli.ledger import invariants
from mcpbill_cli.ledger.models import events, transfers, x402_payments
from mcpbill_cli.reconcile.calls_pass import TokenTally
from mcpbill_cli.reconcile.collect import Findings
from mcpbill_cli.reconcile.drilldown import drill_token
from mcpbill_cli.reconcile.model import Row, Window
from mcpbill_cli.reconcile.transfers_pass import TransferTally

t = transfers.c
e = events.c
p = x402_payments.c
X402_STALE_AFTER = timedelta(minutes=2)  # what Acceptor.recover() waits before it looks

# invariants.check's names -> (finding, the table its rows are keys of)
INVARIANT_FINDINGS: dict[str, tuple[str, str]] = {
    "balances_sum_to_zero": ("ledger_unbalanced", "accounts"),
    "no_overdraft": ("account_overdrawn", "accounts"),
    "sums_match_transfers": ("account_sums_mismatch", "accounts"),
    "spent_within_limit": ("token_overspent", "tokens"),
    "captured_calls_posted": ("captured_call_incomplete", "calls"),
}


def check_invariants(violations: Iterable[invariants.Violation], found: Findings) -> None:
    """Every violation ``invariants.check`` found, under reconcile's finding names."""
    for violation in violations:
        name, table = INVARIANT_FINDINGS[violation.check]
        if not violation.rows:
            found.note(name, 1, violation.detail)
        for key in violation.rows:
            found.add(name, Row(table, str(key)))


def check_stale_holds(conn: Connection, now: datetime, found: Findings) -> None:
    """Holds still pending after their timeout: money reserved that nobody will capture."""
    stale = (t.kind == "pending", t.status == "pending", t.timeout_at <= now)
    count = conn.execute(select(func.count()).where(*stale)).scalar_one()
    if not count:
        return
    found.note("hold_past_timeout", int(count))
    rows = conn.execute(select(t.id, t.timeout_at).where(*stale).order_by(t.timeout_at)
                        .limit(found.max_rows))
    for row in rows:
        found.show("hold_past_timeout", Row("transfers", row.id,
                                            f"timed out at {row.timeout_at}"))


def check_stale_x402(conn: Connection, now: datetime, found: Findings) -> None:
    """x402 payments reserved longer than a call takes: a server died between settling and
    recording (the payer may have paid for nothing booked), or before settling."""
    stale = (p.status == "reserved", p.reserved_at <= now - X402_STALE_AFTER)
    for row in conn.execute(select(p.id, p.reserved_at, p.tool, p.amount).where(*stale)
                            .order_by(p.reserved_at).limit(found.max_rows)):
        found.add("x402_payment_stale", Row("x402_payments", row.id,
                                            f"{row.tool} for {row.amount} units, reserved at "
                                            f"{rfc3339(aware(row.reserved_at))}"))


def check_refused_captures(conn: Connection, window: Window, found: Findings) -> None:
    """Calls whose tool ran but whose hold had lapsed by its capture: run, never billed."""
    refused = (e.kind == "refusal", e.code == "HOLD_NOT_ACTIVE", e.ref.is_not(None),
               e.at >= window.start, e.at < window.end)
    for row in conn.execute(select(e.ref, e.at, e.tool, e.jti).where(*refused)
                            .order_by(e.at, e.id)):
        found.add("capture_refused", Row("calls", row.ref,
                                         f"{row.tool} for token {row.jti}: capture refused at "
                                         f"{row.at}, the tool's result was withheld"))


def check_control_totals(conn: Connection, window: Window, by_calls: Mapping[str, TokenTally],
                         by_transfers: Mapping[str, TransferTally], found: Findings) -> None:
    """Per token: charges, captures and holds by outcome must add up the same from the calls
    as from the transfers; a token where they do not is compared row by row."""
    empty_calls, empty_transfers = TokenTally("", ""), TransferTally()
    for jti in sorted(by_calls.keys() | by_transfers.keys()):
        mine = by_calls.get(jti, empty_calls)
        moved = by_transfers.get(jti, empty_transfers)
        if _disagree(mine, moved):
            drill_token(conn, jti, window, found)


def _disagree(mine: TokenTally, moved: TransferTally) -> bool:
    holds = {status: n for status, n in mine.holds.items() if n[0]}
    moved_holds = {status: n for status, n in moved.holds.items() if n[0]}
    return (mine.charges != moved.charges or mine.captures != moved.captures
            or holds != moved_holds or moved.contradictions > 0)

"""The declarative list of checks is what runs: each check ran (under its name, or a label
that starts with it) or was skipped with a reason that starts with it, in the list's order."""

from __future__ import annotations

from mcpbill_cli.reconcile.checks import CHECKS

from .support import Ledger


def named(entries: tuple[str, ...]) -> list[str]:
    return [entry.split(" (")[0] for entry in entries]


def test_every_check_of_the_list_runs_or_says_why_not(ledger: Ledger) -> None:
    names = [check.name for check in CHECKS]
    assert len(set(names)) == len(names) and all(check.reads for check in CHECKS)

    everything = ledger.reconcile(verify_receipts=True)
    nothing_optional = ledger.reconcile(chain="off", ledger_wide=False)

    assert named(everything.checks) == [n for n in names if n != "onchain"]
    assert named(everything.skipped) == ["onchain"]
    assert named(nothing_optional.checks) == [
        "prices", "control_totals", "token_validity", "event_transfers", "refunds",
        "stale_holds", "refused_captures", "deposits"]
    assert named(nothing_optional.skipped) == [
        "ledger_invariants", "audit_chain", "receipt_signatures", "onchain"]

"""With several jobs, spawned workers re-hash the chain and verify receipts in slices: the
findings are exactly those of one process."""

from __future__ import annotations

import pytest

from mcpbill_cli.reconcile import chain_check, receipt_check

from .support import Ledger, rows_of


@pytest.mark.slow
def test_workers_find_what_one_process_finds(ledger: Ledger,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    charge = ledger.calls["charge"]
    ledger.sql("UPDATE events SET tool = 'other' WHERE seq = 7")
    forged = ledger.call_row(ledger.calls["charge2"]).receipt
    ledger.sql("UPDATE calls SET receipt = :r WHERE id = :c", r=forged, c=charge)
    alone = ledger.reconcile(verify_receipts=True, jobs=1)
    monkeypatch.setattr(chain_check, "PARALLEL_FROM", 1)
    monkeypatch.setattr(receipt_check, "PARALLEL_FROM", 1)

    spread = ledger.reconcile(verify_receipts=True, jobs=2)

    assert rows_of(spread) == rows_of(alone) == [
        ("audit_chain_broken", "error", ["events/7"]),
        ("receipt_mismatch", "error", [f"calls/{charge}"])]

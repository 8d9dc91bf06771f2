"""With several jobs, a thread or spawned workers (PostgreSQL: connections) hash the sealed
batches and verify receipts in slices: the findings are exactly those of one process."""

from __future__ import annotations

from pathlib import Path

import pytest

from mcpbill_cli.ledger.engine import make_engine
from mcpbill_cli.ledger.schema import upgrade
from mcpbill_cli.reconcile import receipt_check, seal_check

from .support import Ledger, rows_of, small_ledger


@pytest.mark.slow
@pytest.mark.parametrize("jobs", [2, 3])  # SQLite: the batches in a thread; in workers
def test_workers_find_what_one_process_finds(ledger: Ledger, monkeypatch: pytest.MonkeyPatch,
                                             jobs: int) -> None:
    charge = ledger.calls["charge"]
    ledger.sql("UPDATE events SET tool = 'other' WHERE id = 3")
    ledger.sql("UPDATE seals SET sealed_at = sealed_at + interval '1 second' WHERE number = 2"
               if ledger.engine.dialect.name == "postgresql"
               else "UPDATE seals SET sealed_at = '2031-03-14 09:30:00.000000' WHERE number = 2")
    forged = ledger.call_row(ledger.calls["charge2"]).receipt
    ledger.sql("UPDATE calls SET receipt = :r WHERE id = :c", r=forged, c=charge)
    alone = ledger.reconcile(verify_receipts=True, jobs=1)
    monkeypatch.setattr(seal_check, "PARALLEL_FROM", 1)
    monkeypatch.setattr(seal_check, "SLICE", 1)
    monkeypatch.setattr(receipt_check, "PARALLEL_FROM", 1)

    spread = ledger.reconcile(verify_receipts=True, jobs=jobs)

    assert rows_of(spread) == rows_of(alone) == [
        ("audit_chain_broken", "error", ["seals/2", "events/3", "seals/1"]),
        ("receipt_mismatch", "error", [f"calls/{charge}"])]


@pytest.mark.parametrize("jobs", [2, 3])
def test_a_ledger_in_memory_is_hashed_where_it_is_seen(tmp_path: Path, jobs: int,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the connection that made an in-memory ledger sees it: with several jobs its
    batches are hashed on that connection, not by a thread or worker opening an empty one."""
    engine = make_engine("sqlite://")
    upgrade(engine)
    ledger = small_ledger(engine, tmp_path / "keys")
    monkeypatch.setattr(seal_check, "PARALLEL_FROM", 1)
    monkeypatch.setattr(seal_check, "SLICE", 1)
    try:
        assert rows_of(ledger.reconcile(jobs=jobs)) == []
    finally:
        engine.dispose()

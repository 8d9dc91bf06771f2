"""``run_demo``: the example server over stdio, called until the budget runs out."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select

from mcpbill_cli.demo import DEMO_LIMIT, run_demo
from mcpbill_cli.keys import KeySource
from mcpbill_cli.ledger.engine import make_engine, reading
from mcpbill_cli.ledger.models import events
from mcpbill_cli.money import parse_usd
from mcpbill_cli.receipts import verify_receipt


@pytest.mark.slow
def test_the_demo_spends_its_budget_over_mcp_and_reconciles(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A configured ledger is never touched: the demo keeps to a SQLite file in its home.
    monkeypatch.setenv("MCPBILL_DB_URL", "postgresql+psycopg://nobody@127.0.0.1:1/never-used")
    home = tmp_path / "demo"
    steps = list(run_demo(home))
    kinds = [step.kind for step in steps]
    assert kinds[-2:] == ["refusal", "summary"] and "fallback" in kinds and "free" in kinds
    keys = KeySource(directory=home / "keys").verification_keys()
    receipts = [step.data for step in steps if step.kind == "receipt"]
    [replay] = [step.data for step in steps if step.kind == "replay"]
    assert replay == receipts[0]  # the retry of the first call: its receipt, billed once
    spent = sum(verify_receipt(receipt["jws"], keys).amount for receipt in receipts)
    final = steps[-2].data
    assert final["code"] == "BUDGET_EXCEEDED" and final["fallback"]["tools"] == []
    assert spent + parse_usd(final["remainingUsd"], allow_zero=True) == DEMO_LIMIT
    summary = steps[-1].data
    assert summary["violations"] == [] and summary["balance"].spent == spent
    assert summary["reconcile"]["captured"] == len(receipts)
    assert "receipt_signatures" in summary["reconcile"]["checks"]
    assert (home / "ledger.db").is_file() and (home / "server.log").is_file()
    engine = make_engine(f"sqlite:///{home / 'ledger.db'}")
    with reading(engine) as conn:  # the server sealed what it wrote before it stopped
        unsealed = conn.execute(select(func.count()).where(events.c.seal.is_(None)))
        assert unsealed.scalar_one() == 0
    engine.dispose()


@pytest.mark.slow
def test_stopping_the_demo_early_closes_the_server_cleanly(tmp_path: Path) -> None:
    steps = run_demo(tmp_path / "demo")
    kinds = []
    for step in steps:
        kinds.append(step.kind)
        if step.kind == "receipt":
            break
    steps.close()  # must not raise: the MCP session and the server process shut down
    assert kinds[-1] == "receipt"

"""A tenant's cap under several processes: four verifiers, each on its own token of the one
capped tenant, charge 25 calls each; exactly the cap is spent, never a call more."""

from __future__ import annotations

import multiprocessing
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine, select

from mcpbill_cli.keys import KeyRing
from mcpbill_cli.ledger.engine import reading
from mcpbill_cli.ledger.models import budget_spend

from .billing_support import PRICING_DOC, USDC, fund, mint
from .billing_workers import charge_calls

CAPPED = {**PRICING_DOC, "tenants": {"acme": {"daily_cap": "0.30", "monthly_cap": "100"}}}


def test_four_processes_on_one_capped_tenant_never_pass_its_cap(
        engine: Engine, db_url: str, keys_dir: Path, ring: KeyRing) -> None:
    now = datetime.now(UTC)
    fund(engine, "acme", 10 * USDC, now=now)
    tokens = [mint(engine, ring, now=now, agent=f"agent-{n}").token for n in range(4)]
    ctx = multiprocessing.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    workers = [ctx.Process(target=charge_calls, args=(db_url, str(keys_dir), CAPPED, token,
                                                      25, ready, go, results))
               for token in tokens]
    for worker in workers:
        worker.start()
    for _ in workers:
        assert ready.get(timeout=120) == "ready"
    go.set()
    outcomes = sum((Counter(o) for o, _ in (results.get(timeout=120) for _ in workers)),
                   Counter())
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    assert outcomes == {"ok": 30, "BUDGET_EXCEEDED": 70}
    with reading(engine) as conn:
        spent = dict(conn.execute(select(budget_spend.c.period, budget_spend.c.amount)).all())
    assert spent == {"day": 300_000, "month": 300_000}

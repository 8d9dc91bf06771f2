"""PostgreSQL restarted and killed under load: nothing lost, nothing doubled, and the
verifiers reconnect by themselves.

8 processes, each a live-mode verifier on one cluster, make paid calls (half charge, half hold,
run the tool and capture) while the cluster is restarted cleanly (``pg_ctl restart -m fast``)
and then killed (``pg_ctl stop -m immediate``, crash recovery at the next start). Each call
either completes with a receipt the ledger holds, or is refused as the retryable
LEDGER_UNAVAILABLE and retried under its key; nothing else reaches the caller.
"""

from __future__ import annotations

import json
import multiprocessing
import queue
import time
from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import select

from mcpbill_cli.clock import utcnow
from mcpbill_cli.keys import KeyRing
from mcpbill_cli.ledger.engine import make_engine, reading
from mcpbill_cli.ledger.models import calls
from tests.verifier.billing_support import PRICING_DOC, USDC, fund, mint
from tests.verifier.invariants import assert_ledger_invariants

from .conftest import Run
from .fault_workers import paid_calls_until_stopped
from .scratch_postgres import ScratchPostgres

WORKERS = 8
RUN_BETWEEN = 1.5  # seconds of calls before, between and after the outages
DOWN_FOR = 1.0  # seconds the killed cluster stays down
RECONNECT_WITHIN = 8.0  # seconds after the database is back by which every worker has a receipt
# What a caller may meet besides a receipt: the outage itself, and (for a hold whose capture
# the outage refused) the in-progress, failed or lapsed state of that same call's key.
ALLOWED = {"ok", "LEDGER_UNAVAILABLE", "CALL_IN_PROGRESS", "CALL_FAILED", "HOLD_NOT_ACTIVE",
           "DUPLICATE_CALL"}


def test_restart_and_kill_under_load_lose_nothing_and_double_nothing(
        cluster: ScratchPostgres, mcpbill: Run, isolated_home: Path) -> None:
    env = {"MCPBILL_DB_URL": cluster.url}
    made = mcpbill("init", "--mode", "live", env=env)
    assert made.returncode == 0, made.stderr
    engine = make_engine(cluster.url)
    keys_dir = isolated_home / "keys"
    fund(engine, "acme", 1000 * USDC, now=utcnow())
    ring = KeyRing.load(keys_dir)
    tokens = [mint(engine, ring, now=utcnow(), agent=f"replica-{n}", limit=100 * USDC).token
              for n in range(WORKERS)]
    started = utcnow()

    returned: list[float] = []
    results = _run_workers(cluster.url, keys_dir, tokens, lambda: _outages(cluster, returned))

    unexpected = [text for result in results for text in result["unexpected"]]
    assert not unexpected, unexpected[0]
    outcomes = sum((Counter(result["outcomes"]) for result in results), Counter())
    assert set(outcomes) <= ALLOWED, outcomes
    assert outcomes["LEDGER_UNAVAILABLE"] > 0, outcomes  # the outages were met
    for result in results:
        for back in returned:
            assert any(back <= t <= back + RECONNECT_WITHIN for t in result["successes"]), (
                f"worker {result['worker']} had no receipt within {RECONNECT_WITHIN} s of "
                f"the database's return")

    with reading(engine) as conn:
        rows = {row.id: row for row in conn.execute(select(
            calls.c.id, calls.c.idempotency_key, calls.c.status, calls.c.receipt))}
        assert_ledger_invariants(conn)
    by_key = Counter(row.idempotency_key for row in rows.values())
    for result in results:
        for key, receipt_id in result["receipts"]:
            assert rows[receipt_id].status == "captured" and rows[receipt_id].receipt, key
            assert by_key[key] == 1, key  # one call per key, however often it was tried
        for hold_id in result["tool_runs"]:
            assert hold_id in rows  # never a tool run without a hold in the ledger
    engine.dispose()

    checked = mcpbill("reconcile", "--from", started.isoformat(), "--json", env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    report = json.loads(checked.stdout)
    assert report["status"] == "ok", report


def _outages(cluster: ScratchPostgres, returned: list[float]) -> None:
    """A clean restart, then a crash: each after RUN_BETWEEN seconds of calls."""
    time.sleep(RUN_BETWEEN)
    cluster.restart()
    returned.append(time.time())
    time.sleep(RUN_BETWEEN)
    cluster.kill()
    time.sleep(DOWN_FOR)
    cluster.start()
    returned.append(time.time())
    time.sleep(RECONNECT_WITHIN + 1.0)


def _run_workers(db_url: str, keys_dir: Path, tokens: list[str],
                 during: Any) -> list[dict[str, Any]]:
    ctx = multiprocessing.get_context("spawn")
    ready, stop, results = ctx.Queue(), ctx.Event(), ctx.Queue()
    workers = [ctx.Process(target=paid_calls_until_stopped,
                           args=(db_url, str(keys_dir), PRICING_DOC, token, n, ready, stop,
                                 results))
               for n, token in enumerate(tokens)]
    for worker in workers:
        worker.start()
    collected: list[dict[str, Any]] = []
    try:
        for _ in workers:
            ready.get(timeout=120)
        during()
        stop.set()
        while len(collected) < len(workers):
            try:
                collected.append(results.get(timeout=60))
            except queue.Empty:
                break
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=30)
            if worker.exitcode is None:
                worker.terminate()
    assert len(collected) == len(workers), [w.exitcode for w in workers]
    return collected

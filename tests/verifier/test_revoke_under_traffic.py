"""Past bug: `mcpbill revoke` read its clock before it took the token's lock, so a charge that
committed while the revoke waited looked "charged after revocation" to reconcile (18-43
false ``charge_after_revocation`` errors per revoke under traffic, exit 20).

Worker processes charge a tenant's tokens as fast as they can, most calls aimed at the token
the test revokes next; the test revokes 20 of them one by one, half through `mcpbill revoke`
and half through ``credit.revoke``, while the traffic runs. Reconcile must find nothing.
"""

from __future__ import annotations

import multiprocessing
import random
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, func, select
from typer.testing import CliRunner

from mcpbill_cli.cli import app
from mcpbill_cli.clock import aware, utcnow
from mcpbill_cli.errors import BillingError
from mcpbill_cli.keys import KeySource
from mcpbill_cli.ledger import credit
from mcpbill_cli.ledger.credit import IssuedToken
from mcpbill_cli.ledger.engine import reading, writing
from mcpbill_cli.ledger.models import calls, events, tokens, transfers
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.reconcile import ReconcileOptions, Window, reconcile
from mcpbill_cli.verifier import Verifier

from .billing_support import PRICE, PRICING_DOC, USDC, FakeClock, fund
from .invariants import assert_ledger_invariants

TOKENS = 30
REVOKED = 20
WORKERS = 4
AIMED = 0.8  # share of the calls that go to the token revoked next
HEAT = 5  # charges a token takes before the test revokes it, traffic still running
LIMIT = 1_000 * USDC  # far more than the traffic spends on a token, however long a revoke waits


def charge_until_stopped(db_url: str, keys_dir: str, pricing_doc: dict[str, Any],
                         jwts: list[str], worker: int, target: Any, ready: Any, go: Any,
                         stop: Any, results: Any) -> None:
    """Charge ``search`` on ``jwts[target.value]`` (or a later token) until ``stop``; every
    call distinct (its own arguments and idempotency key). Put the outcomes by code."""
    verifier = Verifier(keys=KeySource(directory=Path(keys_dir)),
                        pricing=PricingTable.from_document(pricing_doc), db_url=db_url)
    try:
        verifier.preflight(jwts[0], "status")  # connect first
        ready.put("ready")
        go.wait(120)
        pick = random.Random(worker)
        outcomes: Counter[str] = Counter()
        n = 0
        while not stop.is_set():
            n += 1
            aimed = target.value
            jwt = jwts[aimed] if pick.random() < AIMED else pick.choice(jwts[aimed:])
            try:
                verifier.charge(jwt, "search", args={"n": f"{worker}-{n}"},
                                idempotency_key=f"race-{worker}-{n}")
                outcomes["ok"] += 1
            except BillingError as exc:
                outcomes[exc.code] += 1
        results.put(dict(outcomes))
    finally:
        verifier.close()


def wait_for_charges(engine: Engine, jti: str, count: int) -> None:
    deadline = time.monotonic() + 60
    while True:
        with reading(engine) as conn:
            if conn.execute(select(func.count()).where(calls.c.jti == jti)).scalar_one() >= count:
                return
        assert time.monotonic() < deadline, f"no traffic reached {jti}"
        time.sleep(0.002)


def revoke_by_cli(db_url: str, token: IssuedToken) -> None:
    result = CliRunner().invoke(app, ["--db-url", db_url, "revoke", token.claims.jti,
                                      "--reason", "race", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def revoke_by_library(engine: Engine, token: IssuedToken) -> None:
    with writing(engine) as conn:
        credit.revoke(conn, [token.claims.jti], reason="race", clock=utcnow)


def revoke_under_traffic(engine: Engine, db_url: str, keys_dir: Path,
                         doomed: list[IssuedToken], jwts: list[str]) -> tuple[
                             Counter[str], dict[str, datetime]]:
    """Run the workers, revoke ``doomed`` one by one while they charge; their outcomes, and
    when each revoke began."""
    ctx = multiprocessing.get_context("spawn")
    ready, results, go, stop = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Event()
    target = ctx.Value("i", 0, lock=False)
    workers = [ctx.Process(target=charge_until_stopped, args=(
        db_url, str(keys_dir), PRICING_DOC, jwts, index, target, ready, go, stop, results))
        for index in range(WORKERS)]
    for worker in workers:
        worker.start()
    began: dict[str, datetime] = {}
    try:
        for _ in workers:
            assert ready.get(timeout=120) == "ready"
        go.set()
        for index, token in enumerate(doomed):
            target.value = index
            wait_for_charges(engine, token.claims.jti, HEAT)
            began[token.claims.jti] = utcnow()
            if index % 2:
                revoke_by_library(engine, token)
            else:
                revoke_by_cli(db_url, token)
    finally:
        stop.set()
        outcomes = sum((Counter(results.get(timeout=120)) for _ in workers), Counter())
        for worker in workers:
            worker.join(60)
    assert [worker.exitcode for worker in workers] == [0] * WORKERS
    return outcomes, began


@pytest.mark.slow
def test_charges_racing_a_revoke_are_never_found_after_it(
        engine: Engine, db_url: str, keys_dir: Path, new_token: Callable[..., IssuedToken],
        clock: FakeClock) -> None:
    fund(engine, "acme", TOKENS * LIMIT, now=clock())
    issued = [new_token(limit=LIMIT, agent=f"agent-{i}") for i in range(TOKENS)]
    doomed = issued[:REVOKED]
    outcomes, began = revoke_under_traffic(engine, db_url, keys_dir, doomed,
                                           [t.token for t in issued])
    assert set(outcomes) <= {"ok", "TOKEN_REVOKED"}, outcomes

    report = reconcile(engine, ReconcileOptions(
        window=Window(clock() - timedelta(minutes=5), utcnow() + timedelta(minutes=5)),
        now=utcnow()))
    assert report.findings == (), [(f.name, f.count, f.rows[:3]) for f in report.findings]
    assert report.summary.captured == outcomes["ok"]

    with reading(engine) as conn:
        assert_ledger_invariants(conn)
        racing = [revoked_last(conn, token, began[token.claims.jti]) for token in doomed]
        assert conn.execute(select(func.count()).where(
            tokens.c.revoked_at.is_not(None))).scalar_one() == REVOKED
    # Charges that committed while a revoke waited for its lock: the old code reported them.
    assert sum(racing) > 0, "no charge raced a revoke: the test proves nothing"


def revoked_last(conn: Connection, token: IssuedToken, began: datetime) -> int:
    """Assert the revoke came after every charge of ``token``, by the clock and in the audit
    trail, and stamped its event and its release with one instant; return how many charges
    took their time after the revoke began (and still committed before it)."""
    jti = token.claims.jti
    revoked_at = aware(conn.execute(select(tokens.c.revoked_at)
                                    .where(tokens.c.jti == jti)).scalar_one())
    charged = [aware(at) for at in conn.execute(select(calls.c.created_at).where(
        calls.c.jti == jti, calls.c.status == "captured")).scalars()]
    assert charged, f"no charge reached {jti}: the test did not race its revoke"
    assert max(charged) <= revoked_at, (jti, max(charged), revoked_at)

    # The revoke's event takes its id once it holds the token's account, after every charge
    # that holds it first has committed: ids order them (the audit trail's order since 0005).
    trail = dict(conn.execute(select(events.c.kind, func.max(events.c.id)).where(
        events.c.jti == jti, events.c.kind.in_(("charge", "revoke")))
        .group_by(events.c.kind)).all())
    assert trail["charge"] < trail["revoke"], (jti, trail)
    revoke_at = conn.execute(select(events.c.at).where(
        events.c.jti == jti, events.c.kind == "revoke")).scalar_one()
    assert aware(revoke_at) == revoked_at
    release = conn.execute(select(transfers.c.amount, transfers.c.created_at).where(
        transfers.c.debit_account_id == f"token:{jti}", transfers.c.code == "release")).one()
    assert aware(release.created_at) == revoked_at
    assert release.amount + len(charged) * PRICE == token.claims.limit
    return sum(1 for at in charged if at > began)

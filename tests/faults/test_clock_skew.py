"""Verifier replicas given clocks that disagree, on one ledger (SQLite and PostgreSQL).

A clock given to a verifier replaces the ledger's (tests/faults/test_database_clock.py shows
replicas on their default clock agreeing): each call is decided by the clock of the replica
serving it, with the configured leeway for token times (see README "Faults and recovery"), and
the ledger's conditional statements keep that answer whole whatever the other replicas think
the time is. Two verifiers, A and B, share the ledger; B's clock runs ahead of A's.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select

from mcpbill_cli.errors import HoldNotActive, InvalidCreditToken
from mcpbill_cli.keys import KeyRing, KeySource, init_keyring
from mcpbill_cli.ledger.engine import reading
from mcpbill_cli.ledger.models import budget_spend, calls, tokens
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.verifier import Verifier
from tests.verifier.billing_support import PRICE, PRICING_DOC, USDC, FakeClock, fund, mint
from tests.verifier.invariants import assert_ledger_invariants

LEEWAY = 30
HOLD_TIMEOUT = 60
CAP = 3 * PRICE  # acme's daily cap: three searches a UTC day
START = datetime(2026, 12, 5, 23, 59, 0, tzinfo=UTC)


class Replicas:
    """Verifier A on clock ``a``, verifier B on clock ``b`` (``skew`` seconds ahead)."""

    def __init__(self, engine: Engine, keys_dir: Path, skew: float, *,
                 capped: bool = False) -> None:
        self.a, self.b = FakeClock(START), FakeClock(START + timedelta(seconds=skew))
        caps = {"tenants": {"acme": {"daily_cap": "0.03"}}} if capped else {}
        pricing = PricingTable.from_document({**PRICING_DOC, **caps})
        self.A, self.B = (Verifier(keys=KeySource(directory=keys_dir), pricing=pricing,
                                   engine=engine, clock=clock, leeway=LEEWAY,
                                   hold_timeout=HOLD_TIMEOUT)
                          for clock in (self.a, self.b))

    def advance(self, seconds: float) -> None:
        self.a.advance(seconds)
        self.b.advance(seconds)


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "keys"
    init_keyring(directory, "EdDSA", now=START - timedelta(days=1), force=False).save()
    return directory


def _token(engine: Engine, keys_dir: Path, ttl: int) -> str:
    fund(engine, "acme", 10 * USDC, now=START - timedelta(hours=1))
    return mint(engine, KeyRing.load(keys_dir), now=START, limit=USDC, ttl=ttl).token


@pytest.mark.parametrize("skew", [LEEWAY - 5, LEEWAY + 20, 300])
def test_a_token_near_expiry_is_never_charged_past_its_expiry_and_leeway(
        engine: Engine, keys_dir: Path, skew: int) -> None:
    """Each replica refuses the token from its own ``exp + leeway`` on; every charge the
    ledger holds is stamped before that, by the replica that made it."""
    replicas = Replicas(engine, keys_dir, skew)
    token = _token(engine, keys_dir, ttl=20)
    answers: list[tuple[str, str]] = []
    for step in range(12):  # A's clock from START to START + 55 s
        for name, verifier in (("A", replicas.A), ("B", replicas.B)):
            try:
                verifier.charge(token, "search", args={"step": step, "by": name})
                answers.append((name, "ok"))
            except InvalidCreditToken as exc:
                assert exc.reason == "expired"
                answers.append((name, "expired"))
        replicas.advance(5)
    for name in ("A", "B"):  # once a replica says expired, it never charges again
        mine = [answer for who, answer in answers if who == name]
        assert mine == sorted(mine, key=lambda answer: answer == "expired"), mine
        assert "expired" in mine
    if skew > LEEWAY:  # B, ahead by more than the leeway, refuses while A still charges
        assert answers.index(("B", "expired")) < answers.index(("A", "expired"))
    with reading(engine) as conn:
        expires = conn.execute(select(tokens.c.expires_at)).scalar_one()
        stamped = conn.execute(select(calls.c.created_at)).scalars().all()
        assert_ledger_invariants(conn)
    assert stamped and all(_utc(at) < _utc(expires) + timedelta(seconds=LEEWAY)
                           for at in stamped)


@pytest.mark.parametrize("first", ["capture", "sweep"])
def test_a_hold_is_captured_or_expired_never_both_whatever_the_sweepers_clock(
        engine: Engine, keys_dir: Path, first: str) -> None:
    """B's clock is past A's hold timeout: B's sweep expires A's live hold, or A's capture
    lands first and B's sweep leaves it alone. One outcome, and the money agrees with it."""
    replicas = Replicas(engine, keys_dir, skew=HOLD_TIMEOUT + 10)
    token = _token(engine, keys_dir, ttl=3600)
    hold = replicas.A.hold(token, "search", args={"q": "skew"})
    if first == "capture":
        receipt = replicas.A.capture(hold)
        assert replicas.B.sweep_expired() == 0
        assert receipt.amount == PRICE
    else:
        assert replicas.B.sweep_expired() == 1
        with pytest.raises(HoldNotActive):
            replicas.A.capture(hold)
    with reading(engine) as conn:
        (status,) = conn.execute(select(calls.c.status)).scalars().all()
        assert_ledger_invariants(conn)
    assert status == ("captured" if first == "capture" else "expired")
    spent = PRICE if first == "capture" else 0
    assert replicas.A.preflight(token, "search").remaining == USDC - spent


def test_calls_across_midnight_count_in_the_day_their_replica_stamped(
        engine: Engine, keys_dir: Path) -> None:
    """A (23:59:58) and B (00:00:03, next day) charge the same tenant: each call counts
    against the cap of the day its own replica's clock says, its void uncounts it from that
    same day, and each day's total equals the charges stamped in it."""
    replicas = Replicas(engine, keys_dir, skew=5, capped=True)
    token = _token(engine, keys_dir, ttl=3600)
    voided = replicas.A.hold(token, "search", args={"void": True})  # A: 23:59:00
    replicas.advance(58)  # A: 23:59:58, B: 00:00:03
    replicas.B.void(voided)  # uncounted from the day A stamped it with, not B's today
    outcomes: list[Any] = []
    for n in range(4):
        for verifier in (replicas.A, replicas.B):
            try:
                outcomes.append(verifier.charge(token, "search", args={"n": n, "v": id(verifier)}))
            except Exception as exc:  # noqa: BLE001 - the refusal is what is checked
                outcomes.append(exc)
    charged = [o for o in outcomes if not isinstance(o, Exception)]
    refused = [o for o in outcomes if isinstance(o, Exception)]
    assert len(charged) == 6  # three on each day
    assert {getattr(e, "code", None) for e in refused} == {"BUDGET_EXCEEDED"}
    with reading(engine) as conn:
        days = budget_spend.c
        per_day = dict(conn.execute(select(days.period_start, days.amount).where(
            days.scope == "tenant", days.period == "day")).all())
        stamped = conn.execute(select(calls.c.created_at, calls.c.amount)
                               .where(calls.c.status == "captured")).all()
        assert_ledger_invariants(conn)
    by_day: dict[str, int] = {}
    for at, amount in stamped:
        by_day[_utc(at).strftime("%Y-%m-%d")] = by_day.get(
            _utc(at).strftime("%Y-%m-%d"), 0) + amount
    assert per_day == by_day == {"2026-12-05": CAP, "2026-12-06": CAP}


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)

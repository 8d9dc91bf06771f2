"""Ledgers for the reconcile tests, written by the real Verifier on a clock the test moves.

The day is far in the future so that a rotated key's ``verify_until`` (the last token's
expiry, on this fake clock) is still ahead of the real clock KeySource reads. The verifiers
are given an engine, so no sealer thread runs: each ledger seals its trail (``Ledger.seal``)
when it is written, as a server's sealer would within a second.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select, text

from mcpbill_cli.keys import KeyRing, KeySource, init_keyring, retire, rotate
from mcpbill_cli.ledger.credit import IssuedToken, IssueRequest, fund_demo, issue, revoke
from mcpbill_cli.ledger.engine import reading, writing
from mcpbill_cli.ledger.models import calls
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.reconcile import ReconcileOptions, ReconcileReport, Window, reconcile
from mcpbill_cli.verifier import Verifier
from tests.verifier.billing_support import PRICING_DOC

DAY = date(2031, 3, 14)
USDC = 1_000_000
HOLD_TIMEOUT = 300
# The verifier tests' table, plus a tenant with a discount and a price of its own.
PRICING: dict[str, Any] = {
    **PRICING_DOC,
    "tenants": {"acme": {"discount_percent": 20, "tools": {"search": {"price": "0.005"}}}},
}


class FakeClock:
    """A UTC clock that moves only when told."""

    def __init__(self, start: datetime) -> None:
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        with self._lock:
            self.now += timedelta(seconds=seconds)
        return self.now


@dataclass
class Ledger:
    """A ledger and what wrote it; ``calls`` names notable call ids by role."""

    engine: Engine
    keys_dir: Path
    clock: FakeClock
    verifier: Verifier
    tokens: dict[str, IssuedToken] = field(default_factory=dict)
    calls: dict[str, str] = field(default_factory=dict)

    def mint(self, name: str, *, tenant: str = "acme", agent: str = "agent-1",
             limit: int = 10 * USDC, ttl: int = 6 * 3600, scope: list[str] | None = None,
             parent: str | None = None) -> IssuedToken:
        request = IssueRequest(tenant=tenant, agent=agent, limit=limit, ttl=ttl, scope=scope,
                               audience="mcpbill", issuer="mcpbill", parent=parent)
        with writing(self.engine) as conn:
            token = issue(conn, request, signer=KeyRing.load(self.keys_dir).signing_key(),
                          ttl_cap=86400, now=self.clock())
        self.tokens[name] = token
        return token

    def verifier_for(self, pricing: dict[str, Any]) -> Verifier:
        """Another verifier on this ledger (a server restarted with another pricing table)."""
        return Verifier(keys=KeySource(directory=self.keys_dir),
                        pricing=PricingTable.from_document(pricing), engine=self.engine,
                        hold_timeout=HOLD_TIMEOUT, clock=self.clock)

    def seal(self) -> int:
        """Seal the audit trail and write the refusal counts, as a verifier's sealer does."""
        return self.verifier.seal()

    def reconcile(self, **options: Any) -> ReconcileReport:
        settings: dict[str, Any] = {"window": Window.day(DAY), "keys_dir": self.keys_dir,
                                    "now": self.clock(), "jobs": 1}
        return reconcile(self.engine, ReconcileOptions(**{**settings, **options}))

    def sql(self, statement: str, **params: Any) -> None:
        """Tamper: run raw SQL against the ledger, as an attacker with database access would."""
        with self.engine.begin() as conn:
            conn.execute(text(statement), params)

    def call_row(self, call_id: str) -> Any:
        with reading(self.engine) as conn:
            return conn.execute(select(calls).where(calls.c.id == call_id)).one()


def new_ledger(engine: Engine, keys_dir: Path) -> Ledger:
    """A clock at 09:00 on DAY, acme and globex funded; keys made in ``keys_dir`` if none."""
    clock = FakeClock(datetime(DAY.year, DAY.month, DAY.day, 9, tzinfo=UTC))
    if not KeyRing.exists(keys_dir):
        init_keyring(keys_dir, "EdDSA", now=clock(), force=False).save()
    with writing(engine) as conn:
        fund_demo(conn, "acme", 100 * USDC, now=clock())
        fund_demo(conn, "globex", 50 * USDC, now=clock())
    ledger = Ledger(engine, keys_dir, clock, verifier=None)  # type: ignore[arg-type]
    ledger.verifier = ledger.verifier_for(PRICING)
    return ledger


def small_ledger(engine: Engine, keys_dir: Path) -> Ledger:
    """A few calls of each kind: charges, a captured hold, a voided hold, a per-unit capture.

    ``calls``: charge (search, acme), charge2 (translate, globex), captured (search held then
    captured), voided, metered (summarize held, captured for 1234 units). Two seals: seal 1
    holds the funding, the tokens and the two charges; seal 2 the holds and their outcomes.
    """
    ledger = new_ledger(engine, keys_dir)
    verifier, clock = ledger.verifier, ledger.clock
    acme = ledger.mint("acme", agent="agent-a").token
    globex = ledger.mint("globex", tenant="globex", agent="agent-g").token
    ledger.calls["charge"] = verifier.charge(acme, "search").receipt_id
    clock.advance(60)
    ledger.calls["charge2"] = verifier.charge(globex, "translate").receipt_id
    clock.advance(60)
    ledger.seal()
    with verifier.call(acme, "search") as billed:
        clock.advance(1)
    ledger.calls["captured"] = billed.hold.id
    held = verifier.hold(acme, "translate")
    verifier.void(held)
    ledger.calls["voided"] = held.id
    clock.advance(60)
    with verifier.call(acme, "summarize") as metered:
        metered.report_units(1234)
    ledger.calls["metered"] = metered.hold.id
    clock.advance(60)
    ledger.seal()
    return ledger


def three_days(engine: Engine, keys_dir: Path) -> Ledger:
    """small_ledger's day, then two more: before each midnight a token of its own holds a call
    captured after it; each day a token of its own charges, holds and voids. The trail is
    sealed; the clock ends at 01:00 the day after the third, so every day has settled."""
    ledger = small_ledger(engine, keys_dir)
    for n in (1, 2):
        _across_midnight(ledger, DAY + timedelta(days=n), f"late{n}")
        _a_day(ledger, DAY + timedelta(days=n), f"day{n}")
    ledger.clock.now = midnight(DAY + timedelta(days=3)) + timedelta(hours=1)
    return ledger


def midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def _across_midnight(ledger: Ledger, day: date, name: str) -> None:
    ledger.clock.now = midnight(day) - timedelta(seconds=1)
    token = ledger.mint(name, tenant="globex", agent="agent-late").token
    with ledger.verifier.call(token, "search") as billed:
        ledger.clock.advance(2)
    ledger.calls[name] = billed.hold.id
    ledger.seal()


def _a_day(ledger: Ledger, day: date, name: str) -> None:
    verifier, clock = ledger.verifier, ledger.clock
    clock.now = midnight(day) + timedelta(hours=9)
    token = ledger.mint(name, agent=f"agent-{name}").token
    for n in range(3):
        ledger.calls[f"{name}-charge{n}"] = verifier.charge(token, "search",
                                                            args={"n": n}).receipt_id
        clock.advance(60)
    held = verifier.hold(token, "translate")
    verifier.void(held)
    with verifier.call(token, "summarize") as metered:
        metered.report_units(2_000)
    ledger.calls[f"{name}-metered"] = metered.hold.id
    clock.advance(60)
    ledger.seal()


def busy_day(engine: Engine, keys_dir: Path) -> Ledger:
    """A day of everything: charges, holds captured (in part), voided and expired, refusals,
    a revoked token, an expired token, a child token, a key rotation, a second pricing version,
    idempotent replays and a call priced by a downstream x402 payment."""
    ledger = small_ledger(engine, keys_dir)
    _morning(ledger)
    _rotation_and_repricing(ledger)
    _afternoon(ledger)
    ledger.seal()
    _retire_old_keys(ledger)
    return ledger


def _morning(ledger: Ledger) -> None:
    verifier, clock = ledger.verifier, ledger.clock
    crawler = ledger.mint("crawler", agent="crawler", limit=2 * USDC).token
    for n in range(12):
        verifier.charge(crawler, ["search", "status", "read.page"][n % 3], args={"n": n})
        clock.advance(7)
    again = verifier.charge(crawler, "search", idempotency_key="retry-1")
    assert verifier.charge(crawler, "search", idempotency_key="retry-1").jws == again.jws
    child = ledger.mint("child", agent="sub-agent", limit=USDC // 2,
                        parent=ledger.tokens["crawler"].claims.jti).token
    verifier.charge(child, "summarize", units=777)
    stale = verifier.hold(crawler, "translate")
    clock.advance(HOLD_TIMEOUT + 1)
    assert verifier.sweep_expired() == 1
    ledger.calls["expired"] = stale.id
    _refusals(ledger)


def _refusals(ledger: Ledger) -> None:
    """One refusal of each kind: scope, budget, malformed, expired and revoked tokens."""
    verifier, clock = ledger.verifier, ledger.clock
    narrow = ledger.mint("narrow", agent="agent-n", scope=["search"], limit=USDC // 100).token
    short = ledger.mint("short", agent="agent-s", ttl=120).token
    verifier.charge(short, "search")
    verifier.charge(narrow, "search")  # acme's own price: 0.005, twice fits in 0.01
    verifier.charge(narrow, "search", args={"again": True})
    _refused(lambda: verifier.charge(narrow, "search", args={"third": True}))
    _refused(lambda: verifier.charge(narrow, "translate"))
    _refused(lambda: verifier.charge("not-a-token", "search"))
    clock.advance(600)
    _refused(lambda: verifier.charge(short, "search"))
    doomed = ledger.mint("doomed", agent="agent-d")
    with writing(ledger.engine) as conn:
        revoke(conn, [doomed.claims.jti], reason="leaked", clock=clock)
    _refused(lambda: verifier.charge(doomed.token, "search"))


def _refused(attempt: Any) -> None:
    from mcpbill_cli.errors import BillingError

    try:
        attempt()
    except BillingError:
        return
    raise AssertionError("the call should have been refused")


def _rotation_and_repricing(ledger: Ledger) -> None:
    clock = ledger.clock
    clock.advance(3600)
    ring = KeyRing.load(ledger.keys_dir)
    rotate(ring, "EdDSA", now=clock(), last_expiry=clock() + timedelta(hours=6))
    ring.save()
    repriced = {**PRICING, "version": 2, "tools": {**PRICING["tools"],
                                                   "search": {"price": "0.02"}}}
    ledger.seal()  # the old server's last turn: its refusal counts are written
    ledger.verifier = ledger.verifier_for(repriced)
    fresh = ledger.mint("fresh", tenant="globex", agent="agent-f").token
    old = ledger.tokens["acme"].token  # signed by the rotated-out key: still verifies
    for n in range(6):
        ledger.verifier.charge(fresh if n % 2 else old, "search", args={"n": n})
        clock.advance(30)


def _afternoon(ledger: Ledger) -> None:
    verifier, clock = ledger.verifier, ledger.clock
    worker = ledger.tokens["fresh"].token
    for units in (10, 50_000, 90_000):
        with verifier.call(worker, "summarize") as billed:
            billed.report_units(units)
        clock.advance(45)
    held = verifier.hold(worker, "summarize", max_units=2_000)
    verifier.capture(held)  # no units reported: the whole (smaller) hold is posted
    paid = verifier.hold(worker, "summarize", amount=123_456)  # a downstream x402 price
    verifier.capture(paid, settlement={"transaction": "0x" + "ab" * 32,
                                       "network": "eip155:84532", "success": True})
    try:
        with verifier.call(worker, "translate"):
            raise RuntimeError("the tool failed")
    except RuntimeError:
        pass
    clock.advance(3600)


def _retire_old_keys(ledger: Ledger) -> None:
    """Retired keys verify no token any more; their receipts must still verify in reconcile."""
    ring = KeyRing.load(ledger.keys_dir)
    for kid, info in list(ring.keys.items()):
        if info.status != "active":
            retire(ring, kid)
    ring.save()


def rows_of(report: ReconcileReport) -> list[tuple[str, str, list[str]]]:
    """Each finding as (name, severity, [table/key of its rows]), in report order."""
    return [(f.name, f.severity, [f"{r.table}/{r.key}" for r in f.rows])
            for f in report.findings]

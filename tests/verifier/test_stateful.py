"""A hypothesis state machine over the verifier and the credit lifecycle, on both databases.

Random sequences of issue (children too), hold, capture (full or partial), void, revoke, time
advance, hold timeouts, token sweeps and charges. After every step the ledger invariants hold
and each token's spent, held and remaining equal a plain-Python model of what should be.
"""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import Engine

from mcpbill_cli.errors import BillingError
from mcpbill_cli.keys import KeyRing, KeySource
from mcpbill_cli.ledger.credit import IssuedToken, revoke, show, sweep, tenant_balance
from mcpbill_cli.ledger.engine import reading, writing
from mcpbill_cli.money import format_usd
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.verifier import Hold, Verifier

from .billing_support import USDC, FakeClock, fund, mint
from .invariants import assert_ledger_invariants

TIMEOUT = 300
LEEWAY = 30
FUNDS = 1_000 * USDC
MAX_TOKENS = 6
FIXED = {"search": 10_000, "translate": 50_000, "status": 0}
PER_UNIT, MAX_PRICE = 10, 500_000  # summarize: 0.00001 per unit, at most 0.50
TOOLS = [*FIXED, "summarize", "summarize"]  # twice: per-unit holds are partially captured
SCOPES: list[list[str] | None] = [None, None, None, ["search", "status", "summarize"],
                                  ["summarize", "translate"]]
LIMITS = [30_000, 100_000, 600_000]

RUN = settings(max_examples=15, stateful_step_count=30, deadline=None, database=None,
               suppress_health_check=[HealthCheck.too_slow])


def price_of(tool: str, units: int | None) -> int:
    if tool in FIXED:
        return FIXED[tool]
    return MAX_PRICE if units is None else min(units * PER_UNIT, MAX_PRICE)


@dataclass(eq=False)
class TokenModel:
    issued: IssuedToken
    parent: TokenModel | None
    scope: list[str]
    expires_at: datetime
    available: int
    spent: int = 0
    revoked: bool = False

    @property
    def jti(self) -> str:
        return self.issued.claims.jti

    def allows(self, tool: str) -> bool:
        return "*" in self.scope or tool in self.scope

    def active(self, now: datetime) -> bool:
        return not self.revoked and self.expires_at > now


@dataclass(eq=False)
class HoldModel:
    hold: Hold
    token: TokenModel
    tool: str
    amount: int
    timeout_at: datetime
    status: str = "held"
    receipt: str | None = field(default=None, repr=False)


class LedgerMachine(RuleBasedStateMachine):
    """Subclassed per backend by :func:`machine_on` with the ledger, keys and pricing."""

    engine: Engine
    ring: KeyRing
    keys: KeySource
    pricing: PricingTable
    epoch: list[datetime]

    def __init__(self) -> None:
        super().__init__()
        engine = self.engine
        # Each example starts days after the last one, so earlier holds and tokens are
        # long expired and swept here; the ledger is shared, the tenant is new.
        self.epoch[0] += timedelta(days=3)
        self.clock = FakeClock(self.epoch[0])
        self.verifier = Verifier(keys=self.keys, pricing=self.pricing, engine=engine, leeway=LEEWAY,
                                 hold_timeout=TIMEOUT, clock=self.clock)
        while self.verifier.sweep_expired():
            pass
        self.tenant = f"t-{uuid.uuid4().hex[:12]}"
        fund(engine, self.tenant, FUNDS, now=self.clock())
        self.tenant_available = FUNDS
        self.tokens: list[TokenModel] = []
        self.holds: list[HoldModel] = []
        self.calls = itertools.count()  # each call its own arguments: none is a retry

    # --- helpers ------------------------------------------------------------------------

    def refused(self, code: str, call: Any) -> BillingError:
        try:
            call()
        except BillingError as exc:
            assert exc.code == code, (code, exc.to_dict())
            event(f"refused {code}")
            return exc
        raise AssertionError(f"expected {code}")

    def expected_debit(self, tok: TokenModel, tool: str, amount: int) -> str:
        """The verifier's answer to a hold or charge, expiring stale holds as it does."""
        now = self.clock()
        if tok.expires_at <= now - timedelta(seconds=LEEWAY):
            return "INVALID_CREDIT_TOKEN"
        if not tok.allows(tool):
            return "SCOPE_DENIED"
        if tok.revoked:
            return "TOKEN_REVOKED"
        if tok.available >= amount:
            return "ok"
        stale = [h for h in self.holds
                 if h.token is tok and h.status == "held" and h.timeout_at <= now]
        for h in stale:
            self.expire(h)
            event("lazy expiry")
        return "ok" if stale and tok.available >= amount else "BUDGET_EXCEEDED"

    def expire(self, h: HoldModel) -> None:
        h.status = "expired"
        h.token.available += h.amount

    def release(self, tok: TokenModel, now: datetime) -> int:
        amount, tok.available = tok.available, 0
        if tok.parent is not None and tok.parent.active(now):
            tok.parent.available += amount
        else:
            self.tenant_available += amount
        return amount

    def descendants(self, tok: TokenModel) -> list[TokenModel]:
        found, frontier = [], [tok]
        while frontier:
            frontier = [t for t in self.tokens if t.parent in frontier]
            found.extend(frontier)
        return found

    # --- rules --------------------------------------------------------------------------

    @initialize(limit=st.sampled_from(LIMITS), ttl=st.sampled_from([600, 3600]),
                scope=st.sampled_from(SCOPES))
    def first_token(self, limit: int, ttl: int, scope: list[str] | None) -> None:
        self.issue_token(limit, ttl, scope)

    @precondition(lambda self: len(self.tokens) < MAX_TOKENS)
    @rule(limit=st.sampled_from(LIMITS), ttl=st.sampled_from([600, 3600]),
          scope=st.sampled_from(SCOPES))
    def issue_token(self, limit: int, ttl: int, scope: list[str] | None) -> None:
        now = self.clock()
        issued = mint(self.engine, self.ring, now=now, tenant=self.tenant, limit=limit, ttl=ttl,
                      scope=scope)
        self.tenant_available -= limit
        self.tokens.append(TokenModel(issued, None, scope or ["*"],
                                      now + timedelta(seconds=ttl), limit))

    @precondition(lambda self: 0 < len(self.tokens) < MAX_TOKENS)
    @rule(pick=st.integers(0, 99), limit=st.sampled_from([10_000, 20_000, 50_000]),
          ttl=st.sampled_from([300, 3600]))
    def issue_child(self, pick: int, limit: int, ttl: int) -> None:
        parent = self.tokens[pick % len(self.tokens)]
        now = self.clock()
        issue = lambda: mint(self.engine, self.ring, now=now, tenant=self.tenant,  # noqa: E731
                             agent="sub-agent", limit=limit, ttl=ttl, parent=parent.jti)
        if not parent.active(now):
            self.refused("INVALID_INPUT", issue)
        elif parent.available < limit:
            self.refused("INSUFFICIENT_FUNDS", issue)
        else:
            child = issue()
            parent.available -= limit
            expires = min(now + timedelta(seconds=ttl), parent.expires_at)
            assert child.claims.expires_at == expires
            self.tokens.append(TokenModel(child, parent, parent.scope, expires, limit))
            event("child issued")

    @precondition(lambda self: self.tokens)
    @rule(pick=st.integers(0, 99), tool=st.sampled_from(TOOLS),
          units=st.sampled_from([None, 1_000, 5_000]))
    def hold(self, pick: int, tool: str, units: int | None) -> None:
        tok = self.tokens[pick % len(self.tokens)]
        amount = price_of(tool, units)
        expected = self.expected_debit(tok, tool, amount)
        call = lambda: self.verifier.hold(tok.issued.token, tool,  # noqa: E731
                                          args={"n": next(self.calls)}, max_units=units)
        if expected != "ok":
            self.check_refusal(expected, call, tok)
            return
        held = call()
        event("hold")
        assert held.amount == amount
        tok.available -= amount
        self.holds.append(HoldModel(held, tok, tool, amount,
                                    self.clock() + timedelta(seconds=TIMEOUT)))

    @precondition(lambda self: self.tokens)
    @rule(pick=st.integers(0, 99), tool=st.sampled_from(TOOLS),
          units=st.sampled_from([None, 100, 2_500]))
    def charge(self, pick: int, tool: str, units: int | None) -> None:
        tok = self.tokens[pick % len(self.tokens)]
        amount = price_of(tool, units)
        expected = self.expected_debit(tok, tool, amount)
        call = lambda: self.verifier.charge(tok.issued.token, tool,  # noqa: E731
                                            args={"n": next(self.calls)}, units=units)
        if expected != "ok":
            self.check_refusal(expected, call, tok)
            return
        receipt = call()
        event("charge")
        tok.available -= amount
        tok.spent += amount
        assert (receipt.amount, receipt.remaining) == (amount, tok.available)

    def check_refusal(self, code: str, call: Any, tok: TokenModel) -> None:
        refusal = self.refused(code, call)
        if code == "BUDGET_EXCEEDED":
            assert refusal.details["remainingUsd"] == format_usd(tok.available)

    @precondition(lambda self: self.holds)
    @rule(pick=st.integers(0, 99), units=st.sampled_from([None, 0, 150, 1_000, 60_000]))
    def capture(self, pick: int, units: int | None) -> None:
        h = self.holds[pick % len(self.holds)]
        capture = lambda: self.verifier.capture(h.hold, units=units)  # noqa: E731
        if h.status == "captured":
            assert capture().jws == h.receipt
        elif h.status == "held" and self.clock() < h.timeout_at:
            posted = h.amount if units is None else min(price_of(h.tool, units), h.amount)
            receipt = capture()
            event("capture" if posted == h.amount else "partial capture")
            h.status, h.receipt = "captured", receipt.jws
            h.token.spent += posted
            h.token.available += h.amount - posted
            assert (receipt.amount, receipt.remaining) == (posted, h.token.available)
        else:
            self.refused("HOLD_NOT_ACTIVE", capture)
            if h.status == "held":  # timed out: the refused capture releases it at once
                self.expire(h)
                event("capture after timeout")

    @precondition(lambda self: self.holds)
    @rule(pick=st.integers(0, 99))
    def void(self, pick: int) -> None:
        h = self.holds[pick % len(self.holds)]
        if h.status in ("voided", "expired"):
            self.verifier.void(h.hold)  # a no-op: nothing was billed and nothing moves
        elif h.status == "held":
            self.verifier.void(h.hold)
            timed_out = self.clock() >= h.timeout_at
            h.status = "expired" if timed_out else "voided"
            h.token.available += h.amount
            event("void after timeout" if timed_out else "void")
        else:
            self.refused("HOLD_NOT_ACTIVE", lambda: self.verifier.void(h.hold))

    # Keep one token usable, or most of a sequence is refusals after an early revocation.
    @precondition(lambda self: sum(t.active(self.clock()) for t in self.tokens) > 1)
    @rule(pick=st.integers(0, 99))
    def revoke_token(self, pick: int) -> None:
        tok = self.tokens[pick % len(self.tokens)]
        plan = [tok, *self.descendants(tok)]
        now = self.clock()
        for t in plan:
            t.revoked = True
        expected = {t.jti: self.release(t, now) for t in reversed(plan)}
        with writing(self.engine) as conn:
            outcome = revoke(conn, [tok.jti], reason="stateful", clock=lambda: now)
        assert {r.jti: r.released for r in outcome} == expected
        event(f"revoke {len(plan)} token(s)")

    @precondition(lambda self: self.tokens)
    @rule(seconds=st.sampled_from([1, 29, 30, 31, 299, 300, 301, 1800, 3600]))
    def advance(self, seconds: int) -> None:
        self.clock.advance(seconds)

    @precondition(lambda self: any(h.status == "held" for h in self.holds))
    @rule()
    def sweep_holds(self) -> None:
        now = self.clock()
        stale = [h for h in self.holds if h.status == "held" and h.timeout_at <= now]
        assert self.verifier.sweep_expired() == len(stale)
        event(f"sweep expired {min(len(stale), 2)}+ hold(s)")
        for h in stale:
            self.expire(h)

    @precondition(lambda self: any(t.revoked or t.expires_at <= self.clock()
                                   for t in self.tokens))
    @rule()
    def sweep_tokens(self) -> None:
        now = self.clock()
        for h in self.holds:
            if h.status == "held" and h.timeout_at <= now:
                self.expire(h)
        done = [t for t in self.tokens if t.available > 0
                and (t.revoked or t.expires_at <= now)]
        expected = {t.jti: self.release(t, now) for t in done}
        with writing(self.engine) as conn:
            released = dict(sweep(conn, now=now))
        mine = {t.jti for t in self.tokens}
        assert {jti: amount for jti, amount in released.items() if jti in mine} == expected
        event(f"sweep released {min(sum(map(bool, expected.values())), 2)}+ token(s)")

    # --- after every step ---------------------------------------------------------------

    @invariant()
    def ledger_matches_the_model(self) -> None:
        with reading(self.engine) as conn:
            assert_ledger_invariants(conn)
            for tok in self.tokens:
                view = show(conn, tok.jti, now=self.clock())
                held = sum(h.amount for h in self.holds
                           if h.token is tok and h.status == "held")
                assert (view.spent, view.held, view.remaining) == (
                    tok.spent, held, tok.available), tok.jti
                assert tok.spent <= tok.issued.claims.limit
                assert view.status == ("revoked" if tok.revoked else "expired"
                                       if tok.expires_at <= self.clock() else "active")
            assert tenant_balance(conn, self.tenant).available == self.tenant_available


def machine_on(engine: Engine, ring: KeyRing, keys: KeySource,
               pricing: PricingTable) -> type[LedgerMachine]:
    attributes = {"engine": engine, "ring": ring, "keys": keys, "pricing": pricing,
                  "epoch": [FakeClock().now]}
    return type(f"LedgerMachineOn{engine.dialect.name.title()}", (LedgerMachine,), attributes)


@pytest.mark.slow
def test_random_call_sequences_keep_the_ledger_exact(
        engine: Engine, ring: KeyRing, keys_dir: Path, pricing: PricingTable) -> None:
    machine = machine_on(engine, ring, KeySource(directory=keys_dir), pricing)
    run_state_machine_as_test(machine, settings=RUN)

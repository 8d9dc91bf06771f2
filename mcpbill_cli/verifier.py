"""The embeddable verifier: what an MCP server calls on every tool call.

    quote = verifier.preflight(token, "search")             # may raise BillingError
    with verifier.call(token, "search", args=args) as call: # hold; void if the block raises
        result = run_the_tool(args)
    receipt = call.receipt                                   # captured and signed

An agent can never spend more than its token allows (the ledger's guarded debit), is never
billed twice for one call (idempotency keys), is never billed for a call that failed (void),
and always gets a receipt or a structured refusal (:class:`~mcpbill_cli.errors.BillingError`):
for any token and any argument, nothing else leaves this module.

Idempotency (DESIGN.md "The verifier's call path"): a call's key is the caller's, else one
derived from the token, the tool and the canonical arguments, alive for the tool's dedupe window
(pricing.toml ``dedupe_window``, default 10 s, counted from the end of the call; ``"0s"``: every
call is new). Keys belong to the tenant. A repeat of a captured call is a replay: the original
receipt (and the kept result), never a second run, and only for a token that still passes
signature, expiry and revocation. A repeat of a call still running is CALL_IN_PROGRESS; of a
failed call, CALL_FAILED with a given key, a new call with a derived one.

This module imports neither typer nor rich nor web3, never prints and never exits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

from mcpbill_cli import offloop, refunding
from mcpbill_cli.budgets import Budget, TokenTerms, window_key
from mcpbill_cli.clock import Clock, aware, rfc3339
from mcpbill_cli.config import Settings, load_settings
from mcpbill_cli.errors import (
    BillingError,
    BudgetExceeded,
    CallFailed,
    CallInProgress,
    DuplicateCall,
    HoldNotActive,
    IdempotencyConflict,
    InvalidCreditToken,
    InvalidInput,
    LedgerUnavailable,
    RateLimited,
    ScopeDenied,
    StatelessVerifier,
    TokenRevoked,
)
from mcpbill_cli.keeper import HoldKeeper
from mcpbill_cli.keys import KeySource, VerificationKey
from mcpbill_cli.ledger import alerts, audit, calls, rates, seals, topups
from mcpbill_cli.ledger import budgets as ledger_budgets
from mcpbill_cli.ledger.checkpoint import BACKSTOP_PAGES, WalCheckpointer, background_checkpointer
from mcpbill_cli.ledger.clock import DatabaseClock, ledger_clock
from mcpbill_cli.ledger.credit import expire_holds
from mcpbill_cli.ledger.engine import (
    LedgerBusy,
    Shelf,
    at_once,
    check_schema,
    make_engine,
    reading,
    writing,
)
from mcpbill_cli.ledger.ops import token_account
from mcpbill_cli.money import format_usd, parse_usd, whole_micro
from mcpbill_cli.pricing import (
    Price,
    PricingSource,
    PricingTable,
    dedupe_window,
    fallback_tools,
    free_tools,
    rate_limits,
)
from mcpbill_cli.pricing import budgets as table_budgets
from mcpbill_cli.pricing import quote as price_quote
from mcpbill_cli.ratelimits import WINDOW_NAMES, Counter, counters
from mcpbill_cli.ratestore import RedisCounters
from mcpbill_cli.receipts import (
    Receipt,
    RefundReceipt,
    read_receipt,
    sign_receipt,
    verify_receipt,
)
from mcpbill_cli.scope import in_scope
from mcpbill_cli.sealer import Sealer
from mcpbill_cli.tokens import Audience, Claims, decode_token
from mcpbill_cli.webhooks import Deliverer

if TYPE_CHECKING:
    from mcpbill_cli.metrics import PrometheusMetrics
    from mcpbill_cli.tracing import Tracing

__all__ = ["BilledCall", "Hold", "Quote", "Verifier"]

_T = TypeVar("_T")
_Opened = TypeVar("_Opened", calls.Opened, Receipt)

logger = logging.getLogger("mcpbill")

TOKEN_CACHE_SIZE = 4096
# Refusals that stay true of a token whatever the time (until the keys change): remembered for
# tokens up to this many characters, so the same garbage again costs a lookup, not a parse and
# a signature check (a refused Ed25519 token: about 200 us of CPU through PyJWT, measured).
LASTING_REFUSALS = frozenset({"malformed", "unknown_key", "algorithm_not_allowed",
                              "bad_signature", "wrong_audience", "wrong_issuer"})
REMEMBERED_TOKEN_LENGTH = 4096
DEFAULT_RESULT_CAP = 256 * 1024  # bytes of a tool's result kept for replays
MAX_KEY_LENGTH = 200  # calls.idempotency_key
MAX_TOOL_LENGTH = 200
RETRY_AFTER_MS = 1000  # what CALL_IN_PROGRESS suggests
# Where the calls of this context come from (an MCP server sets the client's address), for
# the counts of refusals that name no valid token.
CALL_SOURCE: ContextVar[str] = ContextVar("mcpbill_call_source", default="")
OPEN_ATTEMPTS = 4  # a key freed or rolled back under us: try the call again this often


@dataclass(frozen=True)
class Quote:
    """What a call would cost now, and what the token has left (``None`` when stateless)."""

    tool: str
    jti: str
    tenant: str
    agent: str
    price: Price
    remaining: int | None

    @property
    def amount(self) -> int:
        return self.price.amount

    def to_dict(self) -> dict[str, Any]:
        return {"tool": self.tool, "jti": self.jti, "priceUsd": format_usd(self.amount),
                "remainingUsd": None if self.remaining is None else format_usd(self.remaining),
                "asset": "USDC", "rule": self.price.rule, "pricingVersion": self.price.version}


@dataclass(frozen=True)
class Hold:
    """A reservation of ``amount`` on the token, captured or voided once the tool has run.

    ``replayed`` is set when this call was made and captured already (its idempotency key, or
    the same call within the tool's dedupe window): do not run the tool again; ``result`` is
    the result kept from that run (JSON text, ``None`` when none was kept), and capture returns
    the original receipt without billing anything.
    """

    id: str
    jti: str
    tenant: str
    agent: str
    tool: str
    amount: int
    idempotency_key: str
    timeout_at: datetime | None
    price: Price
    replayed: Receipt | None = None
    result: str | None = None
    terms: TokenTerms = TokenTerms()  # the token's caps and auto top-up, from its claims


@dataclass
class BilledCall:
    """The handle a ``with verifier.call(...)`` block gets: report units, read the receipt."""

    hold: Hold
    units: int | None = None
    receipt: Receipt | None = field(default=None, init=False)

    def report_units(self, units: int) -> None:
        """For per-unit tools: how many units (tokens, rows...) this call used. A count the
        price cannot take is INVALID_INPUT here, inside the block, so the hold is voided."""
        self.hold.price.for_units(units)
        self.units = units


class Verifier:
    """Preflight, hold, capture, void and charge tool calls against credit tokens.

    Build it with :meth:`from_settings` (the CLI's home and ledger), explicitly, or with
    :meth:`stateless` (a JWKS and a revocation list, no ledger: preflight only).
    Thread-safe; one instance serves a whole server. ``result_cap`` bounds, in bytes, the tool
    result kept for replays (larger ones replay as DUPLICATE_CALL with the receipt).

    A verifier built from a ``db_url`` runs a background writer (:mod:`mcpbill_cli.sealer`)
    that seals the audit trail and writes refusal counts every second; one given an ``engine``
    leaves that to its owner: call :meth:`seal` (or :meth:`start_sealer`), and :meth:`close`.
    With ``deliver_webhooks`` it also delivers the ledger's alert webhooks from a thread
    (:mod:`mcpbill_cli.webhooks`); a call never waits for a delivery either way.
    With ``metrics`` (``True``, or a :class:`~mcpbill_cli.metrics.PrometheusMetrics` to share)
    the call path records Prometheus metrics in :attr:`metrics` (see :mod:`mcpbill_cli.metrics`);
    without, it neither imports prometheus-client nor calls anything for them. With ``tracing``
    (``True``, or a :class:`~mcpbill_cli.tracing.Tracing`) the MCP integrations make an
    OpenTelemetry span per billed call (:mod:`mcpbill_cli.tracing`).

    Every time a call depends on comes from ``clock``; without one, from the ledger's clock
    (:func:`~mcpbill_cli.ledger.clock.ledger_clock`): PostgreSQL's server clock, so that
    replicas whose own clocks disagree give one answer, or this host's for SQLite.
    """

    def __init__(
        self, *, keys: KeySource, pricing: PricingSource | PricingTable | Path | str,
        engine: Engine | None = None, db_url: str | None = None,
        audience: Audience = "mcpbill", issuer: str | None = "mcpbill", leeway: int = 30,
        hold_timeout: int = 300, demo: bool = False, revoked: dict[str, int] | None = None,
        clock: Clock | None = None, result_cap: int = DEFAULT_RESULT_CAP,
        limits_storage: str | None = None, deliver_webhooks: bool = False,
        metrics: PrometheusMetrics | bool | None = None,
        tracing: Tracing | bool | None = None,
    ) -> None:
        self._checkpointer: WalCheckpointer | None = None
        self._stopping: list[Callable[[], None]] = []  # see stop_on_close
        self._closed = False
        # Read first: a pricing file that is bad refuses the verifier before it opens anything.
        self.pricing = pricing if isinstance(pricing, PricingSource) else PricingSource(pricing)
        owned = engine is None and db_url is not None
        if engine is None and db_url is not None:
            engine = make_engine(db_url, wal_autocheckpoint=BACKSTOP_PAGES, durable=not demo,
                                 pre_ping=False)  # a round trip per call saved
            try:
                check_schema(engine)
            except BaseException:
                engine.dispose()
                raise
            self._checkpointer = background_checkpointer(engine)  # no commit checkpoints
        self.engine = engine
        # The paid call path's transactions, on connections kept open between them; an engine
        # given by its owner is the owner's to hand out (its pool, its connections).
        self._shelf = Shelf(engine) if owned and engine is not None else None
        self.keys = keys
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway
        self.hold_timeout = hold_timeout
        self.demo = demo
        self.network = "mcpbill:demo" if demo else "mcpbill:ledger"
        self._revoked = revoked
        self._clock = clock or ledger_clock(engine)
        self.result_cap = result_cap
        # Where rate limits count: Redis when a URL is given, else the ledger (in the hold).
        self._rate_store = RedisCounters(limits_storage) if limits_storage else None
        self._token_cache: dict[str, Claims] = {}
        self._refused_tokens: dict[str, tuple[str, str]] = {}  # token -> (message, reason)
        self._cache_generation = keys.generation
        self._tables: tuple[PricingTable, PricingTable] | None = None  # (the source's, ours)
        self._keeper = HoldKeeper(self._extend, hold_timeout=hold_timeout, clock=self._clock)
        # The async twins' steps run on the caller's loop on a SQLite ledger (see _step).
        self._steps_on_loop = engine is None or engine.dialect.name == "sqlite"
        signs = keys.signer() is not None  # a key ring, not a JWKS: it can sign seals
        self._sealer = (None if engine is None
                        else Sealer(engine, self._sign_seal if signs else None, self._clock))
        if owned:
            self.start_sealer()
        # Alert webhooks from a thread of this process (any other deliverer may run beside it).
        self._deliverer = (Deliverer(engine, self._clock)
                           if deliver_webhooks and engine is not None else None)
        if self._deliverer is not None:
            self._deliverer.start()
        self.metrics: PrometheusMetrics | None = None
        if metrics:
            self.enable_metrics(None if metrics is True else metrics)
        self.tracing: Tracing | None = None
        if tracing:
            self.enable_tracing(None if tracing is True else tracing)

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **overrides: Any) -> Verifier:
        """A verifier on the CLI's home: its ledger, keys, pricing file and mode."""
        s = settings or load_settings()
        options: dict[str, Any] = {
            "db_url": s.db_url, "keys": KeySource(directory=s.keys_dir),
            "pricing": s.pricing_path, "audience": _audience(s), "issuer": s.issuer,
            "leeway": s.leeway, "hold_timeout": s.hold_timeout, "demo": s.demo,
            "result_cap": s.result_cap, "limits_storage": s.limits_storage,
            "deliver_webhooks": s.deliver_webhooks}
        return cls(**{**options, **overrides})

    @classmethod
    def stateless(cls, *, jwks: Path | str | dict[str, Any],
                  pricing: PricingSource | PricingTable | Path | str,
                  revocations: Path | str | dict[str, Any] | None = None,
                  **options: Any) -> Verifier:
        """A ledger-less verifier: preflight checks token, scope and price only."""
        document = jwks if isinstance(jwks, dict) else json.loads(Path(jwks).read_text())
        revoked_doc = (revocations if isinstance(revocations, dict) or revocations is None
                       else json.loads(Path(revocations).read_text()))
        revoked = {r["jti"]: _revoked_until(r) for r in (revoked_doc or {}).get("revoked", [])}
        return cls(keys=KeySource.from_jwks(document), pricing=pricing, revoked=revoked,
                   **options)

    def enable_metrics(self, metrics: PrometheusMetrics | None = None) -> PrometheusMetrics:
        """Record this verifier's calls in ``metrics`` (a new registry when ``None``), with
        the seal lag of its ledger; returns them. Call it before serving calls.

        Refusals keep the ``tool`` label only of the tools the pricing table names."""
        if metrics is None:
            from mcpbill_cli.metrics import PrometheusMetrics

            metrics = PrometheusMetrics()
        metrics.name_tools(lambda tool: self.pricing.current().names(tool))
        if self.engine is not None:
            metrics.watch_seal_lag(self.engine, self._clock)
        if isinstance(self._clock, DatabaseClock):
            metrics.watch_clock(self._clock.error_bound)
        self.metrics = metrics
        return metrics

    def enable_tracing(self, tracing: Tracing | None = None) -> Tracing:
        """Trace this verifier's MCP calls with ``tracing`` (the global tracer provider's
        when ``None``); returns it."""
        if tracing is None:
            from mcpbill_cli.tracing import Tracing

            tracing = Tracing()
        self.tracing = tracing
        return tracing

    def seal(self) -> int:
        """Seal the audit trail and write the refusal counts now; returns the events sealed
        (0 without a signing key, or while another sealer has its turn)."""
        return 0 if self._sealer is None else self._sealer.turn()

    def now(self) -> datetime:
        """The time this verifier decides by: its ``clock``, or its ledger's."""
        return self._clock()

    def clock_error_bound(self) -> float | None:
        """How far, in seconds, this verifier's time may now be from its ledger's server
        clock (see :class:`~mcpbill_cli.ledger.clock.DatabaseClock`); ``None`` when its clock
        is not the server's (SQLite, a ``clock`` given, no ledger) or has not read it yet."""
        clock = self._clock
        return clock.error_bound() if isinstance(clock, DatabaseClock) else None

    def start_sealer(self) -> None:
        """Run :meth:`seal` every second from a thread of this verifier's (until close)."""
        if self._sealer is not None:
            self._sealer.start()

    def stop_on_close(self, stop: Callable[[], None]) -> None:
        """Have :meth:`close` call ``stop`` first: for a thread another part runs on this
        verifier (an x402 acceptor's recovery), which must end before the ledger is let go,
        and which a server that closes only its verifier would otherwise leave running."""
        self._stopping.append(stop)

    def close(self) -> None:
        """Stop every thread this verifier runs or :meth:`stop_on_close` was given, seal and
        write the last counts, and let the ledger go; once (a second call does nothing)."""
        if self._closed:
            return
        self._closed = True
        for stop in self._stopping:
            stop()
        if self._deliverer is not None:
            self._deliverer.stop()
        if self._sealer is not None:
            self._sealer.close()
        self._keeper.close()
        if self._checkpointer is not None:
            self._checkpointer.close()
        if self._shelf is not None:
            self._shelf.close()
        if self.engine is not None:
            self.engine.dispose()

    # --- the call path --------------------------------------------------------------------------

    def preflight(self, token: str, tool: str, *, args: Any = None,
                  units: int | None = None) -> Quote:
        """Check everything a call needs, moving no money: token, scope, price, balance and
        budget caps, refused as its hold would be (BUDGET_EXCEEDED for the token's limit or a
        daily/monthly cap, with the same details). A read, so advisory under concurrency:
        another call may take the balance or the cap's room before this call's hold, which
        stays the enforcement."""
        with self._refusals_recorded(token, tool, metered=False):
            claims = self._claims(token, tool)
            return self._quote(claims, tool, self._price(claims, tool, units))

    def hold(self, token: str, tool: str, *, args: Any = None,
             idempotency_key: str | None = None, max_units: int | None = None,
             amount: int | None = None, rule: str = "x402") -> Hold:
        """Reserve the call's price (for a per-unit tool: ``max_units`` or its maximum).

        ``amount`` (micro-USDC) holds that instead of the table's price, under price rule
        ``rule``, undiscounted: for a downstream payment whose price comes from elsewhere (an
        x402 challenge). Scope, limit, daily cap, idempotency and audit apply as to any call.
        An uncaptured hold voids itself after ``hold_timeout`` seconds (see :meth:`keep_alive`).
        A :attr:`Hold.replayed` hold is a call made already: do not run the tool again.
        """
        with self._refusals_recorded(token, tool):
            claims, price, call = self._new_call(token, tool, args, idempotency_key, max_units,
                                                 amount=amount, rule=rule)
            return self._metered_hold(self._hold(claims, price, call))

    def begin(self, token: str, tool: str, *, args: Any = None,
              idempotency_key: str | None = None, max_units: int | None = None) -> Hold | Quote:
        """What a server needs before it runs a tool, in one step: the :class:`Quote` of a
        free call (preflighted: nothing to hold), or the :class:`Hold` of a paid one (kept
        alive while the tool runs, see :meth:`keep_alive`; a :attr:`Hold.replayed` one must not
        run the tool again).

        A paid call skips preflight's read: the hold checks the same things as it reserves.
        """
        with self._refusals_recorded(token, tool):
            claims, table, price = self._priced(token, tool, max_units)
            if price.free:
                quoted = self._quote(claims, tool, price)
                if self.metrics is not None:
                    self.metrics.finished(tool, "free")
                return quoted
            hold = self._metered_hold(self._hold(claims, price, self._call(
                claims, tool, table, price, args, idempotency_key, max_units)))
            self.keep_alive(hold)
            return hold

    def keep_alive(self, hold: Hold) -> None:
        """Keep ``hold`` from lapsing until it is captured or voided, however long the tool
        runs (a thread extends it before its timeout; a process that dies stops doing so)."""
        if hold.replayed is None and hold.timeout_at is not None:
            self._keeper.keep(hold.id, hold.timeout_at)

    def capture(self, hold: Hold, *, units: int | None = None,
                settlement: Mapping[str, Any] | None = None, result: str | None = None
                ) -> Receipt:
        """Post a hold (per-unit tools: for ``units``; the rest returns) and sign the receipt.

        ``settlement`` (a downstream payment's on-chain settlement, with at least
        ``transaction`` and ``network``) is signed into the receipt: its ``transaction`` and
        ``network`` become the receipt's, and the whole mapping its ``settlement``. ``result``
        (the tool's result as JSON text) is kept for replays when it fits ``result_cap``.
        A hold that lapsed before its capture is HOLD_NOT_ACTIVE: nothing is billed.
        """
        if hold.replayed is not None:
            return hold.replayed
        # Bad units are INVALID_INPUT before the keeper lets go: the hold stays as it was.
        amount = None if units is None else min(hold.price.for_units(units), hold.amount)
        self._keeper.forget(hold.id)
        kept = result if result is not None and len(result.encode()) <= self.result_cap else None
        now = self._clock()
        with self._refusals_recorded(None, hold.tool, jti=hold.jti, ref=hold.id,
                                     hold_id=hold.id):
            def settle(conn: Connection) -> tuple[calls.Settled, Receipt] | calls.NotActive:
                settled = calls.settle(conn, hold.id, amount=amount, at=now)
                if not isinstance(settled, calls.Settled):
                    return settled
                receipt = self._sign(hold, settled.posted, settled.remaining, now,
                                     f"capture:{hold.id}", settlement)
                calls.record_capture(conn, hold.id, settled, units=units, at=now,
                                     receipt=receipt.jws, result=kept)
                return settled, receipt

            outcome = self._transaction(settle)
            if isinstance(outcome, calls.NotActive):
                return self._not_captured(hold, outcome)
            settled, receipt = outcome
        self._top_up(hold.terms, hold.jti, hold.tenant, settled.remaining)
        if self.metrics is not None:
            self.metrics.captured(hold.tool, receipt.amount, hold.id)
        return receipt

    def void(self, hold: Hold, *, outcome: str = "voided") -> None:
        """Release a hold: the tool failed, nothing is billed.

        ``outcome`` is how the metrics count the call: ``voided``, or ``input_required`` for a
        round of a multi-round call that asked the agent for more (the round that completes is
        billed on a hold of its own). Voiding twice, or a hold that already timed out, is a
        no-op; a captured hold is HOLD_NOT_ACTIVE.
        """
        if hold.replayed is not None:
            return
        if self.metrics is not None:
            self.metrics.voided(hold.tool, hold.id, outcome)
        self._release(hold)

    def _release(self, hold: Hold) -> None:
        """:meth:`void`'s ledger part."""
        self._keeper.forget(hold.id)
        now = self._clock()
        with writing(self._ledger()) as conn:
            stored = calls.stored(conn, call_id=hold.id)
            if stored is not None and stored.status in ("voided", "expired"):
                return
            voided = calls.void(conn, hold.id, at=now, expired=_lapsed(stored, now))
        if isinstance(voided, calls.NotActive):
            raise _not_active(hold, voided)

    def charge(self, token: str, tool: str, *, args: Any = None,
               idempotency_key: str | None = None, units: int | None = None) -> Receipt:
        """Hold and capture in one step, for a call whose price is known up front.

        A repeat of a call charged already returns its original receipt, billing nothing.
        """
        with self._refusals_recorded(token, tool):
            claims, price, call = self._new_call(token, tool, args, idempotency_key, units)
            now = self._clock()

            def charged(conn: Connection) -> Receipt | calls.KeyTaken | calls.Refused:
                debited = calls.debit_charge(conn, call, at=now)
                if not isinstance(debited, calls.Opened):
                    return debited
                receipt = self._sign(call, call.amount, debited.remaining, now,
                                     f"charge:{call.id}")
                return calls.record_charge(conn, call, at=now, receipt=receipt.jws) or receipt

            opened = self._opened(claims, price, call, charged)
            if isinstance(opened, Hold):  # a replay
                self._metered_hold(opened)
                return opened.replayed or self._lost(opened.id)
        self._top_up(claims.terms, claims.jti, claims.tenant, opened.remaining)
        if self.metrics is not None:
            self.metrics.captured(tool, opened.amount)
        return opened

    def charge_paid(self, conn: Connection, claims: Claims, tool: str, price: Price, *,
                    args: Any,
                    idempotency_key: str, settlement: Mapping[str, Any], at: datetime,
                    result: str | None = None) -> Receipt:
        """Charge a call paid for on chain (an accepted x402 payment), inside the caller's
        write transaction ``conn``, on the token ``claims`` names (which holds exactly
        ``price``): the call's row, the charge, the signed receipt with ``settlement`` in it,
        and the kept ``result``. No daily cap applies: the money has moved already.

        ``price`` comes from :meth:`pricing_table` read before the transaction (reading it
        may write the pricing version in a transaction of its own). A refusal raises and the
        caller's rollback leaves the ledger as it was.
        """
        call = calls.NewCall(
            id=calls.new_call_id(), idempotency_key=_checked_key(idempotency_key),
            request_hash=_request_hash(claims.jti, tool, args, None, price.amount),
            jti=claims.jti, tenant=claims.tenant, agent=claims.agent, tool=tool, units=None,
            amount=price.amount, pricing_version=price.version, price_rule=price.rule,
            demo=self.demo)
        debited = calls.debit_charge(conn, call, at=at)
        if isinstance(debited, calls.Refused):
            raise self._refusal(claims, tool, price, debited)
        receipt = self._sign(call, call.amount, debited.remaining, at, f"charge:{call.id}",
                             settlement)
        kept = result if result is not None and len(result.encode()) <= self.result_cap else None
        if calls.record_charge(conn, call, at=at, receipt=receipt.jws, result=kept) is not None:
            raise IdempotencyConflict(f"idempotency key {idempotency_key!r} was used already",
                                      idempotencyKey=idempotency_key)
        return receipt

    @contextmanager
    def call(self, token: str, tool: str, *, args: Any = None,
             idempotency_key: str | None = None, max_units: int | None = None
             ) -> Iterator[BilledCall]:
        """Hold, run the block, capture on success or void on an exception (then re-raise).

        The hold is kept alive while the block runs. A call made already (a replay) never runs
        the block: it raises DUPLICATE_CALL carrying the original receipt (``.receipt``).
        """
        hold = self.hold(token, tool, args=args, idempotency_key=idempotency_key,
                         max_units=max_units)
        billed = BilledCall(_fresh(hold))
        self.keep_alive(hold)
        try:
            yield billed
        except BaseException:
            self.void(billed.hold)
            raise
        try:
            billed.receipt = self.capture(billed.hold, units=billed.units)
        except InvalidInput:  # refused before it wrote: nobody else will void the hold
            self.void(billed.hold)
            raise

    # --- receipts -------------------------------------------------------------------------------

    def receipt_for(self, receipt_id: str | None = None, *, tenant: str | None = None,
                    idempotency_key: str | None = None) -> Receipt | None:
        """The receipt of a captured call (a lost reply), by receipt id or by a tenant's
        idempotency key."""
        with reading(self._ledger()) as conn:
            stored = (calls.stored(conn, call_id=receipt_id) if receipt_id is not None
                      else calls.stored(conn, tenant=tenant, key=idempotency_key))
        if stored is None or stored.receipt is None:
            return None
        return read_receipt(stored.receipt)

    def verify_receipt(self, jws: str) -> Receipt:
        """Check a receipt's signature with this verifier's keys (offline, no ledger): every
        key of its key ring, retired ones too (a receipt outlives its key's use for tokens);
        a JWKS-built verifier's keys as given."""
        return verify_receipt(jws, self.keys.receipt_keys())

    def sweep_expired(self) -> int:
        """Void every hold past its timeout; returns how many. Holds also expire lazily."""
        with writing(self._ledger()) as conn:
            return expire_holds(conn, now=self._clock())

    # --- refunds --------------------------------------------------------------------------------

    def refund(self, receipt_id: str, amount: int | None = None, reason: str | None = None,
               idempotency_key: str | None = None) -> RefundReceipt:
        """Give back ``amount`` micro-USDC (default: all still refundable) of the captured
        call ``receipt_id``: to its token while the token is active, else to its tenant.
        Returns the signed refund receipt. See :func:`mcpbill_cli.refunding.refund`."""
        signer = self.keys.signer()
        if signer is None:
            raise StatelessVerifier("no signing key: refund receipts need the operator's key "
                                    "ring")
        return refunding.refund(self._ledger(), signer, receipt_id, amount=amount,
                                reason=reason, idempotency_key=idempotency_key,
                                network=self.network, clock=self._clock)

    # --- async twins ----------------------------------------------------------------------------

    async def _step(self, step: Callable[[], _T],
                    abandoned: Callable[[_T], object] | None = None) -> _T:
        """``step()`` (a ledger step: a hold, a capture, ...) awaited from an event loop.

        On PostgreSQL it runs on a worker thread (:mod:`mcpbill_cli.offloop`): a step waits on
        the network, and the loop must not. On a SQLite ledger, a file on this machine, it runs
        right here on the loop's thread, unless another writer holds the write lock: the step's
        first transaction does not wait for it (:func:`~mcpbill_cli.ledger.engine.at_once`)
        and the step, having written nothing, runs on a worker thread instead, where it waits.
        So the loop never stalls behind another writer, and an uncontended step skips the two
        thread switches of a trip to a worker and back, which cost most where the machine is
        busiest. Measured with ``mcpbill proxy`` in front of the reference server on 2 cores
        (proxy, upstream and agent on them), each way alternated in one run: 2,000+ paid calls
        over HTTP took 7.84 and 8.27 ms each, 3.41 and 3.63 ms of the proxy's CPU, against 8.21
        and 9.42 ms, 3.68 and 4.22 ms on worker threads. ``bench/proxy.py`` (2 runs) put the
        billing share of the proxy's CPU 0.1-0.4 ms lower and a paid call 0.03-0.22 ms faster
        (0.93 ms over HTTP, 1.62 over stdio, in a trial on a busier machine). Run here, a step
        cannot be cancelled half way: there is no await in it."""
        if self._steps_on_loop:
            try:
                with at_once():
                    return step()
            except LedgerBusy:
                pass  # nothing was written: it runs again where it may wait
        return await offloop.run(step, abandoned)

    async def apreflight(self, token: str, tool: str, **kw: Any) -> Quote:
        return await self._step(lambda: self.preflight(token, tool, **kw))

    async def ahold(self, token: str, tool: str, **kw: Any) -> Hold:
        return await self._step(lambda: self.hold(token, tool, **kw), self._unclaimed)

    async def abegin(self, token: str, tool: str, **kw: Any) -> Hold | Quote:
        return await self._step(lambda: self.begin(token, tool, **kw), self._unclaimed)

    def _unclaimed(self, opened: Hold | Quote) -> None:
        """A hold taken for a caller cancelled meanwhile (an anyio shield does not hold back a
        plain ``task.cancel()``): nobody will capture or void it, so it is voided now rather
        than left held until it lapses."""
        if not isinstance(opened, Hold):
            return
        try:
            self.void(opened)
        except BillingError as error:  # resolved already: nothing is held
            logger.warning("void of the unclaimed hold %s: %s", opened.id, error.code)

    async def acapture(self, hold: Hold, *, units: int | None = None,
                       result: str | None = None) -> Receipt:
        return await self._step(lambda: self.capture(hold, units=units, result=result))

    async def avoid(self, hold: Hold, *, outcome: str = "voided") -> None:
        # Always on a worker: a void counts in the metrics before it writes (and is off the
        # paid path: a call that failed, or was cancelled).
        await offloop.run(lambda: self.void(hold, outcome=outcome))

    async def acharge(self, token: str, tool: str, **kw: Any) -> Receipt:
        return await self._step(lambda: self.charge(token, tool, **kw))

    @asynccontextmanager
    async def acall(self, token: str, tool: str, **kw: Any) -> AsyncIterator[BilledCall]:
        """The async form of :meth:`call`."""
        hold = await self.ahold(token, tool, **kw)
        billed = BilledCall(_fresh(hold))
        self.keep_alive(hold)
        try:
            yield billed
        except BaseException:
            await self.avoid(billed.hold)
            raise
        try:
            billed.receipt = await self.acapture(billed.hold, units=billed.units)
        except InvalidInput:  # refused before it wrote: nobody else will void the hold
            await self.avoid(billed.hold)
            raise

    # --- internals ------------------------------------------------------------------------------

    def _writing(self) -> AbstractContextManager[Connection]:
        """A write transaction of the paid call path: on a shelved connection when this
        verifier opened its ledger itself."""
        if self._shelf is not None:
            return self._shelf.writing()
        return writing(self._ledger())

    @property
    def rate_store(self) -> RedisCounters | None:
        """Where rate limits count: Redis, or ``None`` for the ledger (in the transaction
        that opens a call)."""
        return self._rate_store

    def _ledger(self) -> Engine:
        if self.engine is None:
            raise StatelessVerifier(
                "this verifier has no ledger (built from a JWKS): it can run preflight only; "
                "build it with Verifier.from_settings() or a db_url to hold and charge")
        return self.engine

    def _claims(self, token: str, tool: str) -> Claims:
        claims = self._verified(token)  # first: a refusal then names a verified token or none
        _check_tool(tool)
        if self._revoked is not None and claims.jti in self._revoked:
            raise TokenRevoked(f"token {claims.jti} has been revoked", jti=claims.jti)
        if not in_scope(claims.scope, tool):
            raise ScopeDenied(f"tool {tool!r} is outside this token's scope "
                              f"{list(claims.scope)}", tool=tool, scope=list(claims.scope))
        return claims

    def _verified(self, token: str) -> Claims:
        """Decode once per distinct token; the expiry is rechecked on every call."""
        if not isinstance(token, str):
            raise InvalidCreditToken("a credit token is a string (a JWT)", reason="malformed")
        keys = self.keys.verification_keys()  # picks up a rotation or a lapsed key
        if self.keys.generation != self._cache_generation:
            self._token_cache, self._refused_tokens = {}, {}
            self._cache_generation = self.keys.generation
        claims = self._token_cache.get(token)
        if claims is None:
            claims = self._decoded(token, keys)
            if len(self._token_cache) >= TOKEN_CACHE_SIZE:
                self._token_cache = {}
            self._token_cache[token] = claims
        elif claims.expires_at.timestamp() <= self._clock().timestamp() - self.leeway:
            raise InvalidCreditToken("token has expired", reason="expired")
        return claims

    def _decoded(self, token: str, keys: dict[str, VerificationKey]) -> Claims:
        """:func:`decode_token`, with the lasting refusals of tokens seen before remembered:
        anyone can send the same garbage again and again, as fast as they like."""
        refused = self._refused_tokens.get(token)
        if refused is not None:
            raise InvalidCreditToken(refused[0], reason=refused[1])
        try:
            return decode_token(token, keys, audience=self.audience, issuer=self.issuer,
                                leeway=self.leeway, now=self._clock())
        except InvalidCreditToken as exc:
            if exc.reason in LASTING_REFUSALS and len(token) <= REMEMBERED_TOKEN_LENGTH:
                if len(self._refused_tokens) >= TOKEN_CACHE_SIZE:
                    self._refused_tokens = {}
                self._refused_tokens[token] = (exc.message, exc.reason)
            raise

    def claims_of(self, token: str) -> Claims:
        """The claims of a credit token that verifies (signature, audience, expiry) with this
        verifier's keys; INVALID_CREDIT_TOKEN otherwise. Revocation and budget are not read."""
        return self._verified(token)

    @property
    def own_audience(self) -> str | None:
        """The audience of tokens this verifier's side mints itself: the first it accepts."""
        accepted = self.audience
        if accepted is None or isinstance(accepted, str):
            return accepted
        return next(iter(accepted), None)

    def accepts_audience(self, audience: str) -> bool:
        """Whether tokens issued to ``audience`` pass this verifier's audience check."""
        accepted = self.audience
        if accepted is None or isinstance(accepted, str):
            return accepted in (None, audience)
        return audience in accepted

    def pricing_table(self) -> PricingTable:
        """The pricing table in force, under the version receipts name: the file's own,
        unless the file was edited without a version bump and the ledger already charged
        other prices under it (then the ledger's next free number)."""
        return self._table()

    def _table(self) -> PricingTable:
        """See :meth:`pricing_table`: recorded in the ledger once per table read."""
        source = self.pricing.current()
        known = self._tables
        if known is not None and known[0] is source:
            return known[1]
        table = source
        if self.engine is not None:
            with writing(self.engine) as conn:
                version = calls.record_pricing_version(conn, source.to_document(),
                                                       at=self._clock())
            if version != source.version:
                logger.warning("pricing table version %d has other prices than the version "
                               "%d the ledger charged with; charging it as version %d",
                               source.version, source.version, version)
                table = replace(source, version=version)
        self._tables = (source, table)
        return table

    def _price(self, claims: Claims, tool: str, units: int | None) -> Price:
        return price_quote(self._table(), tool, tenant=claims.tenant, units=units)

    def _remaining(self, conn: Connection, claims: Claims) -> int:
        found = calls.available(conn, claims.jti, now=self._clock())
        if found is None:
            raise InvalidCreditToken(f"token {claims.jti} is not in this ledger",
                                     reason="unknown_token")
        remaining, closed = found
        if closed:
            raise TokenRevoked(f"token {claims.jti} has been revoked", jti=claims.jti)
        return remaining

    def _quote(self, claims: Claims, tool: str, price: Price) -> Quote:
        """Preflight's answer: the price, and (with a ledger) the balance that covers it. Read
        in the order the hold checks them: the rate limits, the token's limit, then each
        budget cap (a free call counts into none)."""
        if self.engine is None:
            return Quote(tool, claims.jti, claims.tenant, claims.agent, price, None)
        counters = () if price.free else _rate_counters(claims, self._table())
        with reading(self._ledger()) as conn:
            if counters:
                limited = (rates.full(conn, counters, price.amount, self._clock())
                           if self._rate_store is None
                           else self._rate_store.full(counters, price.amount))
                if limited is not None:
                    raise _rate_limited(claims, tool, limited)
            remaining = self._remaining(conn, claims)
            if remaining < price.amount:
                raise self._budget_exceeded(claims, tool, price, remaining)
            reached = None if price.free else ledger_budgets.reached(
                conn, self._budgets(claims, self._table()),
                ledger_budgets.Spender(claims.tenant, claims.agent, claims.jti), price.amount,
                at=self._clock())
        if reached is not None:
            raise self._cap_reached(claims, tool, price, reached)
        return Quote(tool, claims.jti, claims.tenant, claims.agent, price, remaining)

    def _hold(self, claims: Claims, price: Price, call: calls.NewCall) -> Hold:
        now = self._clock()
        timeout_at = now + timedelta(seconds=self.hold_timeout)
        opened = self._opened(claims, price, call, lambda conn: calls.hold(
            conn, call, at=now, timeout_at=timeout_at))
        if isinstance(opened, Hold):  # a replay
            return opened
        return Hold(call.id, claims.jti, claims.tenant, claims.agent, call.tool, call.amount,
                    call.idempotency_key, timeout_at, price, terms=claims.terms)

    def _new_call(self, token: str, tool: str, args: Any, key: str | None, units: int | None,
                  *, amount: int | None = None, rule: str = "x402"
                  ) -> tuple[Claims, Price, calls.NewCall]:
        self._ledger()
        if amount is None:
            claims, table, price = self._priced(token, tool, units)
        else:
            claims, table = self._claims(token, tool), self._table()
            price = Price(whole_micro(amount, "a hold amount"), rule, table.version)
        return claims, price, self._call(claims, tool, table, price, args, key, units, amount)

    def _priced(self, token: str, tool: str, units: int | None
                ) -> tuple[Claims, PricingTable, Price]:
        claims = self._claims(token, tool)
        table = self._table()  # read once: the price and the version recorded agree
        return claims, table, price_quote(table, tool, tenant=claims.tenant, units=units)

    def _call(self, claims: Claims, tool: str, table: PricingTable, price: Price, args: Any,
              key: str | None, units: int | None, amount: int | None = None) -> calls.NewCall:
        """The call to record, priced from ``table`` (whose version is kept for reconcile),
        under the caller's key or, without one, the key derived from the call itself."""
        request_hash = _request_hash(claims.jti, tool, args, units, amount)
        window = None if key is not None else dedupe_window(table, tool)
        return calls.NewCall(
            id=calls.new_call_id(),
            idempotency_key=_agents_key(key, request_hash) if key is not None else _derived_key(
                request_hash, window or 0),
            request_hash=request_hash, jti=claims.jti, tenant=claims.tenant,
            agent=claims.agent, tool=tool, units=units, amount=price.amount,
            pricing_version=price.version, price_rule=price.rule, demo=self.demo,
            budgets=self._budgets(claims, table),
            dedupe_window=window,
            rates=() if self._rate_store is not None else _rate_counters(claims, table))

    @staticmethod
    def _budgets(claims: Claims, table: PricingTable) -> tuple[Budget, ...]:
        """The caps a call of ``claims`` counts into, in order: its tenant's and agent's (from
        ``table``), then its token's own."""
        return (*table_budgets(table, claims.tenant), *claims.terms.budgets)

    def _opened(self, claims: Claims, price: Price, call: calls.NewCall,
                write: Callable[[Connection], _Opened | calls.KeyTaken | calls.Refused]
                ) -> _Opened | Hold:
        """With rate limits in Redis: take the call's hits first, and give them back when
        the ledger refuses the call or finds it a replay. Else see :meth:`_opened_in_ledger`."""
        store = self._rate_store
        counters = () if store is None else _rate_counters(claims, self._table())
        if store is None or not counters:
            return self._opened_in_ledger(claims, price, call, write)
        hits = store.take(counters, call.amount)
        if isinstance(hits, rates.Limited):
            if not self._key_known(call):
                raise _rate_limited(claims, call.tool, hits)
            hits = []  # a repeat of a call made already: its outcome, uncounted
        try:
            opened = self._opened_in_ledger(claims, price, call, write)
        except BaseException:
            store.give_back(hits)
            raise
        if isinstance(opened, Hold):  # a replay
            store.give_back(hits)
        return opened

    def _opened_in_ledger(self, claims: Claims, price: Price, call: calls.NewCall,
                          write: Callable[[Connection], _Opened | calls.KeyTaken | calls.Refused]
                          ) -> _Opened | Hold:
        """Run ``write`` (the steps that open ``call``: a hold, or a charge and its receipt) in
        one transaction: what it opened, or the :attr:`Hold.replayed` hold of the call its key
        belongs to. A refusal raises; a key freed meanwhile, or stale holds expired to make
        room, run it again."""
        swept = False
        for _ in range(OPEN_ATTEMPTS):
            outcome = self._write(write)
            if isinstance(outcome, calls.Refused):
                if (outcome.reason in ("funds", "budget", "rate")
                        and self._key_known(call)):
                    outcome = calls.KeyTaken(call.idempotency_key)  # a replay needs no budget
                elif outcome.reason in ("funds", "budget") and not swept:
                    swept = True  # a server that died mid-call left holds past their timeout
                    if self._expire_stale_holds(claims.jti if outcome.reason == "funds"
                                                else None):
                        continue
                    raise self._refusal(claims, call.tool, price, outcome)
                else:
                    raise self._refusal(claims, call.tool, price, outcome)
            if not isinstance(outcome, calls.KeyTaken):
                return outcome
            replayed = self._existing(call, claims, price)
            if replayed is not None:
                return replayed
        raise CallInProgress(  # the key kept changing hands: other attempts are running
            f"other calls with idempotency key {call.idempotency_key!r} are in progress",
            idempotencyKey=call.idempotency_key, retryAfterMs=RETRY_AFTER_MS)

    def _write(self, write: Callable[[Connection], _T]) -> _T:
        """``write`` in one transaction; rolled back when it says the call did not open."""

        def opened(conn: Connection) -> _T:
            outcome = write(conn)
            if isinstance(outcome, calls.KeyTaken | calls.Refused):
                conn.rollback()
            return outcome

        return self._transaction(opened)

    def _transaction(self, work: Callable[[Connection], _T]) -> _T:
        """``work`` in a write transaction of the call path; once more, on a new connection,
        when the server had closed the one it ran on (a database restart or an idle timeout
        while the connection sat in the pool: this verifier's engine does not ping a pooled
        connection before each transaction, a round trip per call). Without it the call's
        capture failed LEDGER_UNAVAILABLE after the tool had run, and its hold lapsed.
        (A connection lost while its commit was under way may have committed: run again,
        the step finds its work done, as a retry of the call would.)"""
        try:
            with self._writing() as conn:
                return work(conn)
        except LedgerUnavailable as failure:
            if not failure.dropped:
                raise
            logger.info("ledger connection dropped by the server; the transaction runs again "
                        "on a new one")
        with self._writing() as conn:
            return work(conn)

    def _refusal(self, claims: Claims, tool: str, price: Price,
                 refused: calls.Refused) -> BillingError:
        if refused.reason == "closed":
            return TokenRevoked(f"token {claims.jti} has been revoked", jti=claims.jti)
        if refused.reason == "unknown":
            return InvalidCreditToken(f"token {claims.jti} is not in this ledger",
                                      reason="unknown_token")
        if refused.cap is not None:
            return self._cap_reached(claims, tool, price, refused.cap)
        if refused.limited is not None:
            return _rate_limited(claims, tool, refused.limited)
        return self._budget_exceeded(claims, tool, price, refused.available)

    def _top_up(self, wanted: TokenTerms, jti: str, tenant: str, remaining: int) -> None:
        """After a capture that left the token under its auto top-up threshold: top it up,
        in a transaction of its own (the capture is committed; its receipt names what was left
        before the top-up). A failure is logged and the receipt stands: the next capture under
        the threshold tries again."""
        if not wanted.wants_topup(remaining):
            return
        caps = tuple(b for b in table_budgets(self._table(), tenant) if b.scope == "tenant")
        try:
            with writing(self._ledger()) as conn:
                topups.auto_topup(conn, jti, wanted, tenant_caps=caps, now=self._clock())
        except (BillingError, DBAPIError) as failure:
            logger.warning("auto top-up of token %s failed: %s", jti, failure)

    def _key_known(self, call: calls.NewCall) -> bool:
        with reading(self._ledger()) as conn:
            return calls.stored(conn, tenant=call.tenant, key=call.idempotency_key) is not None

    def _not_captured(self, hold: Hold, outcome: calls.NotActive) -> Receipt:
        """A capture that found its hold no longer held: the receipt of a capture made
        already, else HOLD_NOT_ACTIVE (a hold that timed out is released at once)."""
        if outcome.state == "captured":
            return self.receipt_for(hold.id) or self._lost(hold.id)
        if outcome.state == "timed out":  # release it now, not at the next sweep
            self._release(hold)
        raise _not_active(hold, outcome)

    def _expire_stale_holds(self, jti: str | None) -> int:
        """Void the holds past their timeout of token ``jti`` (its limit refused the call) or,
        ``None``, of the whole ledger (a cap did: any token of the tenant may hold the
        window); how many. Each gives its amount back to its token and its cap windows."""
        with writing(self._ledger()) as conn:
            return expire_holds(conn, now=self._clock(),
                                account=None if jti is None else token_account(jti))

    def _existing(self, call: calls.NewCall, claims: Claims, price: Price) -> Hold | None:
        """What the call already under ``call``'s key means for ``call``: its replay (a Hold),
        ``None`` when the key is free again (retry), or a refusal.

        Never a word about another token's call: a key used by another request is only
        IDEMPOTENCY_CONFLICT.
        """
        now = self._clock()
        with writing(self._ledger()) as conn:
            stored = calls.stored(conn, tenant=call.tenant, key=call.idempotency_key)
            if stored is None:
                return None  # the other attempt rolled back: try again
            if stored.request_hash != call.request_hash:
                raise IdempotencyConflict(
                    f"idempotency key {call.idempotency_key!r} was used for another request; "
                    "use a new key for a new call", idempotencyKey=call.idempotency_key)
            if stored.status == "held" and not _lapsed(stored, now):
                raise CallInProgress(
                    f"the call with idempotency key {call.idempotency_key!r} is still "
                    f"running; retry in {RETRY_AFTER_MS} ms for its outcome",
                    idempotencyKey=call.idempotency_key, retryAfterMs=RETRY_AFTER_MS)
            if stored.status == "held":  # its server died mid-call: the hold is void
                calls.void(conn, stored.id, at=now, expired=True)
                stored = replace(stored, status="expired")
            if _replayable(stored, call, now):
                return self._replayed(stored, claims, price)
            if call.dedupe_window is not None:  # a derived key: free it for this new call
                calls.retire_key(conn, stored)
                return None
        raise CallFailed(f"the call with idempotency key {call.idempotency_key!r} failed "
                         f"({stored.status}) and stays failed; use a new key for a new call",
                         idempotencyKey=call.idempotency_key, status=stored.status)

    def _replayed(self, stored: calls.StoredCall, claims: Claims, price: Price) -> Hold:
        if stored.receipt is None:
            self._lost(stored.id)
        timeout = aware(stored.timeout_at) if stored.timeout_at else None
        return Hold(stored.id, claims.jti, claims.tenant, claims.agent, stored.tool,
                    stored.amount_held, stored.idempotency_key, timeout, price,
                    read_receipt(stored.receipt), stored.result)  # type: ignore[arg-type]

    def _sign_seal(self, claims: dict[str, Any]) -> tuple[str, str]:
        signer = self.keys.signer()
        if signer is None:
            raise StatelessVerifier("no signing key: seals need the operator's key ring")
        info, key = signer
        return seals.signer(info.alg, info.kid, key)(claims)

    def _count_refusal(self, exc: BillingError, sample: Callable[[], str | None]) -> None:
        sealer = self._sealer
        assert sealer is not None  # noqa: S101 - the caller checked
        waiting = sealer.counts.add(self._clock(), exc.code, str(exc.details.get("reason", "")),
                                    CALL_SOURCE.get(), sample)
        if waiting and not sealer.running:
            self._flush_counts()  # no thread writes them: a write a minute, at most

    def _flush_counts(self) -> None:
        try:
            self.seal()
        except BillingError as failure:  # the ledger is down: the refusal still stands
            logger.warning("could not write refusal counts: %s", failure.message)

    def _extend(self, call_ids: list[str], until: datetime, now: datetime) -> set[str]:
        with writing(self._ledger()) as conn:
            return calls.extend(conn, call_ids, until=until, now=now)

    def _sign(self, call: calls.NewCall | Hold, amount: int, remaining: int, at: datetime,
              transaction: str, settlement: Mapping[str, Any] | None = None) -> Receipt:
        signer = self.keys.signer()
        if signer is None:
            raise StatelessVerifier("no signing key: receipts need the operator's key ring")
        info, key = signer
        claims = {
            "success": True, "transaction": transaction, "network": self.network,
            "payer": call.agent, "amount": str(amount), "receiptId": call.id,
            "tool": call.tool, "amountUsd": format_usd(amount), "asset": "USDC",
            "jti": call.jti, "tenant": call.tenant, "idempotencyKey": call.idempotency_key,
            "remainingUsd": format_usd(remaining), "pricingVersion": _version_of(call),
            "priceRule": _rule_of(call), "demo": self.demo,
            "timestamp": at.isoformat().replace("+00:00", "Z"),
        }
        if settlement is not None:
            claims.update(transaction=settlement["transaction"], network=settlement["network"],
                          settlement=dict(settlement))
        return sign_receipt(claims, kid=info.kid, alg=info.alg, key=key)

    def _lost(self, call_id: str) -> Receipt:
        raise CallFailed(f"call {call_id} was captured but its receipt cannot be read",
                         receiptId=call_id)

    def _budget_exceeded(self, claims: Claims, tool: str, price: Price,
                         remaining: int) -> BudgetExceeded:
        return BudgetExceeded(
            f"{tool} costs {format_usd(price.amount)} USDC but this token has "
            f"{format_usd(remaining)} left",
            reason="token_limit", tool=tool, jti=claims.jti,
            priceUsd=format_usd(price.amount), remainingUsd=format_usd(remaining),
            shortfallUsd=format_usd(price.amount - remaining),
            fallback=self._fallback(claims, remaining))

    def _cap_reached(self, claims: Claims, tool: str, price: Price,
                     reached: ledger_budgets.CapReached) -> BudgetExceeded:
        """A full budget window: which cap (``scope``, ``window``, ``capUsd``), what is left
        in it (``remainingUsd``) and when it starts again (``resetsAt``)."""
        budget, left = reached.budget, reached.left
        period = "daily" if budget.period == "day" else "monthly"
        whose = {"tenant": f"tenant {claims.tenant}", "token": f"token {claims.jti}",
                 "agent": f"agent {claims.agent} of tenant {claims.tenant}"}[budget.scope]
        cap = format_usd(budget.cap)
        return BudgetExceeded(
            f"{whose} has reached its {period} cap of {cap} USDC ({format_usd(left)} left "
            f"this {budget.period}, {tool} costs {format_usd(price.amount)}); it resets at "
            f"{rfc3339(reached.resets_at)}",
            reason=f"{period}_cap", scope=budget.scope, window=budget.period, tool=tool,
            jti=claims.jti, priceUsd=format_usd(price.amount), capUsd=cap,
            remainingUsd=format_usd(left), shortfallUsd=format_usd(price.amount - left),
            resetsAt=rfc3339(reached.resets_at), **{f"{period}CapUsd": cap},
            fallback=self._fallback(claims, left))

    def _fallback(self, claims: Claims, remaining: int) -> dict[str, Any]:
        table = self._table()
        scope = list(claims.scope)
        return {
            "tools": [{"tool": name, "priceUsd": format_usd(amount)}
                      for name, amount in fallback_tools(table, claims.tenant, scope, remaining)],
            "freeTools": free_tools(table, claims.tenant, scope),
            "moreCredit": f"ask the operator for a new credit token for tenant {claims.tenant} "
                          "(mcpbill token issue --limit AMOUNT)",
        }

    def _metered_hold(self, hold: Hold) -> Hold:
        """``hold``, counted in the metrics: opened, or a call replayed."""
        if self.metrics is not None:
            if hold.replayed is not None:
                self.metrics.finished(hold.tool, "replayed")
            else:
                self.metrics.held(hold.id)
        return hold

    def _refusals_recorded(self, token: Any, tool: Any, jti: str | None = None,
                           ref: str | None = None, *, hold_id: str | None = None,
                           metered: bool = True) -> _RefusalsRecorded:
        """Record every refusal in the audit trail (and, for a call, in the metrics, where
        it ends the call of ``hold_id``), then let it propagate unchanged."""
        return _RefusalsRecorded(self, token, tool, jti, ref, hold_id, metered)

    def _refused(self, exc: BillingError, token: Any, tool: Any, jti: str | None,
                 ref: str | None, hold_id: str | None, metered: bool) -> None:
        self._record_refusal(exc, token, tool, jti, ref)
        if metered and self.metrics is not None:
            if hold_id is not None:
                self.metrics.released(hold_id)
            self.metrics.refused(_storable(tool, MAX_TOOL_LENGTH) or "", exc.code)

    def _record_refusal(self, exc: BillingError, token: Any, tool: Any, jti: str | None,
                        ref: str | None) -> None:
        if self.engine is None or self._sealer is None:
            return
        claims = self._token_cache.get(token) if isinstance(token, str) else None
        hashed = bool(token) and claims is None  # the trail keeps a hash of a token unverified
        if (claims is None and jti is None and _unauthenticated(exc)) or exc.code == (
                RateLimited.code):  # a loop's refusals: counted, never an event each
            self._count_refusal(exc, lambda: audit.token_fingerprint(token) if hashed else None)
            return
        fingerprint = audit.token_fingerprint(token) if hashed else None
        try:
            with writing(self.engine) as conn:
                audit.record(conn, "refusal", at=self._clock(), code=exc.code,
                             jti=claims.jti if claims else jti,
                             tenant=claims.tenant if claims else None,
                             agent=claims.agent if claims else None,
                             tool=_storable(tool, MAX_TOOL_LENGTH), ref=ref,
                             token_hash=fingerprint, demo=self.demo,
                             detail={"reason": exc.details.get("reason")}
                             if "reason" in exc.details else None)
                if claims is not None and exc.details.get("scope") in ("tenant", "agent"):
                    _alert_cap_reached(conn, exc, claims, self._clock())
        except BillingError as failure:  # the ledger is down: the refusal still stands
            logger.warning("could not record refusal %s: %s", exc.code, failure.message)
        except DBAPIError as failure:  # the ledger took none of it: the refusal still stands
            logger.warning("could not record refusal %s: %s", exc.code,
                           type(failure.orig).__name__)


class _RefusalsRecorded:
    """What :meth:`Verifier._refusals_recorded` returns: a class, not a ``@contextmanager``
    generator, whose way of passing an exception on cost 3 us of CPU per refusal where this
    costs 1 (measured), and a flood of garbage is nothing but refusals."""

    __slots__ = ("verifier", "token", "tool", "jti", "ref", "hold_id", "metered")

    def __init__(self, verifier: Verifier, token: Any, tool: Any, jti: str | None,
                 ref: str | None, hold_id: str | None, metered: bool) -> None:
        self.verifier, self.token, self.tool, self.jti = verifier, token, tool, jti
        self.ref, self.hold_id, self.metered = ref, hold_id, metered

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if isinstance(exc, BillingError):
            self.verifier._refused(exc, self.token, self.tool, self.jti, self.ref,
                                   self.hold_id, self.metered)


def _alert_cap_reached(conn: Connection, exc: BillingError, claims: Claims, at: datetime
                       ) -> None:
    """The ``cap.reached`` alert of a tenant's or an agent's cap refusal: once per tenant (and
    agent) and window (its start names the period), in the transaction that records the
    refusal (the refused call's own was rolled back)."""
    window = exc.details["window"]
    cap = parse_usd(str(exc.details["capUsd"]))
    left = parse_usd(str(exc.details["remainingUsd"]), allow_zero=True)
    agent = claims.agent if exc.details["scope"] == "agent" else None
    alerts.cap_reached(conn, tenant=claims.tenant, window=window,
                       period=window_key(window, at), cap=cap, spent=cap - left, at=at,
                       agent=agent)


def _audience(settings: Settings) -> Audience:
    """The audience a server accepts: the configured one, and its canonical URI where set
    (``[mcp] resource``: what tokens sent as its HTTP authorization are issued to)."""
    if settings.mcp_resource is None or settings.mcp_resource == settings.audience:
        return settings.audience
    return (settings.audience, settings.mcp_resource)


def _rate_counters(claims: Claims, table: PricingTable) -> tuple[Counter, ...]:
    """The rate limit counters of a call: none (and nothing read or written) unless the token
    or the pricing table sets a rate."""
    limits = rate_limits(table, claims.tenant)
    if limits is None and not claims.rates:
        return ()
    return counters(jti=claims.jti, tenant=claims.tenant, agent=claims.agent,
                    own=claims.rates, table=limits)


def _rate_limited(claims: Claims, tool: str, limited: rates.Limited) -> RateLimited:
    return rate_limited(limited, tool=tool, agent=claims.agent, jti=claims.jti)


def rate_limited(limited: rates.Limited, *, tool: str, agent: str, jti: str | None = None
                 ) -> RateLimited:
    """The RATE_LIMITED refusal of a call of ``tool`` by ``agent`` (on token ``jti``, if any)
    that ``limited`` says is over a limit."""
    counter, kind, retry_after_ms = limited.counter, limited.kind, limited.retry_after_ms
    limit = counter.limit_of(kind)
    what = f"{format_usd(counter.spend)} USDC" if kind == "spend" else f"{counter.calls} calls"
    whose = f"token {jti}" if counter.scope == "token" else f"agent {agent}"
    token = {} if jti is None else {"jti": jti}
    return RateLimited(
        f"{whose} reached its rate limit of {what} per {WINDOW_NAMES[counter.window]}; "
        f"retry in {retry_after_ms} ms (a loop calling {tool} again and again?)",
        retryAfterMs=retry_after_ms, limit=limit, kind=kind,
        window=WINDOW_NAMES[counter.window], scope=counter.scope, **token, tool=tool)


def _unauthenticated(exc: BillingError) -> bool:
    """A refusal before any token was verified (garbage, a forgery, a token expired or for
    another audience: anyone can send those as fast as they like): counted, never an event."""
    return exc.code in ("INVALID_CREDIT_TOKEN", "INVALID_INPUT")


# json.dumps with these options builds an encoder per call; every paid call hashes its request.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                              default=str)


def canonical_json(value: Any) -> str:
    """``json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
    default=str)``, with one encoder made once."""
    return _CANONICAL.encode(value)


def _request_hash(jti: str, tool: str, args: Any, units: int | None, amount: int | None
                  ) -> str:
    """What identifies a request: the token, the tool, the canonical arguments, and what is
    held for it (units of a per-unit tool, the amount of a payment priced elsewhere)."""
    held = [units, amount] if units is not None or amount is not None else []
    try:
        canonical = canonical_json([jti, tool, args, *held]).encode("utf-8", "surrogatepass")
    except (TypeError, ValueError, RecursionError):
        raise InvalidInput("the call's arguments are not JSON (too deeply nested, circular, "
                           "or with keys that are not strings)", field="args") from None
    return hashlib.sha256(canonical).hexdigest()


def _derived_key(request_hash: str, window: int) -> str:
    """Without a key: the same request within the tool's dedupe window is one call; with no
    window (``"0s"``), every call is a new one."""
    if window <= 0:
        return f"rnd_{uuid.uuid4().hex}"
    return f"{DERIVED}{request_hash[:48]}"


DERIVED = "drv_"  # the keys the verifier derives from a request: see _agents_key


def _agents_key(key: Any, request_hash: str) -> str:
    """The key an agent sent. Derived keys (``drv_``) are the verifier's: an agent may send
    one back only for the request it was derived from (a retry under the key its receipt
    carries), never take another call's key first. Keys are unique per tenant, and a
    receipt names its token, so an agent of the same tenant could otherwise compute a
    colleague's key and have every call of theirs refused ``IDEMPOTENCY_CONFLICT``."""
    checked = _checked_key(key)
    if checked.startswith(DERIVED) and checked != _derived_key(request_hash, 1):
        raise InvalidInput(f"idempotency keys starting {DERIVED!r} are the ones mcpbill derives "
                           "from a call; send such a key only to retry that same call, or "
                           "choose a key of your own", field="idempotency_key")
    return checked


def _checked_key(key: Any) -> str:
    if not _printable(key, MAX_KEY_LENGTH):
        raise InvalidInput(f"an idempotency key is printable text of 1 to {MAX_KEY_LENGTH} "
                           "characters", field="idempotency_key")
    return str(key)


def _check_tool(tool: Any) -> None:
    if not _printable(tool, MAX_TOOL_LENGTH):
        raise InvalidInput(f"a tool name is printable text of 1 to {MAX_TOOL_LENGTH} "
                           "characters", field="tool")


def _printable(value: Any, limit: int) -> bool:
    return isinstance(value, str) and 0 < len(value) <= limit and value.isprintable()


def _storable(value: Any, limit: int) -> str | None:
    """``value`` as text any ledger column takes (no NUL, no lone surrogate), for the audit
    trail of a refusal whose input was refused for being odd."""
    if not isinstance(value, str):
        return None
    text = value[:limit].encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")
    return text or None


def _lapsed(stored: calls.StoredCall | None, now: datetime) -> bool:
    return (stored is not None and stored.timeout_at is not None
            and aware(stored.timeout_at) <= now)


def _replayable(stored: calls.StoredCall, call: calls.NewCall, now: datetime) -> bool:
    """A captured call is replayed under a given key always, under a derived key until its
    window has passed since it ended."""
    if stored.status != "captured":
        return False
    if call.dedupe_window is None or stored.resolved_at is None:
        return True
    return aware(stored.resolved_at) + timedelta(seconds=call.dedupe_window) > now


def _not_active(hold: Hold, outcome: calls.NotActive) -> HoldNotActive:
    return HoldNotActive(f"hold {hold.id} is {outcome.state}", hold=hold.id,
                         state=outcome.state)


def _fresh(hold: Hold) -> Hold:
    """``hold``, or DUPLICATE_CALL when it is a replay (a ``with`` block cannot be skipped)."""
    if hold.replayed is None:
        return hold
    raise DuplicateCall(f"this call was made already (receipt {hold.id}); it is not run or "
                        "billed again", receipt=hold.replayed, result=hold.result)


def _version_of(call: calls.NewCall | Hold) -> int:
    return call.pricing_version if isinstance(call, calls.NewCall) else call.price.version


def _rule_of(call: calls.NewCall | Hold) -> str:
    return call.price_rule if isinstance(call, calls.NewCall) else call.price.rule


def _revoked_until(entry: Mapping[str, Any]) -> int:
    """When a listed revocation lapses (the token's expiry, epoch seconds): ``expires_at``
    (RFC 3339, `revocations export` version 2) or ``exp`` (epoch seconds, version 1)."""
    if "expires_at" in entry:
        return int(datetime.fromisoformat(entry["expires_at"]).timestamp())
    return int(entry["exp"])

"""Accepting x402 payments for paid tools: the core an MCP server or an HTTP middleware calls.

    acceptor = Acceptor.from_settings(verifier)       # None when x402 is not configured
    challenge = acceptor.payment_required("search")   # v2 PaymentRequired, None if not offered
    legacy = acceptor.payment_required("search", version=1, resource="https://api.example/s")

    verified = acceptor.verify(payment, "search", args=args)   # X402_* refusals raise
    opened = acceptor.reserve(verified)          # Reserved, or Replayed (settled before)
    if isinstance(opened, Replayed):
        return opened.result, opened.receipt     # the tool does not run again
    try:
        result = run_the_tool()
    except Exception:
        acceptor.release(opened)                 # nothing moved; the authorization is free
        raise
    settlement = acceptor.settle(opened)         # on chain, or X402_SETTLEMENT_FAILED (withhold)
    receipt = acceptor.record(opened, settlement, result=result_json)
    # or both in one, counted in the metrics: acceptor.pay_for(opened, "search", result=...)

``payment`` is a v2 ``PaymentPayload`` (or a v1 one) as a mapping, or the base64 JSON of a
``PAYMENT-SIGNATURE`` / ``X-PAYMENT`` header. ``tenant``/``agent``/``jti`` name the credit token
that came with the payment, if any; without one the payer pays as ``[x402] tenant`` and is the
agent. Every step is thread-safe and blocking (web3 and the ledger): call it off the event loop.

What each step guarantees:

- :meth:`Acceptor.verify`: the payload pays exactly this call's price, in USDC on the configured
  chain, to the deposit address, within its validity window (and far enough from its end to
  settle), signed by its ``from``, with a nonce unused on chain and funds to cover it.
- :meth:`Acceptor.reserve`: one INSERT keyed by the authorization (``network:asset:payer:nonce``):
  of all replicas on one ledger, one gets it; a retry of the same call gets CALL_IN_PROGRESS
  while it runs, its replay once it settled; any other use is X402_NONCE_USED.
- :meth:`Acceptor.settle`: the transfer is on chain (facilitator or self); on failure the
  payment is marked failed and nothing is charged.
- :meth:`Acceptor.record`, in one transaction: the deposit from the payer (the same deposit id
  ``wallet sync`` would give its ``Transfer`` log, so sync never credits it again), a credit token
  of exactly the price for the tenant (internal, never handed out), the call charged on it with
  a signed receipt carrying the settlement, and the payment marked settled.
- :meth:`Acceptor.pay_for`: settle and record, counted in the verifier's metrics; a payment
  settled but not recorded (the ledger failed) still gives the payer its result, and is left to
  :meth:`Acceptor.recover`.
- :meth:`Acceptor.recover`: payments left ``reserved`` by a server that died (after settling,
  before recording) are recorded from the chain, or released once they can no longer settle;
  an acceptor built by :meth:`Acceptor.from_settings` runs it by itself, at start-up and then
  periodically (:mod:`mcpbill_cli.x402.recovery`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection

from mcpbill_cli.clock import Clock
from mcpbill_cli.config import Settings, load_settings
from mcpbill_cli.errors import BillingError, CallInProgress, ConfigInvalid
from mcpbill_cli.ledger import calls, credit
from mcpbill_cli.ledger import x402_payments as payments
from mcpbill_cli.ledger.engine import reading, writing
from mcpbill_cli.ledger.rates import Limited
from mcpbill_cli.ledger.rates import count as count_rates
from mcpbill_cli.names import require_name
from mcpbill_cli.pricing import Price, PricingTable, rate_limits, x402_offered
from mcpbill_cli.pricing import quote as price_quote
from mcpbill_cli.ratelimits import Counter, agent_counters
from mcpbill_cli.ratestore import Hit, RedisCounters
from mcpbill_cli.receipts import Receipt, read_receipt
from mcpbill_cli.tracing import ended
from mcpbill_cli.verifier import Verifier, rate_limited
from mcpbill_cli.wallet import eip3009
from mcpbill_cli.wallet.chains import Chain
from mcpbill_cli.wallet.crediting import Deposit, credit_deposit, find_recorded
from mcpbill_cli.wallet.rpc import Rpc
from mcpbill_cli.x402.errors import (
    X402FacilitatorUnavailable,
    X402InsufficientFunds,
    X402NonceUsed,
    X402PaymentInvalid,
    X402SettlementFailed,
)
from mcpbill_cli.x402.offers import (
    Signed,
    Terms,
    check_terms,
    check_window,
    payment_required,
    read_payment,
    requirement,
    tool_resource,
)
from mcpbill_cli.x402.readiness import facilitator_url, readiness
from mcpbill_cli.x402.recovery import RECOVER_AFTER, RECOVER_INTERVAL, Recovery, recovery_times
from mcpbill_cli.x402.settlers import (
    FacilitatorSettler,
    SelfSettler,
    Settler,
    authorization_of,
    domain_of,
)

__all__ = ["Acceptor", "Replayed", "Reserved", "SettleResponse", "Unavailable", "Verified"]

logger = logging.getLogger("mcpbill")

SETTLE_MARGIN = 10  # seconds an authorization must stay valid after verification
PAID_TOKEN_TTL = 300  # seconds: the internal token a paid call is charged on
RECEIPT_WAIT = 15.0  # seconds to wait for a facilitator's transaction to be readable
STALE_AFTER = RECOVER_AFTER  # seconds: a reserved payment older than this is a server that died
RETRY_AFTER_MS = 1000


@dataclass(frozen=True)
class SettleResponse:
    """x402's ``SettleResponse``: what ``_meta["x402/payment-response"]`` and the
    ``PAYMENT-RESPONSE`` header carry."""

    success: bool
    transaction: str
    network: str
    payer: str

    def to_dict(self) -> dict[str, Any]:
        return {"success": self.success, "transaction": self.transaction,
                "network": self.network, "payer": self.payer}


@dataclass(frozen=True)
class Verified:
    """A payment that pays this call, checked; what :meth:`Acceptor.reserve` takes."""

    tool: str
    tenant: str
    agent: str
    price: Price
    terms: Terms
    signed: Signed
    requirement: Mapping[str, Any]  # the option it pays, in the payload's protocol version
    payment_id: str
    request_hash: str
    args: Any = None
    known: payments.Payment | None = field(default=None, repr=False)

    @property
    def amount(self) -> int:
        return self.price.amount


@dataclass(frozen=True)
class Reserved:
    """A payment this server holds: run the tool, then settle and record, or release."""

    verified: Verified


@dataclass(frozen=True)
class Replayed:
    """A payment settled and recorded already for this very call: its receipt, the result kept
    from that run (JSON text, ``None`` when none was kept) and its settlement."""

    receipt: Receipt
    result: str | None
    settlement: SettleResponse


@dataclass(frozen=True)
class Unavailable:
    """Why x402 is not offered here (demo mode, no chain or deposit address, not enabled)."""

    reason: str


class Acceptor:
    """Accept x402 payments for the tools the pricing table offers them on (``[x402]``).

    ``terms_for`` builds the payment terms from the current pricing table; ``settler`` puts
    payments on chain; ``rpc`` reads the chain (nonce state, balances, settlement logs).
    Times (reservations, their recovery, the calls recorded) are the verifier's unless a
    ``clock`` is given: on PostgreSQL, the database's, so replicas agree on a stale reservation.
    """

    def __init__(self, verifier: Verifier, *, chain: Chain, pay_to: str, rpc: Rpc,
                 settler: Settler, clock: Clock | None = None,
                 settle_margin: int = SETTLE_MARGIN) -> None:
        self.verifier = verifier
        self.chain = chain
        self.pay_to = pay_to.lower()
        self.rpc = rpc
        self.settler = settler
        self._clock = clock or verifier.now  # the ledger's time, as the verifier's calls
        self.settle_margin = settle_margin
        self.recovery: Recovery | None = None

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def from_settings(cls, verifier: Verifier, settings: Settings | None = None, *,
                      recover: bool = True) -> Acceptor | Unavailable:
        """The acceptor the home configures, or :class:`Unavailable` saying why there is none:
        ``[x402]`` in pricing.toml, the chain (its ``rpc_url``), ``[wallet] deposit_address``,
        and ``[x402] facilitator_url`` in config.toml (without it: self-settlement with the
        keystore, password from ``MCPBILL_KEYSTORE_PASSWORD``). The checks are
        :func:`~mcpbill_cli.x402.readiness.readiness`'s, as ``mcpbill status`` reports them.

        With ``recover`` (the default) the acceptor also starts its :class:`Recovery`
        (``[x402] recover_after`` / ``recover_interval`` of config.toml): payments a crashed
        server left reserved are resolved at start-up and then periodically."""
        s = settings or load_settings()
        table = verifier.pricing_table()
        if verifier.demo:
            return Unavailable("demo mode: no chain to be paid on")
        found = readiness(s, table)
        if not found.accepting:
            return Unavailable("; ".join(found.reasons) or "pricing.toml has no [x402] section")
        try:
            acceptor = cls._configured(verifier, s, table)
            older_than, interval = recovery_times(s.file)
        except BillingError as error:
            return Unavailable(error.message)
        if recover:
            acceptor.start_recovery(older_than=older_than, interval=interval)
        return acceptor

    @classmethod
    def _configured(cls, verifier: Verifier, s: Settings, table: PricingTable) -> Acceptor:
        from mcpbill_cli.wallet.chains import resolve_chain, rpc_url
        from mcpbill_cli.wallet.deposit_address import get_deposit_address
        from mcpbill_cli.wallet.keystore import ENV_KEYSTORE_PASSWORD, keystore_path, load_account
        from mcpbill_cli.wallet.rpc import connect

        assert table.x402 is not None  # noqa: S101 - the caller checked
        chain = resolve_chain(table.x402.chain, s.file)
        pay_to = get_deposit_address(s.file)
        rpc = Rpc(connect(rpc_url(chain)))
        url = facilitator_url(s.file)
        terms = _terms(chain, pay_to, table)
        settler: Settler
        if url is not None:
            settler = FacilitatorSettler(url)
        else:
            path = keystore_path(s.keys_dir)
            loaded: list[Any] = []

            def account() -> Any:
                if not loaded:
                    loaded.append(load_account(path, os.environ.get(ENV_KEYSTORE_PASSWORD, "")))
                return loaded[0]

            settler = SelfSettler(rpc, terms, account)
        return cls(verifier, chain=chain, pay_to=pay_to, rpc=rpc, settler=settler)

    # --- the challenge --------------------------------------------------------------------------

    def terms(self) -> Terms:
        """The payment terms under the pricing table in force."""
        return _terms(self.chain, self.pay_to, self.verifier.pricing_table())

    def price(self, tool: str, tenant: str | None = None) -> Price | None:
        """What an x402 payment for one call of ``tool`` must be (the tenant's price; without
        one, the ``[x402] tenant``'s), ``None`` when x402 is not offered for it or it is free."""
        table = self.verifier.pricing_table()
        if table.x402 is None or not x402_offered(table, tool):
            return None
        try:
            price = price_quote(table, tool, tenant=tenant or table.x402.tenant)
        except BillingError:
            return None
        return None if price.free or price.per_unit is not None else price

    def payment_required(self, tool: str, tenant: str | None = None, *, version: int = 2,
                         resource: str | None = None, error: str | None = None
                         ) -> dict[str, Any] | None:
        """The ``PaymentRequired`` for one call of ``tool`` (v2, or v1 with ``version=1``);
        ``resource`` defaults to ``mcp://tool/<tool>``. ``None`` when x402 is not offered."""
        price = self.price(tool, tenant)
        if price is None:
            return None
        return payment_required(self.terms(), price.amount, resource or tool_resource(tool),
                                version=version, error=error, description=f"{tool} (one call)")

    # --- one payment ----------------------------------------------------------------------------

    def verify(self, payment: Mapping[str, Any] | str, tool: str, *, args: Any = None,
               tenant: str | None = None, agent: str | None = None,
               resource: str | None = None) -> Verified:
        """Check ``payment`` for one call of ``tool`` (see the module docstring); every
        refusal is an X402_* :class:`~mcpbill_cli.errors.BillingError`, except a ``tenant`` or
        ``agent`` that cannot name one (INVALID_INPUT, before the payment is read), which the
        ledger would refuse only after the payment settled."""
        for name, what in ((tenant, "tenant"), (agent, "agent")):
            if name is not None:
                require_name(name, what)
        signed = read_payment(payment)
        price = self.price(tool, tenant)
        if price is None:
            raise X402PaymentInvalid(f"x402 payments are not accepted for {tool!r}",
                                     reason="not_offered")
        terms = self.terms()
        check_terms(signed, terms, price.amount)
        check_window(signed, int(self._clock().timestamp()), self.settle_margin)
        if eip3009.signer_of(authorization_of(signed), domain_of(terms)) != signed.payer:
            raise X402PaymentInvalid("x402 payment refused (signature): the authorization is "
                                     f"not signed by {signed.payer}", reason="signature")
        table = self.verifier.pricing_table()
        assert table.x402 is not None  # noqa: S101 - price() found it
        payment_id = payments.payment_id(terms.network, terms.asset, signed.payer, signed.nonce)
        verified = Verified(
            tool=tool, tenant=tenant or table.x402.tenant, agent=agent or signed.payer,
            price=price, terms=terms, signed=signed,
            requirement=requirement(terms, price.amount, version=signed.version,
                                    resource=resource or tool_resource(tool),
                                    description=f"{tool} (one call)"),
            payment_id=payment_id, request_hash=_request_hash(payment_id, tool, args),
            args=args)
        known = self._in_use(payment_id)
        if known is not None:
            return _with_known(verified, known)  # reserve() says what it means: no chain read
        self._check_chain(signed, terms)
        self.settler.verify(signed, verified.requirement)
        return verified

    def reserve(self, verified: Verified) -> Reserved | Replayed:
        """Take the payment for this call (one INSERT): :class:`Reserved`, or the
        :class:`Replayed` call it paid already; CALL_IN_PROGRESS while that call runs;
        X402_NONCE_USED for any other call.

        A new call counts in its agent's rate limits (``[limits]`` ``agent_calls`` and
        ``agent_spend`` of its tenant: the payer is the agent of a call paid without a credit
        token), in the reservation's transaction or in Redis as the verifier counts them. Over
        a limit it is RATE_LIMITED and nothing is reserved: the same payment pays a retry once
        the window has ended. A replay or a retry of a call made already is never counted."""
        row = payments.Payment(
            id=verified.payment_id, status="reserved", network=verified.terms.network,
            asset=verified.terms.asset, payer=verified.signed.payer, nonce=verified.signed.nonce,
            tenant=verified.tenant, agent=verified.agent, tool=verified.tool,
            amount=verified.amount, valid_before=verified.signed.valid_before,
            request_hash=verified.request_hash)
        counters = agent_counters(verified.tenant, verified.agent,
                                  rate_limits(self.verifier.pricing_table(), verified.tenant))
        store = self.verifier.rate_store if counters else None
        hits = [] if store is None else self._hits(verified, counters, store)
        try:
            taken, limited = self._reserved(row, () if store is not None else counters)
        except BaseException:
            if store is not None:
                store.give_back(hits)
            raise
        if limited is not None:
            raise self._limited(verified, limited)
        if taken is None:
            return Reserved(verified)
        if store is not None:
            store.give_back(hits)
        return self._taken(verified, taken)

    def _hits(self, verified: Verified, counters: tuple[Counter, ...], store: RedisCounters
              ) -> list[Hit]:
        """The call's hits on its counters in Redis (none for a call made already)."""
        if verified.known is not None:
            return []
        took = store.take(counters, verified.amount)
        if not isinstance(took, Limited):
            return took
        if self._in_use(verified.payment_id) is None:
            raise self._limited(verified, took)
        return []  # a retry of a call made already: its outcome, uncounted

    def _reserved(self, row: payments.Payment, counters: tuple[Counter, ...]
                  ) -> tuple[payments.Payment | None, Limited | None]:
        """One transaction: the reservation's INSERT (the payment it found taken, or
        ``None``) and, for a new call, its count in ``counters``, all rolled back over a limit
        (the payment stays unused)."""
        with writing(self._engine()) as conn:
            now = self._clock()
            taken = payments.reserve(conn, row, at=now)
            limited = None
            if taken is None and counters:
                limited = count_rates(conn, counters, row.amount, now)
                if limited is not None:
                    conn.rollback()
        return taken, limited

    def _in_use(self, payment_id: str) -> payments.Payment | None:
        """The payment ``payment_id`` as a call took it (a released one is free again)."""
        with reading(self._engine()) as conn:
            known = payments.find(conn, payment_id)
        return known if known is not None and known.status != "released" else None

    @staticmethod
    def _limited(verified: Verified, limited: Limited) -> BillingError:
        return rate_limited(limited, tool=verified.tool, agent=verified.agent)

    def release(self, opened: Reserved) -> None:
        """The tool failed: give the payment back (nothing moved; the agent may pay again)."""
        with writing(self._engine()) as conn:
            payments.released(conn, opened.verified.payment_id, at=self._clock())

    def settle(self, opened: Reserved) -> SettleResponse:
        """Put the payment on chain. X402_SETTLEMENT_FAILED or X402_FACILITATOR_UNAVAILABLE
        when it did not settle: the payment is marked failed, nothing is charged, and the
        tool's output must be withheld."""
        verified = opened.verified
        try:
            tx_hash = self.settler.settle(verified.signed, verified.requirement)
        except X402FacilitatorUnavailable as error:
            self._failed(verified, error)
            raise
        except X402SettlementFailed as error:  # the chain knows better: was it used anyway?
            try:
                found = self._settled_on_chain(verified.signed, verified.terms)
            except BillingError:  # cannot tell: left reserved, for recover() to resolve
                raise error from None
            if found is None:
                self._failed(verified, error)
                raise
            tx_hash = found  # someone (a facilitator's retry, a relayer) put it on chain
        return _response(verified, tx_hash)

    def record(self, opened: Reserved, settlement: SettleResponse, *,
               result: str | None = None) -> Receipt:
        """Record the settled call (see the module docstring) and return its signed receipt;
        ``result`` is the tool's result as JSON text, kept for replays."""
        return self._record(_Paid.of(opened.verified), self._paid_in(opened, settlement),
                            settlement, result)

    def pay_for(self, opened: Reserved, tool: str, *, result: str | None = None
                ) -> tuple[SettleResponse, Receipt | None]:
        """:meth:`settle` and :meth:`record` for a tool that succeeded, counting how the call
        ended (:meth:`call_ended`) here: called on a worker, it goes on for a caller cancelled
        meanwhile, whose call is paid (or refused) all the same. The receipt is ``None`` when
        the USDC is seen on chain but the ledger could not record it: the payer has paid, so
        the result is its due, and :meth:`recover` records the payment later. A settlement
        that fails, or whose transfer the chain does not show, raises: withhold the result."""
        verified = opened.verified
        try:
            settlement = self.settle(opened)
            transfer = self._paid_in(opened, settlement)
        except BillingError as error:
            self.call_ended(tool, "refused", code=error.code)
            raise
        try:
            receipt = self._record(_Paid.of(verified), transfer, settlement, result)
        except BillingError as error:
            logger.warning("x402 payment %s settled in %s but is not recorded yet (%s); "
                           "Acceptor.recover() records it", verified.payment_id,
                           settlement.transaction, error.code)
            self.call_ended(tool, "captured", amount=verified.amount)  # it was paid
            return settlement, None
        self.call_ended(tool, "captured", amount=receipt.amount)
        return settlement, receipt

    # --- recovery -------------------------------------------------------------------------------

    def recover(self, *, older_than: int = STALE_AFTER) -> list[payments.Payment]:
        """Resolve the payments still ``reserved`` after ``older_than`` seconds (their server
        died): recorded from the chain when they settled, released when they no longer can,
        left alone otherwise. Returns the payments resolved, as they were found."""
        now = self._clock()
        with reading(self._engine()) as conn:
            stale = payments.stale(conn, before=now - timedelta(seconds=older_than))
        return [row for row in stale if self._recovered(row, now)]

    def _recovered(self, row: payments.Payment, now: datetime) -> bool:
        """:meth:`_recover_one`; False when another server (a replica's recovery) resolved
        the payment first (its transaction, and all it booked, rolled back), or when this one
        cannot be resolved now: that is logged, and the payments after it are still
        resolved (a pass stopped at its oldest would never resolve those)."""
        try:
            return self._recover_one(row, now)
        except X402NonceUsed:
            return False
        except BillingError as error:
            logger.warning("x402 payment %s not recovered this time: %s %s", row.id,
                           error.code, error.message)
            return False

    def call_ended(self, tool: str, outcome: str, *, amount: int | None = None,
                   code: str | None = None) -> None:
        """A call paid with x402 ended (it held nothing in the verifier): ``captured`` for
        ``amount``, refused with ``code``, or another outcome; counted in the verifier's
        metrics when they are on, and set on the call's span when it is traced."""
        metrics = self.verifier.metrics
        if metrics is not None:
            if outcome == "captured" and amount is not None:
                metrics.captured(tool, amount)
            elif code is not None:
                metrics.refused(tool, code)
            else:
                metrics.finished(tool, outcome)
        ended(outcome, amount=amount, code=code)

    def start_recovery(self, *, older_than: int = RECOVER_AFTER,
                       interval: float = RECOVER_INTERVAL) -> Recovery:
        """Run :meth:`recover` now and every ``interval`` seconds from a daemon thread (see
        :mod:`mcpbill_cli.x402.recovery`), until :meth:`close` or the verifier's close; once
        per acceptor."""
        if self.recovery is None:
            self.recovery = Recovery(self, older_than=older_than, interval=interval)
            self.verifier.stop_on_close(self.recovery.close)
            self.recovery.start()
        return self.recovery

    def close(self) -> None:
        """Stop the recovery thread, if any."""
        if self.recovery is not None:
            self.recovery.close()

    # --- internals ------------------------------------------------------------------------------

    def _engine(self) -> Any:
        if self.verifier.engine is None:
            raise ConfigInvalid("accepting x402 payments needs a ledger-backed verifier")
        return self.verifier.engine

    def _check_chain(self, signed: Signed, terms: Terms) -> None:
        if eip3009.authorization_used(self.rpc, terms.asset, signed.payer, signed.nonce):
            raise X402NonceUsed(f"authorization {signed.nonce} of {signed.payer} was used "
                                "already; sign a new one", nonce=signed.nonce)
        balance = self.rpc.token_balance(terms.asset, signed.payer)
        if balance < signed.value:
            raise X402InsufficientFunds(
                f"{signed.payer} holds {balance} units of {terms.asset}, less than the "
                f"{signed.value} it authorized", balance=str(balance), amount=str(signed.value))

    def _taken(self, verified: Verified, taken: payments.Payment) -> Replayed:
        same = taken.request_hash == verified.request_hash
        if same and taken.status == "reserved":
            raise CallInProgress("this payment's call is still running; retry in "
                                 f"{RETRY_AFTER_MS} ms for its outcome",
                                 retryAfterMs=RETRY_AFTER_MS)
        if same and taken.status == "settled" and taken.call_id is not None:
            replay = self._replay(taken)
            if replay is not None:
                return replay
        raise X402NonceUsed(f"authorization {taken.nonce} of {taken.payer} was used already "
                            f"({taken.status}); sign a new one for a new call",
                            nonce=taken.nonce, status=taken.status)

    def _replay(self, taken: payments.Payment) -> Replayed | None:
        with reading(self._engine()) as conn:
            stored = calls.stored(conn, call_id=taken.call_id)
        if stored is None or stored.receipt is None or taken.tx_hash is None:
            return None
        receipt = read_receipt(stored.receipt)
        settlement = receipt.claims.get("settlement") or {}
        return Replayed(receipt, stored.result, SettleResponse(
            True, taken.tx_hash, str(settlement.get("network", taken.network)), taken.payer))

    def _failed(self, verified: Verified, error: BillingError) -> None:
        with writing(self._engine()) as conn:
            payments.failed(conn, verified.payment_id, error=f"{error.code}: {error.message}",
                            at=self._clock())

    def _settled_on_chain(self, signed: Signed, terms: Terms) -> str | None:
        """The transaction that used this authorization, when the chain says it was used and
        it paid this payment; RPC_UNAVAILABLE when the chain cannot be read."""
        if not eip3009.authorization_used(self.rpc, terms.asset, signed.payer, signed.nonce):
            return None
        tx_hash = eip3009.authorization_tx(self.rpc, terms.asset, signed.payer, signed.nonce)
        if tx_hash is None or eip3009.settled_transfer(
                self.rpc, tx_hash, terms.asset, terms.pay_to, sender=signed.payer,
                amount=signed.value) is None:
            return None
        return tx_hash

    def _paid_in(self, opened: Reserved, settlement: SettleResponse) -> eip3009.SettledTransfer:
        """The payer's transfer in the transaction ``settlement`` names (:meth:`_transfer`)."""
        signed = opened.verified.signed
        return self._transfer(settlement.transaction, opened.verified.terms, signed.payer,
                              signed.value)

    def _transfer(self, tx_hash: str, terms: Terms, payer: str, amount: int
                  ) -> eip3009.SettledTransfer:
        """The USDC ``payer`` paid in ``tx_hash``: ``amount`` to the deposit address, waiting up
        to RECEIPT_WAIT for the transaction to be mined (a facilitator's may not be yet).
        X402_SETTLEMENT_FAILED when the chain does not show it: a facilitator that answered
        with another transaction (another payer's, or one that moved nothing) is not taken at
        its word."""
        deadline = time.monotonic() + RECEIPT_WAIT
        while (receipt := self.rpc.receipt(tx_hash)) is None and time.monotonic() < deadline:
            time.sleep(0.2)
        found = None if receipt is None else eip3009.transfer_in(
            receipt, tx_hash, terms.asset, terms.pay_to, sender=payer, amount=amount)
        if found is None:
            raise X402SettlementFailed(f"settlement {tx_hash} moved no {amount} USDC units "
                                       f"from {payer} to {terms.pay_to}",
                                       transaction=tx_hash, outcome="unknown")
        return found

    def _record(self, paid: _Paid, transfer: eip3009.SettledTransfer,
                settlement: SettleResponse, result: str | None) -> Receipt:
        verifier = self.verifier
        signer = verifier.keys.signer()
        if signer is None:
            raise ConfigInvalid("accepting x402 payments needs the operator's key ring")
        deposit = Deposit(chain=paid.network, tx_hash=transfer.tx_hash,
                          log_index=transfer.log_index, position=transfer.position,
                          block_number=transfer.block_number,
                          sender=transfer.sender, recipient=transfer.recipient,
                          token=paid.asset, amount=transfer.amount)
        now = self._clock()
        with writing(self._engine()) as conn:
            tenant = _paying_tenant(conn, deposit, paid.tenant, now)
            # Priced for the payment's tenant: on another's funds, a price from outside the
            # table (reconcile does not price it again for that tenant's terms)
            price = paid.price if tenant == paid.tenant else replace(paid.price,
                                                                     rule="x402.synced")
            request = credit.IssueRequest(
                tenant=tenant, agent=paid.agent, limit=price.amount, ttl=PAID_TOKEN_TTL,
                scope=[paid.tool], audience=verifier.own_audience or "mcpbill",
                issuer=verifier.issuer or "mcpbill", demo=verifier.demo)
            issued = credit.issue(conn, request, signer=signer, ttl_cap=PAID_TOKEN_TTL, now=now)
            receipt = verifier.charge_paid(
                conn, issued.claims, paid.tool, price, args=paid.args,
                idempotency_key=f"x402_{paid.request_hash[:48]}",
                settlement=settlement.to_dict(), at=now, result=result)
            if not payments.settled(conn, paid.payment_id, call_id=receipt.receipt_id,
                                    tx_hash=transfer.tx_hash, at=now):
                raise X402NonceUsed(f"payment {paid.payment_id} was resolved by another "
                                    "server meanwhile", status="resolved")
        return receipt

    def _recover_one(self, row: payments.Payment, now: datetime) -> bool:
        terms = self.terms()
        if row.network != terms.network or row.asset != terms.asset:
            return False  # another chain's payment: a server configured for it recovers it
        if eip3009.authorization_used(self.rpc, row.asset, row.payer, row.nonce):
            tx_hash = eip3009.authorization_tx(self.rpc, row.asset, row.payer, row.nonce)
            if tx_hash is None:
                return False
            table = self.verifier.pricing_table()
            paid = _Paid(row.id, row.tenant, row.agent, row.tool, row.network, row.asset,
                         Price(row.amount, "x402.recovered", table.version), row.request_hash,
                         None)
            settlement = SettleResponse(True, tx_hash, row.network, row.payer)
            self._record(paid, self._transfer(tx_hash, terms, row.payer, row.amount), settlement,
                         None)
            logger.warning("x402 payment %s was settled in %s but not recorded: recorded now",
                           row.id, tx_hash)
            return True
        if row.valid_before > int(now.timestamp()):
            return False  # it may still be settled: leave it to a later sweep
        with writing(self._engine()) as conn:
            return payments.released(conn, row.id, at=now)


def _paying_tenant(conn: Connection, deposit: Deposit, tenant: str, now: datetime) -> str:
    """The tenant whose funds pay a settled call: ``tenant``, credited the payment here; or
    the tenant a ``wallet sync`` credited the same Transfer to first. Anyone may put a signed
    authorization on chain, the payer too, while its call runs (or before a crashed server's
    payment is recovered); a sync then credits the Transfer to the tenant the payer's address
    is linked to. The call is paid from that credit, so the payer's money pays its call once
    and is not left spendable besides."""
    recorded = find_recorded(conn, deposit)
    if recorded is not None and recorded.status == "credited" and recorded.tenant != tenant:
        return str(recorded.tenant)
    credit_deposit(conn, deposit, tenant, now)
    return tenant


@dataclass(frozen=True)
class _Paid:
    """What recording a settled payment needs (from a :class:`Verified`, or a stored row)."""

    payment_id: str
    tenant: str
    agent: str
    tool: str
    network: str
    asset: str
    price: Price
    request_hash: str
    args: Any

    @classmethod
    def of(cls, verified: Verified) -> _Paid:
        return cls(verified.payment_id, verified.tenant, verified.agent, verified.tool,
                   verified.terms.network, verified.terms.asset, verified.price,
                   verified.request_hash, verified.args)


def _terms(chain: Chain, pay_to: str, table: PricingTable) -> Terms:
    timeout = table.x402.max_timeout if table.x402 is not None else 60
    return Terms(network=chain.caip2, asset=chain.usdc, pay_to=pay_to.lower(),
                 name=chain.eip712_name, version=chain.eip712_version, max_timeout=timeout)


def _response(verified: Verified, tx_hash: str) -> SettleResponse:
    network = verified.terms.network
    if verified.signed.version == 1:
        network = verified.terms.v1_network or network
    return SettleResponse(True, tx_hash, network, verified.signed.payer)


def _with_known(verified: Verified, known: payments.Payment) -> Verified:
    return replace(verified, known=known)


def _request_hash(payment_id: str, tool: str, args: Any) -> str:
    canonical = json.dumps([payment_id, tool, args], sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()

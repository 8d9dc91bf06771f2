"""The calling agent's credit token as the payer of a downstream x402 payment.

A payment is a billed call like any other: a hold on ``token:<jti>`` for the challenge's amount
(not a table price; rule ``"x402"``), captured with a signed receipt that records the on-chain
settlement, or voided. The hold is the ledger's guarded debit, so an agent can never spend past
its token's limit or its tenant's daily cap, and its idempotency key is the payment request's id,
so a request is paid at most once: a key seen before is never signed for again.

Until :class:`~mcpbill_cli.verifier.Verifier` takes an ``amount`` (see the x402 issue), this
module holds and captures through the ledger's own call operations (``ledger.calls``) with the
verifier's keys, settings and pricing table, exactly as the verifier does for a tool call.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine

from mcpbill_cli.clock import aware, utcnow
from mcpbill_cli.errors import (
    BudgetExceeded,
    CallFailed,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidCreditToken,
    ScopeDenied,
    StatelessVerifier,
    TokenRevoked,
)
from mcpbill_cli.ledger import calls
from mcpbill_cli.ledger.credit import expire_holds
from mcpbill_cli.ledger.engine import reading, writing
from mcpbill_cli.ledger.ops import AccountClosed, token_account
from mcpbill_cli.money import format_usd
from mcpbill_cli.pricing import Price, PricingTable, daily_cap, fallback_tools, free_tools
from mcpbill_cli.receipts import Receipt, read_receipt, sign_receipt
from mcpbill_cli.scope import in_scope
from mcpbill_cli.tokens import Claims, decode_token
from mcpbill_cli.verifier import Hold, Verifier
from mcpbill_cli.x402.errors import X402AlreadyPaid

RULE = "x402"


class AgentBudget:
    """Hold, capture and void downstream payments on one agent's credit token.

    ``tool`` is the tool the payment serves (the agent's call); the token's scope must cover it.
    """

    def __init__(self, verifier: Verifier, token: str, *, tool: str) -> None:
        self.verifier = verifier
        self.token = token
        self.tool = tool
        self._claims: Claims | None = None

    @property
    def claims(self) -> Claims:
        """The token's verified claims (signature, time, audience, issuer, scope)."""
        if self._claims is None:
            v = self.verifier
            claims = decode_token(self.token, v.keys.verification_keys(), audience=v.audience,
                                  issuer=v.issuer, leeway=v.leeway, now=utcnow())
            if not in_scope(claims.scope, self.tool):
                raise ScopeDenied(f"tool {self.tool!r} is outside this token's scope "
                                  f"{list(claims.scope)}", tool=self.tool,
                                  scope=list(claims.scope))
            self._claims = claims
        return self._claims

    def remaining(self) -> int:
        """Micro-USDC the token has left (limit less spent and held), read without moving any."""
        with reading(self._ledger()) as conn:
            found = calls.available(conn, self.claims.jti)
        if found is None:
            raise InvalidCreditToken(f"token {self.claims.jti} is not in this ledger",
                                     reason="unknown_token")
        return found[0]

    def request_key(self, request: Mapping[str, Any], request_id: str | int | None) -> str:
        """The idempotency key of a payment request: the same request and id, the same key."""
        if request_id is None:
            return f"x402_rnd_{uuid.uuid4().hex}"
        digest = hashlib.sha256(f"{self._request_hash(request)}:{request_id}".encode())
        return "x402_" + digest.hexdigest()[:40]

    def hold(self, amount: int, *, key: str, request: Mapping[str, Any]) -> Hold:
        """Reserve ``amount`` micro-USDC under ``key``; refuses a key that was used before.

        Refusals: BUDGET_EXCEEDED (token limit or daily cap), TOKEN_REVOKED, SCOPE_DENIED,
        INVALID_CREDIT_TOKEN, X402_ALREADY_PAID, IDEMPOTENCY_CONFLICT (a payment for this key is
        in progress, or the key was used for another request), CALL_FAILED (it failed before).
        """
        claims, table = self.claims, self.verifier.pricing.current()
        call = self._new_call(claims, table, amount, key, request)
        now = utcnow()
        timeout_at = now + timedelta(seconds=self.verifier.hold_timeout)
        self._guarded(call, table, lambda conn: calls.hold(conn, call, at=now,
                                                           timeout_at=timeout_at))
        return Hold(call.id, claims.jti, claims.tenant, claims.agent, self.tool, amount, key,
                    timeout_at, Price(amount, RULE, table.version))

    def capture(self, hold: Hold, settlement: Mapping[str, Any]) -> Receipt:
        """Post the hold in full and sign a receipt recording the on-chain ``settlement``."""
        now = utcnow()

        def sign(posted: int, remaining: int) -> str:
            return self._receipt(hold, posted, remaining, now, settlement).jws

        try:
            with writing(self._ledger()) as conn:
                _, _, jws = calls.capture(conn, hold.id, amount=None, units=None, at=now,
                                          sign=sign)
        except calls.Replay:
            receipt = self.verifier.receipt_for(hold.id)
            if receipt is None:
                raise CallFailed(f"payment {hold.id} was captured but its receipt cannot be "
                                 "read", receiptId=hold.id) from None
            return receipt
        return read_receipt(jws)

    def void(self, hold: Hold) -> None:
        """Release the hold: the payment did not settle, nothing is charged."""
        self.verifier.void(hold)

    # --- internals ------------------------------------------------------------------------------

    def _ledger(self) -> Engine:
        if self.verifier.engine is None:
            raise StatelessVerifier("paying x402 challenges needs a ledger-backed verifier "
                                    "(Verifier.from_settings() or a db_url)")
        return self.verifier.engine

    def _request_hash(self, request: Mapping[str, Any]) -> str:
        canonical = json.dumps([self.claims.jti, self.tool, RULE, request], sort_keys=True,
                               separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def _new_call(self, claims: Claims, table: PricingTable, amount: int, key: str,
                  request: Mapping[str, Any]) -> calls.NewCall:
        return calls.NewCall(
            id=f"rcpt_{uuid.uuid4().hex[:24]}", idempotency_key=key,
            request_hash=self._request_hash(request), jti=claims.jti, tenant=claims.tenant,
            agent=claims.agent, tool=self.tool, units=None, amount=amount,
            pricing_version=table.version, price_rule=RULE, demo=self.verifier.demo,
            daily_cap=daily_cap(table, claims.tenant))

    def _guarded(self, call: calls.NewCall, table: PricingTable, step: Any) -> None:
        """Run the hold; on a refused debit: the key's earlier outcome, stale holds, a refusal."""
        for attempt in (1, 2):
            try:
                with writing(self._ledger()) as conn:
                    step(conn)
                return
            except calls.Replay:
                raise self._used_key(call) from None
            except AccountClosed:
                self._refuse_if_known(call)
                raise TokenRevoked(f"token {call.jti} has been revoked", jti=call.jti) from None
            except InsufficientFunds as exc:
                self._refuse_if_known(call)
                if "available" not in exc.details:
                    raise InvalidCreditToken(f"token {call.jti} is not in this ledger",
                                             reason="unknown_token") from None
                if attempt == 1 and self._expire_stale_holds(call.jti):
                    continue
                raise self._over_budget(call, table, int(exc.details["available"]),
                                        "token_limit") from None
            except calls.DailyCapReached as cap:
                self._refuse_if_known(call)
                raise self._over_budget(call, table, max(cap.cap - cap.spent, 0),
                                        "daily_cap") from None

    def _refuse_if_known(self, call: calls.NewCall) -> None:
        with reading(self._ledger()) as conn:
            if calls.stored(conn, key=call.idempotency_key) is not None:
                raise self._used_key(call)

    def _used_key(self, call: calls.NewCall) -> Exception:
        """Why a payment key seen before is not signed for again."""
        with reading(self._ledger()) as conn:
            stored = calls.stored(conn, key=call.idempotency_key)
        key = call.idempotency_key
        if stored is None or stored.request_hash != call.request_hash:
            return IdempotencyConflict(f"idempotency key {key!r} was used for another request; "
                                       "use a new key for a new payment", idempotencyKey=key)
        if stored.status == "captured" and stored.receipt:
            receipt = read_receipt(stored.receipt)
            return X402AlreadyPaid(
                f"this request was paid already (receipt {stored.id}, transaction "
                f"{receipt.claims.get('transaction')}); it is never paid twice: use a new key "
                "to buy it again", receiptId=stored.id, idempotencyKey=key,
                transaction=receipt.claims.get("transaction"), receipt=receipt.to_dict())
        if stored.status == "held":
            timeout = aware(stored.timeout_at) if stored.timeout_at else None
            return IdempotencyConflict(
                f"a payment for this request (key {key!r}) is in progress; it is never signed "
                "twice", idempotencyKey=key, receiptId=stored.id,
                timeoutAt=timeout.isoformat() if timeout else None)
        return CallFailed(f"the payment with idempotency key {key!r} failed ({stored.status}) "
                          "and stays failed; retry with a new key", idempotencyKey=key,
                          status=stored.status)

    def _expire_stale_holds(self, jti: str) -> int:
        with writing(self._ledger()) as conn:
            return expire_holds(conn, now=utcnow(), account=token_account(jti))

    def _over_budget(self, call: calls.NewCall, table: PricingTable, remaining: int,
                     reason: str) -> BudgetExceeded:
        scope = list(self.claims.scope)
        where = ("this token has" if reason == "token_limit"
                 else f"tenant {call.tenant}'s daily cap leaves")
        return BudgetExceeded(
            f"the x402 payment costs {format_usd(call.amount)} USDC but {where} "
            f"{format_usd(remaining)} left; nothing was signed",
            reason=reason, tool=self.tool, jti=call.jti, priceUsd=format_usd(call.amount),
            remainingUsd=format_usd(remaining),
            shortfallUsd=format_usd(call.amount - remaining),
            fallback={
                "tools": [{"tool": name, "priceUsd": format_usd(price)} for name, price in
                          fallback_tools(table, call.tenant, scope, remaining)],
                "freeTools": free_tools(table, call.tenant, scope),
                "moreCredit": f"ask the operator for a new credit token for tenant "
                              f"{call.tenant} (mcpbill token issue --limit AMOUNT)"})

    def _receipt(self, hold: Hold, amount: int, remaining: int, at: datetime,
                 settlement: Mapping[str, Any]) -> Receipt:
        signer = self.verifier.keys.signer()
        if signer is None:
            raise StatelessVerifier("no signing key: receipts need the operator's key ring")
        info, key = signer
        claims = {
            "success": True, "transaction": settlement["transaction"],
            "network": settlement["network"], "payer": hold.agent, "amount": str(amount),
            "receiptId": hold.id, "tool": hold.tool, "amountUsd": format_usd(amount),
            "asset": "USDC", "jti": hold.jti, "tenant": hold.tenant,
            "idempotencyKey": hold.idempotency_key, "remainingUsd": format_usd(remaining),
            "pricingVersion": hold.price.version, "priceRule": RULE,
            "demo": self.verifier.demo, "timestamp": at.isoformat().replace("+00:00", "Z"),
            "settlement": dict(settlement),
        }
        return sign_receipt(claims, kid=info.kid, alg=info.alg, key=key)

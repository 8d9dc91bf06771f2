"""httpx transports that pay x402 challenges within the calling agent's budget.

    budget = AgentBudget(verifier, agent_token, tool="search")
    payer = X402Payer(budget, load_account(keystore, password), policy, request_id=mcp_id)
    with httpx.Client(transport=X402Transport(payer)) as http:
        response = http.get("https://api.example.com/report")
    outcome = payment_of(response)          # challenge, choice, settlement, receipt (or None)

On a 402 the transport reads the challenge, chooses an option the policy allows, holds its
amount on the agent's token (the idempotency key is the request's id), signs an EIP-3009
authorization and retries once with the payment header. A settlement the server reports done
captures the hold (the receipt records the transaction), even on an error status for the
resource itself; anything else voids it and raises ``X402_SETTLEMENT_FAILED``. Refusals come
before the hold or the signature whenever they can.
If the paid retry itself fails in transit the hold is kept: the outcome is unknown, the key stays
taken (never signed again) and the hold voids itself at its timeout, after the authorization has
expired.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from mcpbill_cli.receipts import Receipt
from mcpbill_cli.verifier import Hold
from mcpbill_cli.x402.billing import AgentBudget
from mcpbill_cli.x402.errors import X402BadChallenge, X402SettlementFailed
from mcpbill_cli.x402.policy import Choice, PaymentPolicy, choose
from mcpbill_cli.x402.signing import TypedDataSigner, sign_authorization
from mcpbill_cli.x402.wire import (
    Challenge,
    Settlement,
    is_tx_hash,
    parse_challenge,
    parse_settlement,
    payment_header,
)

OUTCOME = "mcpbill.x402"  # the response extension that carries a PaymentOutcome
IDEMPOTENCY_KEY = "mcpbill.x402.idempotency_key"  # a request extension: this request's key
VALID_AFTER_SKEW = 600  # seconds: tolerate a payer clock ahead of the chain's
EXPIRY_MARGIN = 30  # seconds: the authorization expires this long before the hold does


@dataclass(frozen=True)
class PendingPayment:
    """A signed payment on its way: the hold, the paid request, what was chosen and why."""

    challenge: Challenge
    choice: Choice
    hold: Hold
    request: httpx.Request


@dataclass(frozen=True)
class PaymentOutcome:
    """What a paid request cost: attached to its response (``payment_of``)."""

    challenge: Challenge
    choice: Choice
    settlement: Settlement
    receipt: Receipt

    def to_dict(self) -> dict[str, Any]:
        return {"challenge": self.challenge.to_dict(), "chosen": self.choice.offer.index,
                "settlement": self.settlement.to_dict(), "receipt": self.receipt.to_dict()}


def payment_of(response: httpx.Response) -> PaymentOutcome | None:
    """The payment behind ``response``, or ``None`` when it needed none."""
    outcome = response.extensions.get(OUTCOME)
    return outcome if isinstance(outcome, PaymentOutcome) else None


class X402Payer:
    """The payment steps, shared by the sync and async transports (no I/O of its own)."""

    def __init__(self, budget: AgentBudget, signer: TypedDataSigner, policy: PaymentPolicy, *,
                 request_id: str | int | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.budget = budget
        self.signer = signer
        self.policy = policy
        self.request_id = request_id
        self._clock = clock

    def prepare(self, request: httpx.Request, headers: httpx.Headers,
                body: bytes) -> PendingPayment:
        """From a 402's headers and body: choose, hold, sign. Refusals come before signing."""
        challenge = parse_challenge(headers, body)
        choice = choose(challenge, self.policy)
        described = describe(request)
        key = request.extensions.get(IDEMPOTENCY_KEY) or self.budget.request_key(
            described, self.request_id)
        hold = self.budget.hold(choice.amount, key=str(key), request=described)
        try:
            paid = self._paid_request(request, challenge, choice, hold)
        except BaseException:
            self.budget.void(hold)
            raise
        return PendingPayment(challenge, choice, hold, paid)

    def finish(self, pending: PendingPayment, status: int, headers: httpx.Headers,
               body: bytes = b"") -> PaymentOutcome:
        """Capture on a confirmed settlement; otherwise void and raise X402_SETTLEMENT_FAILED.

        ``body`` matters for a 402 only: a v1 server says there why it refused the payment.
        """
        settlement = parse_settlement(headers, pending.challenge)
        problem = self._settlement_problem(pending, status, settlement)
        if problem is None and settlement is not None:
            receipt = self.budget.capture(pending.hold,
                                          self._settlement_record(pending, settlement))
            return PaymentOutcome(pending.challenge, pending.choice, settlement, receipt)
        self.budget.void(pending.hold)
        reason = (settlement.error_reason if settlement else None) or (
            _refusal_reason(headers, body) if status == 402 else None)
        raise X402SettlementFailed(
            f"the payment was not settled ({problem}{f': {reason}' if reason else ''}); the "
            "hold is released and nothing is charged", status=status, reason=problem,
            errorReason=reason, idempotencyKey=pending.hold.idempotency_key)

    def _paid_request(self, request: httpx.Request, challenge: Challenge, choice: Choice,
                      hold: Hold) -> httpx.Request:
        now = int(self._clock())
        expires = int(hold.timeout_at.timestamp()) - EXPIRY_MARGIN if hold.timeout_at else now
        valid_before = min(now + choice.requirement.max_timeout, expires)
        payload = sign_authorization(self.signer, choice, valid_after=now - VALID_AFTER_SKEW,
                                     valid_before=valid_before)
        headers = httpx.Headers(request.headers)
        headers[challenge.payment_header] = payment_header(challenge, choice.offer, payload)
        return httpx.Request(request.method, request.url, headers=headers,
                             content=request.content, extensions=request.extensions)

    @staticmethod
    def _settlement_problem(pending: PendingPayment, status: int,
                            settlement: Settlement | None) -> str | None:
        if settlement is None:
            return f"HTTP {status} without a readable {pending.challenge.response_header}"
        if not settlement.success:
            return "the server reports a failed settlement"
        # A settlement the server reports done is captured whatever the status: the money
        # moved (a 5xx for the resource does not bring it back), so it counts in the budget.
        if not is_tx_hash(settlement.transaction):
            return f"the settlement names no transaction hash ({settlement.transaction!r})"
        return None

    def _settlement_record(self, pending: PendingPayment,
                           settlement: Settlement) -> dict[str, Any]:
        """What the receipt says of the settlement: where, which transaction, to whom."""
        req = pending.choice.requirement
        resource = pending.challenge.resource
        return {"x402Version": pending.challenge.version, "network": req.network,
                "transaction": settlement.transaction.lower(),
                "payer": self.signer.address.lower(), "payTo": req.pay_to, "asset": req.asset,
                "amount": str(req.amount),
                "resource": str(resource.get("url")) if resource else str(pending.request.url)}


def _refusal_reason(headers: httpx.Headers, body: bytes) -> str | None:
    """Why a server answered a payment with another 402 (the new challenge's ``error``)."""
    try:
        return parse_challenge(headers, body).error
    except X402BadChallenge:
        return None


def describe(request: httpx.Request) -> dict[str, Any]:
    """The parts of a request that identify it: method, URL and a digest of the body."""
    return {"method": request.method, "url": str(request.url),
            "body": hashlib.sha256(request.content).hexdigest()}


class X402Transport(httpx.BaseTransport):
    """A sync httpx transport that pays 402 challenges through ``payer``."""

    def __init__(self, payer: X402Payer, transport: httpx.BaseTransport | None = None) -> None:
        self.payer = payer
        self.transport = transport or httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()  # the body is sent twice when a payment is needed
        response = self.transport.handle_request(request)
        if response.status_code != 402:
            return response
        try:
            body = response.read()
        finally:
            response.close()
        pending = self.payer.prepare(request, response.headers, body)
        paid = self.transport.handle_request(pending.request)
        try:
            body = paid.read() if paid.status_code == 402 else b""
            paid.extensions = {**paid.extensions, OUTCOME: self.payer.finish(
                pending, paid.status_code, paid.headers, body)}
        except BaseException:
            paid.close()
            raise
        return paid

    def close(self) -> None:
        self.transport.close()


class AsyncX402Transport(httpx.AsyncBaseTransport):
    """The async twin of :class:`X402Transport`; ledger steps run in a worker thread."""

    def __init__(self, payer: X402Payer,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.payer = payer
        self.transport = transport or httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        from anyio import to_thread

        await request.aread()
        response = await self.transport.handle_async_request(request)
        if response.status_code != 402:
            return response
        try:
            body = await response.aread()
        finally:
            await response.aclose()
        pending = await to_thread.run_sync(self.payer.prepare, request, response.headers, body)
        paid = await self.transport.handle_async_request(pending.request)
        try:
            body = await paid.aread() if paid.status_code == 402 else b""
            outcome = await to_thread.run_sync(self.payer.finish, pending, paid.status_code,
                                               paid.headers, body)
        except BaseException:
            await paid.aclose()
            raise
        paid.extensions = {**paid.extensions, OUTCOME: outcome}
        return paid

    async def aclose(self) -> None:
        await self.transport.aclose()

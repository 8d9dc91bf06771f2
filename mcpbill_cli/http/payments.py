"""x402 payments on billed HTTP routes, through the core of :mod:`mcpbill_cli.x402.accept`.

- the challenge: status 402, the v2 ``PaymentRequired`` as base64 JSON in ``PAYMENT-REQUIRED``,
  and the v1 form as the JSON body (``{"x402Version": 1, "accepts": [...], "error"}``) merged
  with mcpbill's refusal fields, so that v1 and v2 clients can both pay;
- the payment: ``PAYMENT-SIGNATURE`` (v2) or ``X-PAYMENT`` (v1), verified and reserved before
  the endpoint runs, settled after a 2xx and before any of it is sent (a failed settlement
  withholds the response: 402 with the failure), then recorded in the ledger;
- the answer: the settlement in ``PAYMENT-RESPONSE`` (v1: ``X-PAYMENT-RESPONSE``), base64 JSON,
  beside the receipt in ``Mcpbill-Receipt``.

Every step of the core blocks (the chain, the ledger): each runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from mcpbill_cli.errors import BillingError, DuplicateCall, ResponseTooLarge
from mcpbill_cli.http.asgi import BufferedRequest, BufferedResponse
from mcpbill_cli.http.wire import receipt_header, refusal, replayed_header
from mcpbill_cli.x402.accept import Acceptor, Replayed, Reserved

logger = logging.getLogger("mcpbill")

PAYMENT_REQUIRED = "payment-required"
PAYMENT_SIGNATURE = "payment-signature"
PAYMENT_RESPONSE = "payment-response"
X_PAYMENT = "x-payment"
X_PAYMENT_RESPONSE = "x-payment-response"

Headers = list[tuple[bytes, bytes]]
Run = Callable[[], Awaitable[BufferedResponse]]


@dataclass(frozen=True)
class Payment:
    """A payment header as sent: its base64 text and its protocol version."""

    header: str
    version: int

    @classmethod
    def of(cls, request: BufferedRequest) -> Payment | None:
        v2 = request.header(PAYMENT_SIGNATURE)
        if v2 is not None:
            return cls(v2, 2)
        v1 = request.header(X_PAYMENT)
        return cls(v1, 1) if v1 is not None else None

    @property
    def response_header(self) -> bytes:
        return (PAYMENT_RESPONSE if self.version >= 2 else X_PAYMENT_RESPONSE).encode()


class _Paid(NamedTuple):
    """One paid request: its payment, the tool, the URL it pays for, the tenant it books."""

    payment: Payment
    tool: str
    url: str
    tenant: str | None


class X402Gate:
    """The x402 side of the middleware for one :class:`~mcpbill_cli.x402.accept.Acceptor`."""

    def __init__(self, acceptor: Acceptor) -> None:
        self.acceptor = acceptor

    @staticmethod
    def payment_of(request: BufferedRequest) -> Payment | None:
        """The request's payment header, if it sent one (v2 first)."""
        return Payment.of(request)

    async def challenge(self, error: BillingError, tool: str, url: str,
                        extra: Headers | None = None, *,
                        tenant: str | None = None) -> BufferedResponse:
        """``error`` as a 402 that also asks for an x402 payment of ``tool`` (both versions) at
        ``tenant``'s price (the anonymous one without); the plain refusal when x402 is not
        offered for it."""
        v2, v1 = await asyncio.to_thread(self._documents, tool, url, error.agent_message, tenant)
        if v2 is None or v1 is None:
            response = refusal(error)
        else:
            response = refusal(error, status=402, fields=v1,
                               headers={PAYMENT_REQUIRED: _b64_json(v2)})
        response.headers.extend(extra or [])
        return response

    async def pay(self, payment: Payment, tool: str, request: BufferedRequest, run: Run, *,
                  tenant: str | None = None, agent: str | None = None
                  ) -> tuple[BufferedResponse, Headers]:
        """One paid request: verify and reserve, run, settle, record (module docstring);
        booked to ``tenant`` and ``agent`` (a credit token's) when given, else to the
        ``[x402] tenant`` and the payer."""
        paid = _Paid(payment, tool, request.url, tenant)
        try:
            opened = await asyncio.to_thread(self._open, paid, request, agent)
        except BillingError as error:  # a payment refused asks for a new one; the rest is not
            self._ended(tool, "refused", code=error.code)
            if error.code.startswith("X402_"):
                return await self.challenge(error, tool, paid.url, tenant=tenant), []
            return refusal(error), []
        if isinstance(opened, Replayed):  # settled before for this request: do not run again
            self._ended(tool, "replayed", amount=opened.receipt.amount)
            return _replayed(opened, payment)
        return await self._run(opened, paid, run)

    # --- steps ----------------------------------------------------------------------------------

    def _documents(self, tool: str, url: str, message: str, tenant: str | None
                   ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        acceptor = self.acceptor
        return (acceptor.payment_required(tool, tenant, resource=url, error=message),
                acceptor.payment_required(tool, tenant, version=1, resource=url,
                                          error=message))

    def _open(self, paid: _Paid, request: BufferedRequest, agent: str | None
              ) -> Reserved | Replayed:
        verified = self.acceptor.verify(paid.payment.header, paid.tool,
                                        args=request.arguments(), tenant=paid.tenant,
                                        agent=agent, resource=paid.url)
        return self.acceptor.reserve(verified)

    async def _run(self, opened: Reserved, paid: _Paid, run: Run
                   ) -> tuple[BufferedResponse, Headers]:
        """Run the endpoint on a reserved payment: settle and record a 2xx, release the rest."""
        payment, tool, url, tenant = paid
        try:
            response = await run()
        except BaseException:  # cut off (the client went, the server stops): not paid
            await self._release(opened)
            self._ended(tool, "voided")
            raise
        if not response.succeeded:
            await self._release(opened)
            self._ended(tool, "voided")
            if response.too_large:
                return refusal(ResponseTooLarge(
                    "the endpoint answered with more than the middleware holds back; the "
                    "payment was not settled", tool=tool)), []
            return response, []
        try:
            settlement, receipt = await asyncio.to_thread(  # goes on for a request cut off
                self.acceptor.pay_for, opened, tool, result=response.to_json())
        except BillingError as error:  # not settled: the endpoint's output is withheld
            failure = {"success": False, "errorReason": error.code, "transaction": "",
                       "network": opened.verified.requirement["network"],
                       "payer": opened.verified.signed.payer}
            return await self.challenge(error, tool, url, [
                (payment.response_header, _b64_json(failure).encode())], tenant=tenant), []
        headers = [(payment.response_header, _b64_json(settlement.to_dict()).encode())]
        if receipt is None:  # settled: the payer gets what it paid for
            return response, headers
        return response, [*headers, receipt_header(receipt)]

    def _ended(self, tool: str, outcome: str, *, amount: int | None = None,
               code: str | None = None) -> None:
        """Count the request in the verifier's metrics and its span, where they are on."""
        self.acceptor.call_ended(tool, outcome, amount=amount, code=code)

    async def _release(self, opened: Reserved) -> None:
        try:
            await asyncio.shield(asyncio.to_thread(self.acceptor.release, opened))
        except BillingError as failure:  # left reserved: Acceptor.recover() releases it
            logger.warning("could not release x402 payment %s: %s",
                           opened.verified.payment_id, failure.message)


def _replayed(opened: Replayed, payment: Payment) -> tuple[BufferedResponse, Headers]:
    """A payment settled for this very request before: the kept response, its receipt and
    settlement; DUPLICATE_CALL with the receipt when no response was kept (too large to keep,
    or recorded by ``Acceptor.recover()`` after the server that ran it failed)."""
    kept = BufferedResponse.from_json(opened.result) if opened.result is not None else None
    headers = [(payment.response_header, _b64_json(opened.settlement.to_dict()).encode()),
               receipt_header(opened.receipt)]
    if kept is None:
        return refusal(DuplicateCall(
            f"this request was paid and answered already (receipt "
            f"{opened.receipt.receipt_id}); its response was not kept (too large to keep, or "
            "recorded after its server failed)",
            receipt=opened.receipt)), headers
    return kept, [*headers, replayed_header()]


def _b64_json(document: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(document, separators=(",", ":")).encode()).decode()

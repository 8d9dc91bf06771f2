"""Refunding a captured call, top to bottom: check the request, move the money back on the
ledger (:mod:`mcpbill_cli.ledger.refunds`), sign the refund receipt, record it; one
transaction. :meth:`Verifier.refund <mcpbill_cli.verifier.Verifier.refund>` and
``mcpbill refund`` both come here.

Refunds of a call are repeatable up to its charge and never beyond (the ledger's conditional
UPDATE of the call's row), idempotent per key (the tenant's: the same key and request return
the first refund's receipt, moving nothing; another request under it is IDEMPOTENCY_CONFLICT).

Imports neither typer nor rich nor web3; never prints and never exits.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import Engine

from mcpbill_cli.clock import utcnow
from mcpbill_cli.errors import (
    BillingError,
    CallInProgress,
    CallNotCaptured,
    IdempotencyConflict,
    InvalidInput,
    NotFound,
    RefundExceedsCharge,
)
from mcpbill_cli.keys import KeyInfo
from mcpbill_cli.ledger import refunds
from mcpbill_cli.ledger.engine import writing
from mcpbill_cli.money import format_usd, whole_micro
from mcpbill_cli.receipts import RefundReceipt, read_refund_receipt, sign_refund_receipt

MAX_TEXT = 200  # a receipt id, an idempotency key
MAX_REASON = 500  # a reason, signed into the receipt
ATTEMPTS = 4  # "everything left" racing other refunds, or a key taken meanwhile: ask again
RETRY_AFTER_MS = 1000


def refund(engine: Engine, signer: tuple[KeyInfo, Any], receipt_id: str, *,
           amount: int | None = None, reason: str | None = None,
           idempotency_key: str | None = None, network: str = "mcpbill:ledger",
           clock: Callable[[], datetime] = utcnow) -> RefundReceipt:
    """Refund ``amount`` micro-USDC (None: all that is left) of the call ``receipt_id``.

    The money goes back to the call's token while it is active, else to its tenant. An
    unknown receipt is NOT_FOUND; a call that charged nothing, CALL_NOT_CAPTURED; more than
    is left, REFUND_EXCEEDS_CHARGE. A refusal moves nothing.
    """
    request = refunds.RefundRequest(
        _text(receipt_id, "receipt_id", MAX_TEXT),
        None if amount is None else whole_micro(amount, "a refund amount"),
        None if reason is None else _text(reason, "reason", MAX_REASON),
        None if idempotency_key is None else _text(idempotency_key, "idempotency_key",
                                                   MAX_TEXT))
    for _ in range(ATTEMPTS):
        done = _attempt(engine, signer, request, network, clock())
        if done is not None:
            return done
    raise CallInProgress(  # every attempt met another refund of the call
        f"other refunds of {receipt_id} kept changing what is left to refund; retry",
        receiptId=receipt_id, retryAfterMs=RETRY_AFTER_MS)


def _attempt(engine: Engine, signer: tuple[KeyInfo, Any], request: refunds.RefundRequest,
             network: str, now: datetime) -> RefundReceipt | None:
    """One transaction: the refund receipt, or None to ask again."""
    with writing(engine) as conn:
        opened = refunds.open_refund(conn, request, at=now)
        match opened:
            case refunds.Earlier(refund=earlier):
                return _earlier(earlier, request)
            case refunds.Refused(reason="raced"):
                conn.rollback()
                return None
            case refunds.Refused():
                raise _refused(request, opened)
        receipt = _sign(signer, opened, request, network, now)
        if not refunds.record(conn, opened, request, at=now, receipt=receipt.jws):
            conn.rollback()  # the key was taken meanwhile: its refund is the answer
            return None
        return receipt


def _sign(signer: tuple[KeyInfo, Any], opened: refunds.Opened, request: refunds.RefundRequest,
          network: str, at: datetime) -> RefundReceipt:
    info, key = signer
    claims = {
        "success": True, "kind": "refund", "refundId": opened.id, "receiptId": opened.call_id,
        "transaction": opened.transfer_id, "network": network, "payer": opened.agent,
        "amount": str(opened.amount), "amountUsd": format_usd(opened.amount), "asset": "USDC",
        "chargedUsd": format_usd(opened.charged),
        "refundedUsd": format_usd(opened.refunded_after),
        "refundableUsd": format_usd(opened.refundable), "creditedTo": opened.credited_to,
        "reason": request.reason, "jti": opened.jti, "tenant": opened.tenant,
        "tool": opened.tool, "idempotencyKey": request.idempotency_key, "demo": opened.demo,
        "timestamp": at.isoformat().replace("+00:00", "Z"),
    }
    return sign_refund_receipt(claims, kid=info.kid, alg=info.alg, key=key)


def _earlier(earlier: refunds.StoredRefund, request: refunds.RefundRequest) -> RefundReceipt:
    """The refund the key made already, when this is the same request."""
    if not earlier.same_request(request):
        asked = ("everything left" if earlier.requested is None
                 else f"{format_usd(earlier.requested)} USDC")
        raise IdempotencyConflict(
            f"idempotency key {request.idempotency_key!r} already refunded {asked} of "
            f"{earlier.call_id}; use a new key for another refund",
            idempotencyKey=request.idempotency_key, receiptId=earlier.call_id,
            amountUsd=format_usd(earlier.amount))
    return read_refund_receipt(earlier.receipt, replayed=True)


def _refused(request: refunds.RefundRequest, refused: refunds.Refused) -> BillingError:
    call = request.call_id
    if refused.reason == "unknown":
        return NotFound(f"no call with receipt id {call!r}; `mcpbill receipt show KEY` finds "
                        "a call's receipt by its idempotency key", receiptId=call)
    if refused.reason == "not_captured":
        what = "was captured for 0" if refused.status == "captured" else f"is {refused.status}"
        return CallNotCaptured(f"call {call} {what}: it charged nothing to refund",
                               receiptId=call, status=refused.status)
    asked = ("everything left" if request.amount is None
             else f"{format_usd(request.amount)} USDC")
    return RefundExceedsCharge(
        f"cannot refund {asked} of {call}: {format_usd(refused.refundable)} USDC of its "
        f"{format_usd(refused.charged)} USDC charge is left to refund; nothing was refunded",
        receiptId=call, chargedUsd=format_usd(refused.charged),
        refundableUsd=format_usd(refused.refundable))


def _text(value: Any, name: str, limit: int) -> str:
    if not (isinstance(value, str) and 0 < len(value) <= limit and value.isprintable()):
        raise InvalidInput(f"{name} is printable text of 1 to {limit} characters", field=name)
    return value

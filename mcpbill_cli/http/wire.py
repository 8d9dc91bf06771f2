"""The HTTP wire shapes of billing: header names, and a refusal as an HTTP response.

- the credit token comes in ``Mcpbill-Token`` (never ``Authorization``: that header belongs to
  the application's own authentication);
- ``Idempotency-Key`` is the verifier's explicit key; without one the verifier derives a key
  from the token and the request (method, path, query, body) within the tool's dedupe window;
- a billed success carries its signed receipt (the compact JWS) in ``Mcpbill-Receipt``; a replay
  also carries ``Mcpbill-Replayed: true``;
- a refusal is a JSON body, mcpbill's error object (``{"code", "message", ...}``), with the
  status of :data:`STATUS`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from mcpbill_cli.errors import BillingError
from mcpbill_cli.http.asgi import BufferedResponse
from mcpbill_cli.receipts import Receipt

TOKEN_HEADER = "Mcpbill-Token"  # noqa: S105 - a header name, not a secret
RECEIPT_HEADER = "Mcpbill-Receipt"
REPLAYED_HEADER = "Mcpbill-Replayed"
IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"

# The status of each refusal; any other code is 500 (a server-side problem).
STATUS: dict[str, int] = {
    "INVALID_INPUT": 400,
    "INVALID_CREDIT_TOKEN": 401,
    "BUDGET_EXCEEDED": 402,
    "TOKEN_REVOKED": 403,
    "SCOPE_DENIED": 403,
    "IDEMPOTENCY_CONFLICT": 409,
    "CALL_IN_PROGRESS": 409,
    "CALL_FAILED": 409,
    "DUPLICATE_CALL": 409,
    "REQUEST_TOO_LARGE": 413,
    "RATE_LIMITED": 429,
    "RESPONSE_TOO_LARGE": 500,
    "HOLD_NOT_ACTIVE": 503,
    "LEDGER_UNAVAILABLE": 503,
    "LEDGER_FULL": 503,
    "X402_PAYMENT_INVALID": 402,
    "X402_NONCE_USED": 402,
    "X402_INSUFFICIENT_FUNDS": 402,
    "X402_SETTLEMENT_FAILED": 402,
    "X402_FACILITATOR_UNAVAILABLE": 503,
}
RETRY_AFTER_SECONDS = 1  # what a 503 suggests: the ledger is usually back within a second


def status_of(error: BillingError) -> int:
    return STATUS.get(error.code, 500)


def refusal(error: BillingError, *, status: int | None = None,
            headers: Mapping[str, str] | None = None,
            fields: Mapping[str, Any] | None = None) -> BufferedResponse:
    """``error`` as a JSON response: its ``for_agent()`` (under ``fields``, which it overrides:
    an x402 v1 challenge's), ``status`` (else :func:`status_of`), and a ``Retry-After`` where
    a retry can succeed."""
    status = status or status_of(error)
    body = json.dumps({**(fields or {}), **error.for_agent()}, default=str).encode()
    extra = {"content-type": "application/json", "content-length": str(len(body)),
             **{name.lower(): value for name, value in (headers or {}).items()}}
    retry = _retry_after(error, status)
    if retry is not None:
        extra["retry-after"] = str(retry)
    return BufferedResponse(status, [(k.encode("latin-1"), v.encode("latin-1"))
                                     for k, v in extra.items()], bytearray(body))


def _retry_after(error: BillingError, status: int) -> int | None:
    millis = error.details.get("retryAfterMs")
    if isinstance(millis, int) and not isinstance(millis, bool) and millis > 0:
        return math.ceil(millis / 1000)
    return RETRY_AFTER_SECONDS if status == 503 else None


def receipt_header(receipt: Receipt) -> tuple[bytes, bytes]:
    """``Mcpbill-Receipt``: the receipt's compact JWS."""
    return RECEIPT_HEADER.lower().encode(), receipt.jws.encode("ascii")


def replayed_header() -> tuple[bytes, bytes]:
    return REPLAYED_HEADER.lower().encode(), b"true"

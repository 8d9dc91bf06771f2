"""The MCP wire shapes of billing (DESIGN.md "MCP wire shapes", after x402's v2 MCP transport).

- the credit token comes from ``_meta["dev.mcpbill/token"]`` on the call, else the HTTP
  ``Authorization: Bearer`` header, else (stdio and in-process only) ``AGENT_CREDIT_JWT``;
- an explicit idempotency key may come in ``_meta["dev.mcpbill/idempotencyKey"]``; without one,
  the verifier derives the key from the call (token, tool, arguments) within the tool's dedupe
  window, never from the JSON-RPC request id or a session (MCP 2026-07-28 has no sessions,
  and a client re-sends a call with a new request id);
- the receipt goes back in the result's ``_meta["dev.mcpbill/receipt"]``; a replay returns the
  first run's result, marked ``_meta["dev.mcpbill/replayed"]``;
- a refusal is a tool result with ``isError: true``, the error object in ``structuredContent``
  and the same JSON in ``content[0].text``;
- each tool's price is advertised in its ``_meta["dev.mcpbill/price"]`` in ``tools/list``;
- the keys an agent sends are also read under their names before 0.2 (``mcpbill/token``,
  ``mcpbill/idempotencyKey``), which are never written; they go away in 0.2.0.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from mcp_types import CallToolResult, TextContent

from mcpbill_cli.config import ENV_TOKEN
from mcpbill_cli.errors import BillingError, DuplicateCall, InvalidCreditToken, InvalidInput
from mcpbill_cli.receipts import Receipt
from mcpbill_cli.verifier import MAX_KEY_LENGTH

# MCP 2026-07-28 names `_meta` keys (and extension identifiers) with a reverse-DNS prefix, and
# reserves every prefix whose second label is `mcp` or `modelcontextprotocol`. Ours is mcpbill.dev
# reversed: its second label is `mcpbill`, a name of our own, so nothing the protocol adds later
# can collide with it. The extension identifier and every key share it.
PREFIX = "dev.mcpbill/"
EXTENSION_ID = PREFIX + "billing"
TOKEN_META = PREFIX + "token"
RECEIPT_META = PREFIX + "receipt"
PRICE_META = PREFIX + "price"
IDEMPOTENCY_KEY_META = PREFIX + "idempotencyKey"
REPLAYED_META = PREFIX + "replayed"
# The keys an agent sent before the prefix: read after the new ones, never written; gone in 0.2.0.
LEGACY_META = {TOKEN_META: "mcpbill/token", IDEMPOTENCY_KEY_META: "mcpbill/idempotencyKey"}


def credit_token(meta: Mapping[str, Any] | None, request: Any, *, bearer: bool = True) -> str:
    """The call's credit token, or INVALID_CREDIT_TOKEN (reason ``missing``) when there is none.

    ``request`` is the HTTP request of an HTTP transport (``None`` on stdio and in process).
    An HTTP server never falls back to its own environment: that would bill every anonymous
    caller to whatever token the server process happens to hold.
    """
    token = _meta_text(meta, TOKEN_META)
    if token is None and request is not None and bearer:
        token = _bearer(request)
    if token is None and request is None:
        token = os.environ.get(ENV_TOKEN) or None
    if token is None:
        raise InvalidCreditToken(
            f"no credit token: send one in _meta[{TOKEN_META!r}], as Authorization: Bearer "
            f"(HTTP), or in {ENV_TOKEN} (stdio); ask the operator for one with "
            "`mcpbill token issue`", reason="missing")
    return token


def idempotency_key(meta: Mapping[str, Any] | None) -> str | None:
    """The agent's own idempotency key for this call, if it sent one."""
    key = _meta_text(meta, IDEMPOTENCY_KEY_META)
    if key is not None and len(key) > MAX_KEY_LENGTH:
        raise InvalidInput(f"_meta[{IDEMPOTENCY_KEY_META!r}] is longer than {MAX_KEY_LENGTH} "
                           "characters", field=IDEMPOTENCY_KEY_META)
    return key


def client_address(request: Any) -> str:
    """The HTTP client's address, where a transport has one ("" on stdio and in process)."""
    client = getattr(request, "client", None)
    host = getattr(client, "host", None)
    return host if isinstance(host, str) else ""


def refusal(error: BillingError) -> CallToolResult:
    """The x402-style refusal: ``isError``, the error object, and the same JSON as text."""
    text = json.dumps(error.to_dict(), default=str)
    return CallToolResult(content=[TextContent(type="text", text=text)],
                          structured_content=json.loads(text), is_error=True)


def with_receipt(result: CallToolResult, receipt: Receipt) -> CallToolResult:
    """``result`` with the signed receipt added to its ``_meta``."""
    meta = {**(result.meta or {}), RECEIPT_META: receipt.to_dict()}
    return result.model_copy(update={"meta": meta})


def kept_result(result: CallToolResult) -> str:
    """The result as the agent gets it (before the receipt is added), kept for replays."""
    return result.model_dump_json(by_alias=True, exclude_none=True)


def replayed(receipt: Receipt, kept: str | None) -> CallToolResult:
    """A replay's answer: the first run's ``kept`` result with its receipt, marked as a replay;
    DUPLICATE_CALL with the receipt when no result was kept (it was over the size cap)."""
    if kept is None:
        return refusal(DuplicateCall(
            f"this call was made already (receipt {receipt.receipt_id}) and its result was too "
            "large to keep; it is not run or billed again", receipt=receipt))
    first = CallToolResult.model_validate_json(kept)
    meta = {**(first.meta or {}), REPLAYED_META: True, RECEIPT_META: receipt.to_dict()}
    return first.model_copy(update={"meta": meta})


def succeeded(result: object) -> bool:
    """A finished, successful tool result: the only kind that is billed.

    Error results and multi-round ``input_required`` interim results are not: the final round
    of a multi-round call is billed when it completes.
    """
    return isinstance(result, CallToolResult) and not result.is_error


def _meta_text(meta: Mapping[str, Any] | None, key: str) -> str | None:
    """``meta[key]``, else the same value under its name before 0.2 (``None``: neither)."""
    value = (meta or {}).get(key)
    if (value is None or value == "") and key in LEGACY_META:
        key = LEGACY_META[key]
        value = (meta or {}).get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidInput(f"_meta[{key!r}] must be a string, not {type(value).__name__}",
                           field=key)
    return value


def _bearer(request: Any) -> str | None:
    headers = getattr(request, "headers", None)
    if not isinstance(headers, Mapping):
        return None
    scheme, _, value = str(headers.get("authorization", "")).partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None

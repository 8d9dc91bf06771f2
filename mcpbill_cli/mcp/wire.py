"""The MCP wire shapes of billing (DESIGN.md "MCP wire shapes", after x402's v2 MCP transport).

- the credit token comes from ``_meta["dev.mcpbill/token"]`` on the call, else (only where
  mcpbill is the server's authorization) the HTTP ``Authorization: Bearer`` header, else
  (stdio and in-process only) ``AGENT_CREDIT_JWT``;
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

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import anyio
from mcp.server.caching import CacheHint
from mcp.server.context import CallNext, HandlerResult, ServerMiddleware, ServerRequestContext
from mcp_types import (
    CallToolRequestParams,
    CallToolResult,
    InputRequiredResult,
    Result,
    TextContent,
)
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from mcpbill_cli.config import ENV_TOKEN, Settings, canonical_resource
from mcpbill_cli.errors import BillingError, DuplicateCall, InvalidCreditToken, InvalidInput
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.receipts import Receipt
from mcpbill_cli.tokens import peek_audience
from mcpbill_cli.tracing import step
from mcpbill_cli.verifier import MAX_KEY_LENGTH, Hold, Verifier

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
ROUND_DIGEST = 16  # hex characters of a multi-round call's answers in its round's key
# How long a client may keep a tools/list (prices included) before it asks again: prices change
# only when the operator edits the table, and a call is charged at the price in force anyway.
LIST_TTL_MS = 60_000

logger = logging.getLogger("mcpbill")


def credit_token(meta: Mapping[str, Any] | None, request: Any, *,
                 resource: str | None = None) -> str:
    """The call's credit token, or INVALID_CREDIT_TOKEN (reason ``missing``) when there is none.

    ``request`` is the HTTP request of an HTTP transport (``None`` on stdio and in process).
    ``Authorization: Bearer`` is read only where mcpbill is the server's authorization, whose
    canonical URI is ``resource``: as MCP's authorization spec requires, a token there must
    have been issued to that URI (RFC 8707), and one issued to anyone else is refused
    (``wrong_audience``), never passed on. Otherwise the header belongs to someone else (the
    server's own OAuth, a proxy) and is not looked at. An HTTP server never falls back to its
    own environment: that would bill every anonymous caller to the server process's token.
    """
    token = _meta_text(meta, TOKEN_META)
    if token is None and request is not None and resource is not None:
        token = _bearer(request)
        if token is not None:
            _require_audience(token, resource)
    if token is None and request is None:
        token = os.environ.get(ENV_TOKEN) or None
    if token is None:
        header = " or as Authorization: Bearer (HTTP)" if resource is not None else ""
        raise InvalidCreditToken(
            f"no credit token: send one in _meta[{TOKEN_META!r}]{header}, or in {ENV_TOKEN} "
            "(stdio); ask the operator for one with `mcpbill token issue`", reason="missing")
    return token


def bearer_resource(verifier: Verifier, resource: str | None, bearer: bool | None,
                    ) -> str | None:
    """The canonical URI that ``Authorization: Bearer`` tokens must be issued to, or ``None``:
    the header is not read. ``bearer`` is the argument before 0.2 (deprecated): ``True`` read
    the header for tokens of the verifier's own audience, which stays so until it goes."""
    if bearer is not None:
        warnings.warn(
            "bearer= is deprecated and goes away in 0.2.0: Authorization is read only where "
            "mcpbill is the server's authorization; pass resource= (the server's canonical "
            'URI), or set [mcp] authorization = "bearer" and resource in config.toml',
            DeprecationWarning, stacklevel=3)
        if bearer and resource is None:
            if not isinstance(verifier.audience, str):
                raise ValueError("bearer=True needs one audience to check: pass resource=")
            return verifier.audience
    if resource is None:
        return None
    resource = canonical_resource(resource)
    if not verifier.accepts_audience(resource):
        raise ValueError(f"the verifier does not accept tokens issued to {resource!r}: build "
                         "it with that audience (Verifier.from_settings() adds [mcp] resource)")
    return resource


def authorization_resource(settings: Settings) -> str | None:
    """The canonical URI of ``[mcp] authorization = "bearer"`` (``None``: not configured)."""
    return settings.mcp_resource if settings.mcp_authorization == "bearer" else None


def authorization_settings(resource: str | None) -> dict[str, Any]:
    """How the extension takes a token over HTTP, as advertised in its settings."""
    if resource is None:
        return {"bearer": False}
    return {"bearer": True, "resource": resource}


def _require_audience(token: str, resource: str) -> None:
    """A Bearer token must be issued to this server's canonical URI. Read before the verifier
    checks the signature, which covers the claim: a forged ``aud`` fails there."""
    audience = peek_audience(token)
    if audience != resource:
        raise InvalidCreditToken(
            f"the Authorization token is not issued to this server: its audience must be "
            f"{resource!r} (mcpbill token issue --audience {resource})",
            reason="wrong_audience")


def check_list_ttl(ttl_ms: int) -> int:
    """``ttl_ms`` when it is a whole number of milliseconds, 0 or more (ValueError if not)."""
    if isinstance(ttl_ms, bool) or not isinstance(ttl_ms, int) or ttl_ms < 0:
        raise ValueError(f"list_ttl_ms must be a whole number of milliseconds, 0 or more, "
                         f"not {ttl_ms!r}")
    return ttl_ms


def list_hints(table: PricingTable, ttl_ms: int) -> dict[str, Any]:
    """The ``ttlMs`` and ``cacheScope`` of a billed server's ``tools/list`` (MCP 2026-07-28):
    ``"private"`` while the pricing table gives some tenant prices of its own (a price list is
    then no longer the same for every caller, and a shared cache must not serve one tenant's
    view to another), ``"public"`` otherwise."""
    tenant_priced = any(terms.tools or terms.discount_percent
                        for terms in table.tenants.values())
    return {"ttlMs": ttl_ms, "cacheScope": "private" if tenant_priced else "public"}


def list_hints_middleware(hints: Callable[[], dict[str, Any]],
                          server_hint: CacheHint | None = None) -> ServerMiddleware[Any]:
    """A low-level server middleware that puts ``hints()`` on ``tools/list`` results.

    The SDK has no hook for ``tools/list`` results but its middleware, which sees them in wire
    form; its own ``cache_hints`` are fixed when the server is built, while the pricing table
    can change under it. ``server_hint``, the server's own hint for ``tools/list``, narrows
    ours, never widens it (see :func:`narrowed`). Earlier protocol versions have no cache hints
    and get none.
    """

    async def list_hints_on_tools_list(ctx: ServerRequestContext[Any, Any],
                                       call_next: CallNext) -> HandlerResult:
        result = await call_next(ctx)
        if (ctx.method != "tools/list" or not isinstance(result, dict)
                or ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS):
            return result
        ours = await anyio.to_thread.run_sync(hints)  # it may read the pricing table file
        if server_hint is not None:
            ours = narrowed(ours, server_hint.ttl_ms, server_hint.scope)
        return {**result, **ours}

    return list_hints_on_tools_list


def narrowed(ours: Mapping[str, Any], ttl_ms: int, scope: str) -> dict[str, Any]:
    """``ours`` cache hints, no longer-lived than ``ttl_ms`` and private if ``scope`` is: a
    server's (or an upstream's) own hints are a promise billing must not break."""
    return {"ttlMs": min(ours["ttlMs"], ttl_ms),
            "cacheScope": "private" if scope == "private" else ours["cacheScope"]}


def idempotency_key(meta: Mapping[str, Any] | None) -> str | None:
    """The agent's own idempotency key for this call, if it sent one."""
    key = _meta_text(meta, IDEMPOTENCY_KEY_META)
    if key is not None and len(key) > MAX_KEY_LENGTH:
        raise InvalidInput(f"_meta[{IDEMPOTENCY_KEY_META!r}] is longer than {MAX_KEY_LENGTH} "
                           "characters", field=IDEMPOTENCY_KEY_META)
    return key


def round_key(key: str | None, params: CallToolRequestParams) -> str | None:
    """The idempotency key of this round of a call: the agent's own ``key``, made distinct for a
    2026-07-28 retry that answers ``input_required`` (``inputResponses``, ``requestState``).

    The round that asked was voided, and a voided key stays failed: the answering round needs
    a key of its own, the same again for the same answers (a replay returns its result) and
    another for different answers (another round, billed if it completes). ``None`` without
    an agent's key: the verifier derives one from the call, answers aside."""
    if key is None or (params.input_responses is None and params.request_state is None):
        return key
    answered = json.dumps([params.request_state, {
        name: response.model_dump(mode="json", by_alias=True, exclude_none=True)
        for name, response in (params.input_responses or {}).items()}], sort_keys=True)
    digest = hashlib.sha256(answered.encode()).hexdigest()[:ROUND_DIGEST]
    return f"{key[:MAX_KEY_LENGTH - ROUND_DIGEST - 1]}#{digest}"


def client_address(request: Any) -> str:
    """The HTTP client's address, where a transport has one ("" on stdio and in process)."""
    client = getattr(request, "client", None)
    host = getattr(client, "host", None)
    return host if isinstance(host, str) else ""


def refusal(error: BillingError) -> CallToolResult:
    """The x402-style refusal: ``isError``, the error object, and the same JSON as text."""
    text = json.dumps(error.for_agent(), default=str)
    return CallToolResult(content=[TextContent(type="text", text=text)],
                          structured_content=json.loads(text), is_error=True)


def with_receipt(result: CallToolResult, receipt: Receipt) -> CallToolResult:
    """``result`` with the signed receipt added to its ``_meta``."""
    meta = {**(result.meta or {}), RECEIPT_META: receipt.to_dict()}
    return result.model_copy(update={"meta": meta})


def kept_result(result: Result) -> str:
    """The result as the agent gets it (before the receipt is added), kept for replays.

    The same JSON as ``result.model_dump_json(by_alias=True, exclude_none=True)``, from the
    model's own serializer: ``model_dump_json`` spends more than the serialization itself
    sorting out its other options (4.3 us against 1.9 us for an echo's result, timeit), on
    every paid call."""
    return result.__pydantic_serializer__.to_json(result, by_alias=True, exclude_none=True,
                                                  warnings=True).decode()


async def void_held(verifier: Verifier, hold: Hold, outcome: str = "voided") -> None:
    """Void ``hold`` of a call that did not succeed, shielded: a call cancelled by its client
    must still release what it held. A void the ledger refuses (it is down, or the hold was
    resolved already) is logged, not raised: the hold lapses by itself, unbilled, and the
    agent's answer (the tool's error) stands."""
    with anyio.CancelScope(shield=True), step(verifier.tracing, "void"):
        try:
            await verifier.avoid(hold, outcome=outcome)
        except BillingError as error:
            logger.warning("void of hold %s: %s", hold.id, error.message)


def replayed(receipt: Receipt, kept: str | None) -> CallToolResult:
    """A replay's answer: the first run's ``kept`` result with its receipt, marked as a replay;
    DUPLICATE_CALL with the receipt when no result was kept (it was over the size cap, or the
    call was recorded after the server that ran it failed: ``Acceptor.recover()``)."""
    if kept is None:
        return refusal(DuplicateCall(
            f"this call was made already (receipt {receipt.receipt_id}) and its result was not "
            "kept (too large to keep, or recorded after its server failed); it is not run or "
            "billed again", receipt=receipt))
    first = CallToolResult.model_validate_json(kept)
    meta = {**(first.meta or {}), REPLAYED_META: True, RECEIPT_META: receipt.to_dict()}
    return first.model_copy(update={"meta": meta})


def succeeded(result: object) -> bool:
    """A finished, successful tool result: the only kind that is billed.

    Error results and multi-round ``input_required`` interim results are not: the final round
    of a multi-round call is billed when it completes.
    """
    return isinstance(result, CallToolResult) and not result.is_error


def unbilled(result: object) -> str:
    """How a call whose ``result`` is not billed ends, in its metrics and its span:
    ``input_required`` for an interim round of a multi-round call (it asked the agent for more;
    the round that completes is billed), else ``voided``."""
    return "input_required" if isinstance(result, InputRequiredResult) else "voided"


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

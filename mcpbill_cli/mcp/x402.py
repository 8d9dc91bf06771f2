"""x402 payments for billed MCP tools (x402's MCP transport, tool-result binding).

- A paid tool called without a credit token and without a payment, or refused with
  BUDGET_EXCEEDED, answers ``isError: true`` with the ``PaymentRequired`` (``x402Version``,
  ``error``, ``resource``, ``accepts``) beside mcpbill's own refusal fields (``code``,
  ``message``, fallback hints) in ``structuredContent``, and the same JSON in
  ``content[0].text``: an x402 client and an mcpbill agent both read what they need.
- A call carrying ``_meta["x402/payment"]`` is verified and the payment reserved before the
  tool runs; it is settled after the tool succeeded and before the result is returned, and the
  result carries ``_meta["x402/payment-response"]`` (the ``SettleResponse``) next to the
  receipt. A tool that failed releases the payment (nothing is settled); a settlement that
  fails withholds the tool's output (X402_SETTLEMENT_FAILED, with a fresh challenge). A payment
  settled that the ledger then fails to record still returns the result (the payer has paid:
  asking it to pay again would charge it twice), with the settlement and no receipt;
  ``Acceptor.recover()`` records it later, and a retry replays it then.
- A retry of a settled payment for the same call replays its result; the tool runs at most
  once per payment.

The extension binding of the same transport (MCP 2026-07-28): a server with x402 on
advertises ``capabilities.extensions["org.x402/payment"]`` (``{}``) in ``server/discover``; a
request whose per-request client capabilities advertise ``org.x402/payment`` gets, wherever
the tool-result binding would answer a ``PaymentRequired``, a ``resultType:
"payment_required"`` result with the ``PaymentRequired`` in ``paymentRequired`` (mcpbill's own
refusal in ``_meta["dev.mcpbill/refusal"]``). Payments and settlement responses use the same
``_meta`` keys in both bindings. Any other request keeps the tool-result binding.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import anyio
from mcp.server.context import CallNext, HandlerResult, ServerMiddleware, ServerRequestContext
from mcp_types import CallToolResult, TextContent
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from mcpbill_cli import offloop
from mcpbill_cli.errors import BillingError, InvalidInput
from mcpbill_cli.mcp.wire import (
    PREFIX,
    RECEIPT_META,
    REPLAYED_META,
    kept_result,
    refusal,
    replayed,
    succeeded,
    unbilled,
)
from mcpbill_cli.x402.accept import Acceptor, Replayed, Reserved
from mcpbill_cli.x402.errors import X402PaymentInvalid

PAYMENT_META = "x402/payment"
PAYMENT_RESPONSE_META = "x402/payment-response"
X402_EXTENSION_ID = "org.x402/payment"  # the x402 MCP transport's extension binding
PAYMENT_REQUIRED = "payment_required"  # its result type
REFUSAL_META = PREFIX + "refusal"  # mcpbill's refusal beside a payment_required result


def payment_of(meta: Mapping[str, Any] | None) -> Mapping[str, Any] | str | None:
    """The x402 payment a call carries in ``_meta["x402/payment"]``, if any."""
    value = (meta or {}).get(PAYMENT_META)
    if value is None:
        return None
    if not isinstance(value, Mapping | str):
        raise InvalidInput(f"_meta[{PAYMENT_META!r}] must be a PaymentPayload object",
                           field=PAYMENT_META)
    return value


def challenged(error: BillingError, acceptor: Acceptor | None, tool: str,
               tenant: str | None = None) -> CallToolResult:
    """The refusal of ``error``, with the ``PaymentRequired`` for ``tool`` beside it when x402
    is offered for it (and paying can help: not for a tool that takes no x402 payment, nor for
    a call over a rate limit)."""
    answer = refusal(error)
    if acceptor is None or _no_challenge(error):
        return answer
    challenge = acceptor.payment_required(tool, tenant, error=error.agent_message)
    if challenge is None:
        return answer
    text = json.dumps({**challenge, **error.for_agent()}, default=str)
    return answer.model_copy(update={"content": [TextContent(type="text", text=text)],
                                     "structured_content": json.loads(text)})


def uses_extension(ctx: ServerRequestContext[Any, Any]) -> bool:
    """Whether this request advertises ``org.x402/payment`` (on MCP 2026-07-28 or later):
    then a payment-required answer must be the extension's ``payment_required`` result."""
    if ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
        return False
    capabilities = ctx.session.client_capabilities
    extensions = capabilities.extensions if capabilities is not None else None
    return extensions is not None and X402_EXTENSION_ID in extensions


def answered(error: BillingError, acceptor: Acceptor | None, tool: str,
             tenant: str | None = None, *, extension: bool = False
             ) -> CallToolResult | dict[str, Any]:
    """The answer to a refused call: with ``extension`` (see :func:`uses_extension`) and x402
    offered for ``tool``, the ``payment_required`` result; else :func:`challenged`."""
    if extension and acceptor is not None and not _no_challenge(error):
        challenge = acceptor.payment_required(tool, tenant, error=error.agent_message)
        if challenge is not None:
            return {"resultType": PAYMENT_REQUIRED, "paymentRequired": challenge,
                    "_meta": {REFUSAL_META: error.for_agent()}}
    return challenged(error, acceptor, tool, tenant)


def advertising_middleware() -> ServerMiddleware[Any]:
    """A server middleware adding ``org.x402/payment`` to the ``capabilities.extensions`` of
    ``server/discover`` (the extension binding needs 2026-07-28, which discovers this way)."""

    async def advertise_x402(ctx: ServerRequestContext[Any, Any],
                             call_next: CallNext) -> HandlerResult:
        result = await call_next(ctx)
        if ctx.method != "server/discover" or not isinstance(result, dict):
            return result
        capabilities = dict(result.get("capabilities") or {})
        extensions = dict(capabilities.get("extensions") or {})
        extensions.setdefault(X402_EXTENSION_ID, {})
        return {**result, "capabilities": {**capabilities, "extensions": extensions}}

    return advertise_x402


# The keys of an x402 PaymentRequired; a challenge's other keys are mcpbill's refusal.
_PAYMENT_REQUIRED_KEYS = ("x402Version", "error", "resource", "accepts", "extensions")


def extension_binding_middleware() -> ServerMiddleware[Any]:
    """The extension binding for a server whose tools answer with the tool-result binding
    (fastmcp's): ``org.x402/payment`` advertised in ``server/discover``, and a ``tools/call``
    challenge (``isError`` with a ``PaymentRequired`` in ``structuredContent``) sent to a
    request that advertises the extension turned into its ``payment_required`` result."""
    advertise = advertising_middleware()

    async def bind_x402(ctx: ServerRequestContext[Any, Any], call_next: CallNext
                        ) -> HandlerResult:
        result = await advertise(ctx, call_next)
        if ctx.method != "tools/call" or not isinstance(result, dict) or not uses_extension(ctx):
            return result
        return _as_payment_required(result) or result

    return bind_x402


def _as_payment_required(result: Mapping[str, Any]) -> dict[str, Any] | None:
    """A tool-result challenge (wire form) as the ``payment_required`` result, else ``None``."""
    challenge = result.get("structuredContent")
    if (result.get("isError") is not True or not isinstance(challenge, Mapping)
            or "x402Version" not in challenge or "accepts" not in challenge):
        return None
    required = {k: v for k, v in challenge.items() if k in _PAYMENT_REQUIRED_KEYS}
    refused = {k: v for k, v in challenge.items() if k not in _PAYMENT_REQUIRED_KEYS}
    meta = {**(result.get("_meta") or {}), REFUSAL_META: refused}
    return {"resultType": PAYMENT_REQUIRED, "paymentRequired": required, "_meta": meta}


@dataclass
class PaidCall:
    """One tool call paid with x402: :meth:`open` before the tool runs, :meth:`close` after."""

    acceptor: Acceptor
    tool: str
    payment: Mapping[str, Any] | str
    args: dict[str, Any]
    tenant: str | None = None
    agent: str | None = None
    opened: Reserved | None = None
    extension: bool = False  # answer with the extension binding (see uses_extension)

    async def open(self) -> CallToolResult | dict[str, Any] | None:
        """Verify and reserve the payment: ``None`` when the tool may run, else the answer
        (a refusal with a fresh challenge, or the replay of the call it paid already)."""
        try:
            taken = await offloop.run(self._take, self._unclaimed)
        except BillingError as error:
            self._ended("refused", code=error.code)
            return self._refused(error)
        if isinstance(taken, Replayed):
            self._ended("replayed", amount=taken.receipt.amount)
            return _replayed(taken)
        self.opened = taken
        return None

    async def close(self, result: HandlerResult) -> HandlerResult:
        """Settle and record a successful result (withheld if settlement fails); release the
        payment of a failed one."""
        opened = self.opened
        if opened is None:
            return result
        if not succeeded(result):
            await self.unpaid(unbilled(result))
            return result
        done = cast(CallToolResult, result)
        try:  # started at once and shielded: once settlement starts, the call is paid (a
            # plain task.cancel() stops the waiting; the worker settles and records it, and a
            # retry replays it)
            with anyio.CancelScope(shield=True):
                settlement, receipt = await offloop.run(lambda: self.acceptor.pay_for(
                    opened, self.tool, result=kept_result(done)))
        except BillingError as error:  # settlement failed: the output is withheld
            return self._refused(error)
        meta = {**(done.meta or {}), PAYMENT_RESPONSE_META: settlement.to_dict()}
        if receipt is not None:  # else paid, not recorded yet: the result is the payer's due
            meta[RECEIPT_META] = receipt.to_dict()
        return done.model_copy(update={"meta": meta})

    async def release(self) -> None:
        """Give the payment back, counting nothing: the caller says how the call ended (see
        :meth:`unpaid`, :meth:`cancelled`)."""
        opened = self.opened
        if opened is None:
            return
        with anyio.CancelScope(shield=True):  # a cancelled call still frees its payment
            await anyio.to_thread.run_sync(lambda: self.acceptor.release(opened))

    async def unpaid(self, outcome: str) -> None:
        """Release the payment of a call that ended unbilled, as ``outcome`` (``voided``, or
        ``input_required``: the agent may pay the round that completes with it)."""
        await self.release()
        self._ended(outcome)

    async def cancelled(self) -> None:
        """Release the payment of a call that ended with no result (the agent cancelled, the
        server shut down, the upstream answered with an error): counted ``voided``, as such a
        credit-token call's hold is."""
        await self.unpaid("voided")

    def _ended(self, outcome: str, *, amount: int | None = None,
               code: str | None = None) -> None:
        """Count the call in the verifier's metrics and its span, where they are on."""
        self.acceptor.call_ended(self.tool, outcome, amount=amount, code=code)

    def _refused(self, error: BillingError) -> CallToolResult | dict[str, Any]:
        return answered(error, self.acceptor, self.tool, self.tenant, extension=self.extension)

    def _take(self) -> Reserved | Replayed:
        verified = self.acceptor.verify(self.payment, self.tool, args=self.args,
                                        tenant=self.tenant, agent=self.agent)
        return self.acceptor.reserve(verified)

    def _unclaimed(self, taken: Reserved | Replayed) -> None:
        """A payment reserved for a caller cancelled meanwhile (an anyio shield does not hold
        back a plain ``task.cancel()``): nobody will settle or release it, so it is released
        now rather than left reserved until recovery releases it."""
        if isinstance(taken, Reserved):
            self.acceptor.release(taken)
            self._ended("voided")  # as a hold taken for a cancelled caller is voided

def _replayed(replay: Replayed) -> CallToolResult:
    """The call this payment paid already (:func:`~mcpbill_cli.mcp.wire.replayed`: its kept
    result, or DUPLICATE_CALL), with its receipt and settlement."""
    first = replayed(replay.receipt, replay.result)
    meta = {**(first.meta or {}), REPLAYED_META: True, RECEIPT_META: replay.receipt.to_dict(),
            PAYMENT_RESPONSE_META: replay.settlement.to_dict()}
    return first.model_copy(update={"meta": meta})


def _no_challenge(error: BillingError) -> bool:
    """Whether a new payment cannot answer ``error``: x402 is not offered for the tool, or a
    rate limit refused the call (the same payment pays a retry once the window ends)."""
    return (isinstance(error, X402PaymentInvalid) and error.reason == "not_offered") \
        or error.code == "RATE_LIMITED"

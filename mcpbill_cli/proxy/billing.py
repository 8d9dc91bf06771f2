"""Billing one ``tools/call`` through the proxy: the same verifier, wire and rules as the embedded
:class:`~mcpbill_cli.mcp.billing.Billing` extension.

    price (the pricing table)  -> free: forwarded untouched, no token needed
    token checked and held     -> a refusal answers the call; a replay returns the first result
    forwarded to the upstream  -> progress, logs and the upstream's requests relayed as they come
    a success is captured      -> its signed receipt in the result's _meta
    anything else is voided    -> isError, a timeout, an upstream that failed or a cut-off call

Metrics are the verifier's (``verifier.metrics``, see :mod:`mcpbill_cli.metrics`): it counts
holds, captures, voids, replays and its own refusals; the proxy adds only what the verifier never
sees: free calls, and refusals of its own (``PROXY_BUSY``, ``PRICE_UNKNOWN``, ``UPSTREAM_*``).

Idempotency is the verifier's: the agent's key in ``_meta``, or the key derived from token, tool
and arguments within the tool's dedupe window; never the JSON-RPC request id. The credit token,
the idempotency key and an x402 payment are not forwarded: the upstream never sees the agent's
credentials.

With an acceptor (x402 configured, see :mod:`mcpbill_cli.mcp.x402`), a paid tool also takes an
x402 payment in ``_meta["x402/payment"]``, as the embedded extension does: verified and
reserved before forwarding, settled and recorded after the upstream succeeded (the result
carries the settlement and the receipt), released otherwise; refusals carry the challenge.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import anyio
import anyio.lowlevel
from mcp.client import Client
from mcp.server.context import ServerRequestContext
from mcp.server.streamable_http import REQUEST_CANCELLED
from mcp.shared.dispatcher import ProgressFnT
from mcp.shared.exceptions import MCPError
from mcp_types import CONNECTION_CLOSED, CallToolRequestParams, CallToolResult, InputRequiredResult
from starlette.requests import Request

from mcpbill_cli.errors import (
    BillingError,
    InvalidCreditToken,
    InvalidInput,
    ProxyBusy,
    ProxySessionsFull,
    ResponseTooLarge,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from mcpbill_cli.mcp.wire import (
    IDEMPOTENCY_KEY_META,
    LEGACY_META,
    PREFIX,
    TOKEN_META,
    bearer_resource,
    client_address,
    credit_token,
    idempotency_key,
    kept_result,
    refusal,
    replayed,
    round_key,
    succeeded,
    unbilled,
    void_held,
    with_receipt,
)
from mcpbill_cli.mcp.x402 import PAYMENT_META, PaidCall, challenged, payment_of
from mcpbill_cli.pricing import PricingTable, quote
from mcpbill_cli.proxy.posted import TooLarge, wire_of
from mcpbill_cli.proxy.sessions import AgentSession, agent_session, has_session
from mcpbill_cli.proxy.upstream import SessionUnknown, Upstream
from mcpbill_cli.tracing import ended, step
from mcpbill_cli.verifier import CALL_SOURCE, Hold, Verifier
from mcpbill_cli.x402.accept import Acceptor

__all__ = ["Limits", "ProxyBilling"]

log = logging.getLogger("mcpbill.proxy")

# What a tools/call answers: its result, or (2026-07-28) the upstream's request for more input.
Answer = CallToolResult | InputRequiredResult

# The progress token's _meta key: progress_token once the SDK parsed it, progressToken on the wire.
PROGRESS_TOKENS = ("progress_token", "progressToken")
RESERVED_PREFIX = "io.modelcontextprotocol/"  # the protocol's own _meta keys, per connection
BUSY_RETRY_MS = 250
GONE_POLL_SECONDS = 0.25  # how often a call in flight checks that its agent is still there
# The agent's own keys: never forwarded (the credit token and an x402 payment are credentials).
PRIVATE_META = frozenset({TOKEN_META, IDEMPOTENCY_KEY_META, PAYMENT_META,
                          *LEGACY_META.values()})


@dataclass(frozen=True)
class Limits:
    """The proxy's limits: seconds an upstream call may take, calls in flight, request bytes,
    the bytes of an upstream result the proxy relays (its JSON), and the seconds an agent
    session may sit idle before it ends (and its upstream session with it)."""

    call_timeout: float = 60.0
    max_concurrent: int = 64
    max_request_bytes: int = 1024 * 1024
    max_response_bytes: int = 4 * 1024 * 1024
    session_idle_timeout: float = 30 * 60.0

    def __post_init__(self) -> None:
        """INVALID_INPUT for a time that is not a finite number of seconds above 0 (``nan``
        or ``inf`` from a command line): no call or session could be timed by it."""
        for name in ("call_timeout", "session_idle_timeout"):
            seconds = getattr(self, name)
            if isinstance(seconds, bool) or not isinstance(seconds, int | float) \
                    or not math.isfinite(seconds) or seconds <= 0:
                option = name.replace("_", "-")
                raise InvalidInput(f"--{option} must be a finite number of seconds above 0, "
                                   f"not {seconds!r}", field=option)


@dataclass(frozen=True)
class Relayed:
    """An upstream result and its JSON as the agent gets it, dumped once: to check its size
    against the limit and, for a paid call, to keep it for replays."""

    result: Answer
    json: str


class ProxyBilling:
    """Forwards ``tools/call`` to the upstream and bills it (see the module docstring)."""

    def __init__(self, verifier: Verifier, upstream: Upstream, limits: Limits, *,
                 resource: str | None = None, bearer: bool | None = None,
                 acceptor: Acceptor | None = None) -> None:
        self.verifier = verifier
        self.acceptor = acceptor
        self.upstream = upstream
        self.limits = limits
        self.resource = bearer_resource(verifier, resource, bearer)
        self.in_flight = 0
        self._open: dict[str, Hold] = {}

    async def call_tool(self, ctx: ServerRequestContext[Any, Any],
                        params: CallToolRequestParams) -> Answer:
        """One call, in an ``mcpbill.call`` span when the verifier traces calls."""
        tracing = self.verifier.tracing
        if tracing is None:
            return await self._call_limited(ctx, params)
        with tracing.call(params.name, params.meta):
            return await self._call_limited(ctx, params)

    async def _call_limited(self, ctx: ServerRequestContext[Any, Any],
                            params: CallToolRequestParams) -> Answer:
        """One call: refused (PROXY_BUSY) at the concurrency limit, or (PROXY_SESSIONS_FULL)
        when the agent has no upstream session and none can be opened; else billed and
        forwarded."""
        if self.in_flight >= self.limits.max_concurrent:
            return self._refuse(params.name, ProxyBusy(
                f"the proxy has {self.in_flight} calls in flight, its limit; retry shortly",
                retryAfterMs=BUSY_RETRY_MS, limit=self.limits.max_concurrent))
        try:
            agent_session(self.upstream, ctx)  # opened before anything is held
        except (ProxySessionsFull, UpstreamUnavailable) as error:
            return self._refuse(params.name, error)
        self.in_flight += 1
        try:
            return await self._unless_cut_off(ctx, params)
        finally:
            self.in_flight -= 1

    async def _unless_cut_off(self, ctx: ServerRequestContext[Any, Any],
                              params: CallToolRequestParams) -> Answer:
        """The call, cancelled when the agent's request stream closes (the agent went away):
        its hold is voided and the upstream is told, as when the agent cancels it.

        The 2026-07-28 transport cancels on a closed stream itself: its calls are not watched
        here (a task per call, and its cancellation, are a good part of a call's own work). The
        handshake era's treats a closed stream as a pause the agent resumes from, but this
        proxy keeps no events to resume from, so the answer could never reach the agent."""
        if not has_session(ctx):  # the 2026-07-28 transport cancels the call itself
            return await self._call(ctx, params)
        answer: Answer | None = None
        with anyio.CancelScope() as call:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(_cancel_when_gone, ctx.request, call)
                answer = await self._call(ctx, params)
                tasks.cancel_scope.cancel()
        if answer is None:  # nobody reads this: the agent's stream is closed
            raise MCPError(REQUEST_CANCELLED, "the agent went away: the call was cancelled "
                                              "and not billed")
        return answer

    async def void_open(self) -> int:
        """Void the holds of calls still open (a shutdown cut them off); returns how many."""
        holds = list(self._open.values())
        for hold in holds:
            await self._void(hold)
        return len(holds)

    # --- one call -------------------------------------------------------------------------------

    async def _call(self, ctx: ServerRequestContext[Any, Any],
                    params: CallToolRequestParams) -> Answer:
        meta = params.meta
        table = self.verifier.pricing_table()
        try:
            price = quote(table, params.name)
        except BillingError as error:  # PRICE_UNKNOWN: a table without a default_price
            if not self._on_tenant_terms(table, ctx, params):
                return self._refuse(params.name, error)
        else:
            if price.free and not self._on_tenant_terms(table, ctx, params):
                return self._free(params.name, await self.forward(ctx, params))
        try:
            payment = payment_of(meta) if self.acceptor is not None else None
            if payment is not None:
                return await self._paid_with_x402(self._x402_call(ctx, params, payment), ctx,
                                                  params)
            token = credit_token(meta, ctx.request, resource=self.resource)
        except BillingError as error:  # INVALID_CREDIT_TOKEN: none sent, or not for us
            return self._challenge(params.name, error)
        source = CALL_SOURCE.set(client_address(ctx.request))
        try:  # shielded: a hold taken while the call is cancelled must be voided, not lost
            with step(self.verifier.tracing, "hold"), anyio.CancelScope(shield=True):
                opened = await self.verifier.abegin(
                    token, params.name, args=dict(params.arguments or {}),
                    idempotency_key=round_key(idempotency_key(meta), params))
        except BillingError as error:  # the verifier counted it
            ended("refused", code=error.code)
            return self._offer(error, params.name, token)
        finally:
            CALL_SOURCE.reset(source)
        if not isinstance(opened, Hold):  # free on this tenant's terms: checked, nothing held
            return self._free(params.name, await self.forward(ctx, params))
        if opened.replayed is not None:  # made already: the upstream is not called again
            ended("replayed", amount=opened.replayed.amount)
            return replayed(opened.replayed, opened.result)
        return await self._settle(opened, ctx, params)

    def _on_tenant_terms(self, table: PricingTable, ctx: ServerRequestContext[Any, Any],
                         params: CallToolRequestParams) -> bool:
        """Whether a tool free, or without a price, on the table's base terms is still billed:
        some tenant prices it on its own terms and the call brings a credential (a credit
        token, or an x402 payment), whose tenant the verifier prices it for. A call without
        one is priced on the base terms, as the embedded verifier prices an anonymous call."""
        if params.name not in table.tenant_tools:
            return False
        if self.acceptor is not None and payment_of(params.meta) is not None:
            return True
        try:
            credit_token(params.meta, ctx.request, resource=self.resource)
        except InvalidCreditToken as error:
            return error.reason != "missing"
        return True

    async def _settle(self, hold: Hold, ctx: ServerRequestContext[Any, Any],
                      params: CallToolRequestParams) -> Answer:
        """Forward on a hold: capture a success, void anything else (charge only on success).

        An upstream that needs more input (2026-07-28 ``input_required``) voids the hold too:
        the agent answers and retries the call, and the round that completes is the one
        billed, once; a call abandoned there was never charged."""
        self._open[hold.id] = hold
        try:
            outcome = await self.forward(ctx, params)
            # A call cancelled as its result came is not charged: the agent gets no answer.
            await anyio.lowlevel.checkpoint_if_cancelled()
        except BaseException:  # cancelled (client gone, shutdown) or the upstream's own error
            await self._void(hold)
            raise
        if isinstance(outcome, BillingError) or not isinstance(outcome.result, CallToolResult) \
                or not succeeded(outcome.result):
            how = unbilled(None if isinstance(outcome, BillingError) else outcome.result)
            await self._void(hold, how)
            code = outcome.code if isinstance(outcome, BillingError) else None
            if code is not None and self.verifier.metrics is not None:
                self.verifier.metrics.refusal(hold.tool, code)  # the call: voided
            ended(how, code=code)
            return _answer(outcome)
        self._open.pop(hold.id, None)
        try:  # shielded: once the capture starts, the call is charged, its answer kept for a
            # retry to replay (a cancellation that comes now is too late)
            with step(self.verifier.tracing, "capture"), anyio.CancelScope(shield=True):
                receipt = await self.verifier.acapture(hold, result=outcome.json)
        except BillingError as error:  # e.g. the hold lapsed: the agent is told, not billed
            ended("refused", code=error.code)
            return refusal(error)  # the verifier counted it
        ended("captured", amount=receipt.amount)
        return with_receipt(outcome.result, receipt)

    # --- a call paid with x402 ------------------------------------------------------------------

    def _x402_call(self, ctx: ServerRequestContext[Any, Any], params: CallToolRequestParams,
                   payment: Any) -> PaidCall:
        """The paid call, as the embedded extension makes it: a credit token sent along names
        its tenant (and agent)."""
        assert self.acceptor is not None  # noqa: S101 - payment_of() is read only with one
        tenant = agent = None
        try:
            token = credit_token(params.meta, ctx.request, resource=self.resource)
        except BillingError:
            token = None
        if token is not None:
            claims = self.verifier.claims_of(token)
            tenant, agent = claims.tenant, claims.agent
        return PaidCall(self.acceptor, params.name, payment, dict(params.arguments or {}),
                        tenant=tenant, agent=agent)

    async def _paid_with_x402(self, paid: PaidCall, ctx: ServerRequestContext[Any, Any],
                              params: CallToolRequestParams) -> Answer:
        """Reserve the payment, forward once, then settle and record a success (or release the
        payment of anything else: an upstream error, timeout, failure or oversized result)."""
        answer = await paid.open()
        if answer is not None:
            return cast(CallToolResult, answer)  # the tool-result binding: always a result
        try:
            outcome = await self.forward(ctx, params)
            # A call cancelled as its result came is not paid: the agent gets no answer.
            await anyio.lowlevel.checkpoint_if_cancelled()
        except BaseException:
            await paid.cancelled()
            raise
        if isinstance(outcome, BillingError):
            await paid.release()
            return self._challenge(params.name, outcome)
        return cast(Answer, await paid.close(outcome.result))

    def _challenge(self, tool: str, error: BillingError, tenant: str | None = None
                   ) -> CallToolResult:
        """A refusal of the proxy's own, with the x402 ``PaymentRequired`` beside it when the
        tool takes x402 payments (as the embedded extension answers)."""
        if self.acceptor is None:
            return self._refuse(tool, error)
        if self.verifier.metrics is not None:
            self.verifier.metrics.refused(tool, error.code)
        ended("refused", code=error.code)
        return challenged(error, self.acceptor, tool, tenant)

    def _offer(self, error: BillingError, tool: str, token: str) -> CallToolResult:
        """The verifier's refusal; BUDGET_EXCEEDED also offers x402 at the token's tenant's
        price (the verifier counted the refusal)."""
        if error.code != "BUDGET_EXCEEDED" or self.acceptor is None:
            return refusal(error)
        return challenged(error, self.acceptor, tool, self.verifier.claims_of(token).tenant)

    async def forward(self, ctx: ServerRequestContext[Any, Any],
                      params: CallToolRequestParams) -> Relayed | BillingError:
        """The upstream's result with its JSON, or why there is none (UPSTREAM_TIMEOUT,
        UPSTREAM_UNAVAILABLE, PROXY_SESSIONS_FULL, RESPONSE_TOO_LARGE: a result over the limit
        is not relayed, so a paid one is voided; one the proxy posts itself is cut off as it
        is read, see :mod:`mcpbill_cli.proxy.posted`).

        A call the upstream refused because it lost the agent's session (it restarted) never
        ran there: it is sent again on a new session (:meth:`Link.call
        <mcpbill_cli.proxy.upstream.Link.call>`), a paid one under the same hold, so its one
        run is charged once.

        A JSON-RPC error the upstream answered with is raised as is (the agent gets it).
        """
        try:
            session = agent_session(self.upstream, ctx)
            client = await session.link.client()
        except (ProxySessionsFull, UpstreamUnavailable) as error:
            return error
        meta = params.meta
        wants_progress = any((meta or {}).get(key) is not None for key in PROGRESS_TOKENS)
        progress = _relay(ctx) if wants_progress else None
        timeout, limit = self.limits.call_timeout, self.limits.max_response_bytes
        try:
            with anyio.fail_after(timeout), session.during(ctx):
                result = await session.link.call(
                    client, lambda live: _call_upstream(live, ctx, params, progress, limit))
        except UpstreamUnavailable as error:  # no new connection after a lost session
            return error
        except SessionUnknown as error:  # the new session was refused too
            return self._lost(session, client, params.name, error)
        except TooLarge as error:  # cut off while read, on every upstream
            return over_limit(error.size, limit, params.name, cut_off=True)
        except TimeoutError:
            return UpstreamTimeout(f"the upstream did not answer {params.name!r} within "
                                   f"{timeout:g} s; the call was not billed",
                                   tool=params.name, timeoutSeconds=timeout)
        except MCPError as error:
            if error.code != CONNECTION_CLOSED:
                raise
            return self._lost(session, client, params.name, error)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError) as error:
            return self._lost(session, client, params.name, error)
        relayed = Relayed(result, kept_result(result))
        return oversized(len(relayed.json.encode()), limit, params.name) or relayed

    def _lost(self, session: AgentSession, client: Client, tool: str,
              error: BaseException) -> UpstreamUnavailable:
        session.link.broken(client)
        log.warning("upstream connection lost during %r: %s", tool, error)
        return UpstreamUnavailable(f"the upstream failed during {tool!r} ({error}); the call was "
                                   "not billed and the proxy is reconnecting: retry",
                                   tool=tool, upstream=self.upstream.target.describe())

    async def _void(self, hold: Hold, outcome: str = "voided") -> None:
        if self._open.pop(hold.id, None) is None:
            return  # voided already (a shutdown's void_open)
        await void_held(self.verifier, hold, outcome)

    def _refuse(self, tool: str, error: BillingError) -> CallToolResult:
        """A refusal of the proxy's own (the verifier never saw the call)."""
        if self.verifier.metrics is not None:
            self.verifier.metrics.refused(tool, error.code)
        ended("refused", code=error.code)
        return refusal(error)

    def _free(self, tool: str, outcome: Relayed | BillingError) -> Answer:
        if isinstance(outcome, BillingError):
            return self._refuse(tool, outcome)
        if self.verifier.metrics is not None:
            self.verifier.metrics.finished(tool, "free")
        ended("free")
        return outcome.result


async def _call_upstream(client: Client, ctx: ServerRequestContext[Any, Any],
                         params: CallToolRequestParams, progress: ProgressFnT | None,
                         limit: int) -> Answer:
    """``tools/call`` on the upstream. For a 2026-07-28 agent (no session) the upstream's
    ``input_required`` result is the agent's to answer: it retries the call with
    ``inputResponses`` and ``requestState``, passed on as they come. An agent of the handshake
    era is asked on its session instead, by its upstream session's client
    (:mod:`mcpbill_cli.proxy.relay`), which retries the upstream itself."""
    args, meta = dict(params.arguments or {}), forwarded_meta(params.meta)
    wire = wire_of(client)
    if wire is not None and params.input_responses is None and params.request_state is None:
        return await wire.call_tool(params.name, args, meta, progress, limit)
    if has_session(ctx):
        return await client.call_tool(params.name, args, progress_callback=progress,
                                      meta=meta)  # type: ignore[arg-type]
    return await client.session.call_tool(
        params.name, args, progress_callback=progress, meta=meta,  # type: ignore[arg-type]
        input_responses=params.input_responses, request_state=params.request_state,
        allow_input_required=True)


def forwarded_meta(meta: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The call's ``_meta`` as the upstream gets it: without mcpbill's keys (the agent's credit
    token, under its current or its legacy name, and idempotency key), the progress token (the
    proxy's client sets its own) and the protocol's per-connection keys."""
    kept = {key: value for key, value in (meta or {}).items()
            if key not in PRIVATE_META and key not in PROGRESS_TOKENS
            and not key.startswith((RESERVED_PREFIX, PREFIX))}
    return kept or None


def response_bytes(result: Any) -> int:
    """The size of a result as the agent would get it: its JSON, in bytes."""
    return len(result.model_dump_json(by_alias=True, exclude_none=True).encode())


def too_large(result: Any, limit: int, tool: str | None = None) -> ResponseTooLarge | None:
    """RESPONSE_TOO_LARGE when ``result`` is over ``limit`` bytes, else None.

    A result that came whole was within the limit plus its envelope as read (every answer is
    read up to that and cut off past it), so this is the exact test, on the result's JSON as
    the agent would get it."""
    return oversized(response_bytes(result), limit, tool)


def oversized(size: int, limit: int, tool: str | None = None) -> ResponseTooLarge | None:
    """RESPONSE_TOO_LARGE when a result of ``size`` bytes is over ``limit``, else None."""
    return None if size <= limit else over_limit(size, limit, tool)


def over_limit(size: int, limit: int, tool: str | None = None, *,
               cut_off: bool = False) -> ResponseTooLarge:
    """RESPONSE_TOO_LARGE for an answer of ``size`` bytes, or (``cut_off``) one whose reading
    stopped after ``size`` bytes: its whole size is not known."""
    details: dict[str, Any] = {"limitBytes": limit, "sizeBytes": size}
    if tool is not None:
        details["tool"] = tool
    answered = f"more than {size} bytes (cut off)" if cut_off else f"{size} bytes"
    return ResponseTooLarge(f"the upstream answered with {answered}, over this proxy's limit "
                            f"of {limit} bytes; nothing was relayed and the call was not billed",
                            **details)


async def _cancel_when_gone(request: Any, call: anyio.CancelScope) -> None:
    """Cancel ``call`` once the HTTP ``request`` it came on is disconnected (checked every
    GONE_POLL_SECONDS; no HTTP request, in process: never)."""
    if not isinstance(request, Request):
        return
    while True:
        await anyio.sleep(GONE_POLL_SECONDS)  # first: most calls end before it is ever checked
        if await request.is_disconnected():
            break
    log.info("the agent's request stream closed: cancelling its call")
    call.cancel()


def _relay(ctx: ServerRequestContext[Any, Any]) -> ProgressFnT:
    """Relay the upstream's progress to the agent's request as each notification comes."""

    async def relay(progress: float, total: float | None, message: str | None) -> None:
        await ctx.session.report_progress(progress, total, message)

    return relay


def _answer(outcome: Relayed | BillingError) -> Answer:
    return refusal(outcome) if isinstance(outcome, BillingError) else outcome.result

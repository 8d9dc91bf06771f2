"""Per-call billing for the tools of a ``fastmcp`` 4.x server, as a middleware (``[fastmcp]``).

    billing = BillingMiddleware.from_settings()        # the mcpbill home's ledger, keys, prices
    server = FastMCP("paid")

    @billing.tool(server)                              # registers the tool, adds the middleware
    async def search(q: str) -> list[str]: ...

    @billing.tool(server, max_units=2000)              # per unit: holds 2000 units' worth
    def summarize(text: str) -> str:
        report_units(len(text.split()))
        ...

A tool registered some other way (a mounted or proxied server's) is billed by name with
``billing.bill("child_search")`` once ``billing`` is in the server's middleware
(``billing.install(server)``).

The wire is the same as :class:`~mcpbill_cli.mcp.billing.Billing`'s: the token from
``_meta["dev.mcpbill/token"]``, ``Authorization: Bearer`` (where configured) or
``AGENT_CREDIT_JWT``; the receipt in the result's ``_meta["dev.mcpbill/receipt"]``; refusals
as ``isError`` results; prices in each billed tool's ``_meta["dev.mcpbill/price"]`` in
``tools/list``. fastmcp hands a middleware the request's raw ``_meta``, its id and its HTTP
request through ``fastmcp_context.request_context``; a tool that raises reaches
``on_call_tool`` as a ``ToolError`` and the call is voided.
Add billing innermost (after any caching middleware): a cached answer is never billed.
With an ``acceptor``, billed tools also take x402 payments in ``_meta["x402/payment"]``, as
described in :mod:`mcpbill_cli.mcp.x402`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import mcp_types as mt
from fastmcp import FastMCP
from fastmcp.server.dependencies import FastMCPRequestContext
from fastmcp.server.middleware import CallNext, Middleware, MiddlewareContext
from fastmcp.tools.base import InputRequiredToolResult, Tool, ToolResult

from mcpbill_cli.config import Settings, load_settings
from mcpbill_cli.errors import BillingError
from mcpbill_cli.mcp.billing import BilledTool
from mcpbill_cli.mcp.units import metering
from mcpbill_cli.mcp.wire import (
    LIST_TTL_MS,
    PRICE_META,
    RECEIPT_META,
    authorization_resource,
    bearer_resource,
    check_list_ttl,
    client_address,
    credit_token,
    idempotency_key,
    kept_result,
    list_hints,
    list_hints_middleware,
    replayed,
    round_key,
    unbilled,
    void_held,
)
from mcpbill_cli.mcp.x402 import (
    PaidCall,
    challenged,
    extension_binding_middleware,
    payment_of,
)
from mcpbill_cli.pricing import Price, quote
from mcpbill_cli.receipts import Receipt
from mcpbill_cli.verifier import CALL_SOURCE, Hold, Quote, Verifier
from mcpbill_cli.x402.accept import Acceptor, Unavailable

__all__ = ["BillingMiddleware"]

logger = logging.getLogger("mcpbill")

ToolFn = TypeVar("ToolFn", bound=Callable[..., Any])
CallContext = MiddlewareContext[mt.CallToolRequestParams]
CallToolNext = CallNext[mt.CallToolRequestParams, ToolResult]


class BillingMiddleware(Middleware):
    """Bill the tools registered with :meth:`tool` or :meth:`bill`: check and hold, run,
    capture or void; other tools pass through untouched and need no token.

    Every call of a billed tool needs a credit token. A refusal is an ``isError`` result carrying
    the :class:`~mcpbill_cli.errors.BillingError` object; a paid call carries its signed receipt;
    a call whose tool raised or returned an error is voided. Free tools (price 0) still check the
    token. ``Authorization: Bearer`` is read only when ``resource`` names this server's
    canonical URI, for tokens issued to it (see :class:`~mcpbill_cli.mcp.billing.Billing`);
    ``bearer=`` is deprecated.

    ``tools/list`` carries ``ttlMs`` (``list_ttl_ms``) and ``cacheScope`` (``"private"`` while
    some tenant has prices of its own) on servers it was added to with :meth:`tool` or
    :meth:`install`.
    """

    def __init__(self, verifier: Verifier, *, resource: str | None = None,
                 bearer: bool | None = None, acceptor: Acceptor | None = None,
                 list_ttl_ms: int = LIST_TTL_MS) -> None:
        self.verifier = verifier
        self.resource = bearer_resource(verifier, resource, bearer)
        self.acceptor = acceptor
        self.list_ttl_ms = check_list_ttl(list_ttl_ms)
        self._billed: dict[str, BilledTool] = {}
        self._prices: dict[str, dict[str, Any]] = {}
        self._hinted: list[Any] = []  # the SDK servers whose tools/list got the hints

    @classmethod
    def from_settings(cls, settings: Settings | None = None, *,
                      bearer: bool | None = None) -> BillingMiddleware:
        """Billing on the mcpbill home (``MCPBILL_HOME``): its ledger, keys and pricing table,
        its ``[mcp]`` authorization, and x402 payments where the home configures them (as
        :class:`~mcpbill_cli.mcp.billing.Billing` does)."""
        s = settings or load_settings()
        verifier = Verifier.from_settings(s)
        offered = Acceptor.from_settings(verifier, s)
        if isinstance(offered, Unavailable) and verifier.pricing_table().x402 is not None:
            logger.warning("x402 payments are not offered: %s", offered.reason)
        return cls(verifier, resource=authorization_resource(s), bearer=bearer,
                   acceptor=None if isinstance(offered, Unavailable) else offered)

    @property
    def billed_tools(self) -> dict[str, BilledTool]:
        """The tools this middleware bills, by name."""
        return dict(self._billed)

    def price(self, tool: str, max_units: int | None = None) -> Price:
        """The table's base price of one call (per-unit: the most one call can cost)."""
        return quote(self.verifier.pricing_table(), tool, units=max_units)

    def list_hints(self) -> dict[str, Any]:
        """The ``ttlMs`` and ``cacheScope`` of ``tools/list`` (see
        :func:`~mcpbill_cli.mcp.wire.list_hints`)."""
        return list_hints(self.verifier.pricing_table(), self.list_ttl_ms)

    def install(self, server: FastMCP[Any]) -> None:
        """Add this middleware to ``server`` (once), and the cache hints to its ``tools/list``.

        fastmcp's ``on_list_tools`` sees tools, not the result that carries ``ttlMs``: the
        hints go in through the MCP SDK server underneath, as a middleware of its own."""
        if self not in server.middleware:
            server.add_middleware(self)
        lowlevel = server._mcp_server  # noqa: SLF001 - fastmcp has no public handle on it
        if any(lowlevel is hinted for hinted in self._hinted):
            return
        own = lowlevel.cache_hints.get("tools/list")  # FastMCP(cache_ttl=...): kept as a bound
        lowlevel.middleware.append(list_hints_middleware(self.list_hints, own))
        if self.acceptor is not None:  # x402's extension binding, beside the tool-result one
            lowlevel.middleware.append(extension_binding_middleware())
        self._hinted.append(lowlevel)

    def bill(self, name: str, *, max_units: int | None = None) -> None:
        """Bill every call of the tool listed as ``name``; ``max_units`` bounds a per-unit hold.

        A tool the pricing table cannot price is refused here (PRICE_UNKNOWN), not per call.
        """
        advertised = self.price(name, max_units).to_dict()
        self._billed[name] = BilledTool(name, max_units)
        self._prices[name] = advertised

    def tool(self, server: FastMCP[Any], name: str | None = None, *,
             max_units: int | None = None, **options: Any) -> Callable[[ToolFn], ToolFn]:
        """Register a billed tool with ``server.tool`` and :meth:`install` this middleware.

        ``options`` go to ``server.tool`` (``title``, ``description``, ``meta``, ``tags``...).
        The function is returned as is, so it stays callable (unbilled) in unit tests.
        """

        def register(fn: ToolFn) -> ToolFn:
            self.bill(name or fn.__name__, max_units=max_units)
            server.tool(fn, name=name or fn.__name__, **options)
            self.install(server)
            return fn

        return register

    async def on_list_tools(self, context: MiddlewareContext[mt.ListToolsRequest],
                            call_next: CallNext[mt.ListToolsRequest, Sequence[Tool]],
                            ) -> Sequence[Tool]:
        """Advertise each billed tool's price in its ``_meta["dev.mcpbill/price"]``."""
        return [self._advertised(tool) for tool in await call_next(context)]

    async def on_call_tool(self, context: CallContext, call_next: CallToolNext) -> ToolResult:
        """Bill a call of a billed tool; pass any other call through untouched."""
        tool = self._billed.get(context.message.name)
        if tool is None:
            return await call_next(context)
        request = _request_of(context)
        source = CALL_SOURCE.set(client_address(request.request if request else None))
        try:
            payment = payment_of(request.meta if request else None) if self.acceptor else None
            if payment is not None:
                return await self._paid_call(self._paid(tool, context, payment), context,
                                             call_next)
            return await self._billed_call(tool, context, call_next)
        except BillingError as error:
            return ToolResult.from_mcp_result(self._refusal(error, tool, context))
        finally:
            CALL_SOURCE.reset(source)

    # --- one call -------------------------------------------------------------------------------

    def _advertised(self, tool: Tool) -> Tool:
        price = self._prices.get(tool.name)
        if price is None:
            return tool
        return tool.model_copy(update={"meta": {**(tool.meta or {}), PRICE_META: price}})

    async def _billed_call(self, tool: BilledTool, context: CallContext,
                           call_next: CallToolNext) -> ToolResult:
        request = _request_of(context)
        meta = request.meta if request is not None else None
        http = request.request if request is not None else None
        opened = await self.verifier.abegin(
            credit_token(meta, http, resource=self.resource), tool.name,
            args=dict(context.message.arguments or {}),
            idempotency_key=round_key(idempotency_key(meta), context.message),
            max_units=tool.max_units)
        if isinstance(opened, Quote):  # a free tool: the token was checked, nothing is held
            with metering(tool.name):
                return await call_next(context)
        if opened.replayed is not None:  # made already: the tool does not run again
            return ToolResult.from_mcp_result(replayed(opened.replayed, opened.result))
        return await self._settle(opened, context, call_next)

    async def _settle(self, hold: Hold, context: CallContext,
                      call_next: CallToolNext) -> ToolResult:
        """Run the tool on a hold: capture a success, void a failure (charge only on success)."""
        try:
            with metering(hold.tool) as meter:
                result = await call_next(context)
        except BaseException:
            await self._void(hold)
            raise
        if result.is_error or isinstance(result, InputRequiredToolResult):
            await self._void(hold, _unbilled(result))  # an error, or an interim round
            return result
        receipt = await self.verifier.acapture(hold, units=meter.units,
                                               result=kept_result(_as_mcp(result)))
        return _with_receipt(result, receipt)

    def _refusal(self, error: BillingError, tool: BilledTool,
                 context: CallContext) -> mt.CallToolResult:
        """A refusal, with x402's challenge where it is offered (BUDGET_EXCEEDED: at the
        token's tenant's price)."""
        tenant = None
        if error.code == "BUDGET_EXCEEDED" and self.acceptor is not None:
            request = _request_of(context)
            tenant = self.verifier.claims_of(credit_token(
                request.meta if request else None, request.request if request else None,
                resource=self.resource)).tenant
        return challenged(error, self.acceptor, tool.name, tenant)

    # --- a call paid with x402 ------------------------------------------------------------------

    def _paid(self, tool: BilledTool, context: CallContext, payment: Any) -> PaidCall:
        """The paid call; a valid credit token sent along names its tenant and agent."""
        assert self.acceptor is not None  # noqa: S101 - payment_of() is read only with one
        request = _request_of(context)
        meta = request.meta if request is not None else None
        http = request.request if request is not None else None
        tenant = agent = None
        try:
            token = credit_token(meta, http, resource=self.resource)
        except BillingError:
            token = None
        if token is not None:
            claims = self.verifier.claims_of(token)
            tenant, agent = claims.tenant, claims.agent
        return PaidCall(self.acceptor, tool.name, payment,
                        dict(context.message.arguments or {}), tenant=tenant, agent=agent)

    async def _paid_call(self, paid: PaidCall, context: CallContext,
                         call_next: CallToolNext) -> ToolResult:
        """Reserve the payment, run the tool once, then settle and record (or release)."""
        answer = await paid.open()  # the tool-result binding: never a payment_required dict
        if answer is not None:
            return ToolResult.from_mcp_result(cast(mt.CallToolResult, answer))
        try:
            result = await call_next(context)
        except BaseException:
            await paid.cancelled()
            raise
        if result.is_error or isinstance(result, InputRequiredToolResult):
            await paid.unpaid(_unbilled(result))
            return result
        closed = await paid.close(_as_mcp(result))
        return ToolResult.from_mcp_result(cast(mt.CallToolResult, closed))

    async def _void(self, hold: Hold, outcome: str = "voided") -> None:
        await void_held(self.verifier, hold, outcome)


def _request_of(context: CallContext) -> FastMCPRequestContext | None:
    """The MCP request behind this call (``None`` when the server is called in process)."""
    fastmcp_context = context.fastmcp_context
    return None if fastmcp_context is None else fastmcp_context.request_context


def _unbilled(result: ToolResult) -> str:
    """:func:`~mcpbill_cli.mcp.wire.unbilled` for fastmcp's result of a round."""
    return unbilled(result.input_required if isinstance(result, InputRequiredToolResult)
                    else result)


def _as_mcp(result: ToolResult) -> mt.CallToolResult:
    """A successful result as the protocol object the agent receives."""
    return mt.CallToolResult(content=result.content, structured_content=result.structured_content,
                             _meta=result.meta, is_error=False)  # type: ignore[call-arg]


def _with_receipt(result: ToolResult, receipt: Receipt) -> ToolResult:
    return result.model_copy(update={"meta": {**(result.meta or {}),
                                              RECEIPT_META: receipt.to_dict()}})

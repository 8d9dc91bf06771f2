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
``billing.bill("child_search")`` once ``billing`` is in the server's middleware.

The wire is the same as :class:`~mcpbill_cli.mcp.billing.Billing`'s: the token from
``_meta["dev.mcpbill/token"]``, ``Authorization: Bearer`` (where configured) or
``AGENT_CREDIT_JWT``; the receipt in the result's ``_meta["dev.mcpbill/receipt"]``; refusals
as ``isError`` results; prices in each billed tool's ``_meta["dev.mcpbill/price"]`` in
``tools/list``. fastmcp hands a middleware the request's raw ``_meta``, its id and its HTTP
request through ``fastmcp_context.request_context``; a tool that raises reaches
``on_call_tool`` as a ``ToolError`` and the call is voided.
Add billing innermost (after any caching middleware): a cached answer is never billed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import anyio
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
    PRICE_META,
    RECEIPT_META,
    authorization_resource,
    bearer_resource,
    client_address,
    credit_token,
    idempotency_key,
    kept_result,
    refusal,
    replayed,
)
from mcpbill_cli.pricing import Price, quote
from mcpbill_cli.receipts import Receipt
from mcpbill_cli.verifier import CALL_SOURCE, Hold, Quote, Verifier

__all__ = ["BillingMiddleware"]

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
    """

    def __init__(self, verifier: Verifier, *, resource: str | None = None,
                 bearer: bool | None = None) -> None:
        self.verifier = verifier
        self.resource = bearer_resource(verifier, resource, bearer)
        self._billed: dict[str, BilledTool] = {}
        self._prices: dict[str, dict[str, Any]] = {}

    @classmethod
    def from_settings(cls, settings: Settings | None = None, *,
                      bearer: bool | None = None) -> BillingMiddleware:
        """Billing on the mcpbill home (``MCPBILL_HOME``): its ledger, keys and pricing table,
        and its ``[mcp]`` authorization."""
        s = settings or load_settings()
        return cls(Verifier.from_settings(s), resource=authorization_resource(s), bearer=bearer)

    @property
    def billed_tools(self) -> dict[str, BilledTool]:
        """The tools this middleware bills, by name."""
        return dict(self._billed)

    def price(self, tool: str, max_units: int | None = None) -> Price:
        """The table's base price of one call (per-unit: the most one call can cost)."""
        return quote(self.verifier.pricing_table(), tool, units=max_units)

    def bill(self, name: str, *, max_units: int | None = None) -> None:
        """Bill every call of the tool listed as ``name``; ``max_units`` bounds a per-unit hold.

        A tool the pricing table cannot price is refused here (PRICE_UNKNOWN), not per call.
        """
        advertised = self.price(name, max_units).to_dict()
        self._billed[name] = BilledTool(name, max_units)
        self._prices[name] = advertised

    def tool(self, server: FastMCP[Any], name: str | None = None, *,
             max_units: int | None = None, **options: Any) -> Callable[[ToolFn], ToolFn]:
        """Register a billed tool with ``server.tool`` and add this middleware to ``server``.

        ``options`` go to ``server.tool`` (``title``, ``description``, ``meta``, ``tags``...).
        The function is returned as is, so it stays callable (unbilled) in unit tests.
        """

        def register(fn: ToolFn) -> ToolFn:
            self.bill(name or fn.__name__, max_units=max_units)
            server.tool(fn, name=name or fn.__name__, **options)
            if self not in server.middleware:
                server.add_middleware(self)
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
            return await self._billed_call(tool, context, call_next)
        except BillingError as error:
            return ToolResult.from_mcp_result(refusal(error))
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
            args=dict(context.message.arguments or {}), idempotency_key=idempotency_key(meta),
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
            await self._void(hold)  # an error, or an interim round of a multi-round call
            return result
        receipt = await self.verifier.acapture(hold, units=meter.units,
                                               result=kept_result(_as_mcp(result)))
        return _with_receipt(result, receipt)

    async def _void(self, hold: Hold) -> None:
        # Shielded: a call cancelled by its client must still release what it held.
        with anyio.CancelScope(shield=True):
            await self.verifier.avoid(hold)


def _request_of(context: CallContext) -> FastMCPRequestContext | None:
    """The MCP request behind this call (``None`` when the server is called in process)."""
    fastmcp_context = context.fastmcp_context
    return None if fastmcp_context is None else fastmcp_context.request_context


def _as_mcp(result: ToolResult) -> mt.CallToolResult:
    """A successful result as the protocol object the agent receives."""
    return mt.CallToolResult(content=result.content, structured_content=result.structured_content,
                             _meta=result.meta, is_error=False)  # type: ignore[call-arg]


def _with_receipt(result: ToolResult, receipt: Receipt) -> ToolResult:
    return result.model_copy(update={"meta": {**(result.meta or {}),
                                              RECEIPT_META: receipt.to_dict()}})

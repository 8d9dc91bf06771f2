"""The ASGI middleware that bills plain HTTP endpoints: check and hold, run, capture or void.

    app.add_middleware(PaymentMiddleware, verifier=verifier,
                       routes={"GET /report": "report", "POST /search": "search"})

A billed request, top to bottom: its body is read (the verifier's dedupe key covers it); an
x402 payment, when one came and the middleware takes them, pays the call (see
:mod:`mcpbill_cli.http.payments`); otherwise the verifier opens the call on the credit token (a
refusal answers it; a free call runs unbilled; a replay answers with the kept response); the
endpoint runs with its response held back; a 2xx is captured and sent with its receipt,
anything else (an error status, an exception, a response over the buffer) is voided. Nothing
of a billed response leaves before its capture has committed.

Metrics and spans are the verifier's, as for MCP calls (``verifier.enable_metrics()``,
``verifier.enable_tracing()``): the verifier counts holds, captures, voids, replays and its own
refusals; the middleware adds what the verifier never sees (free calls made without a token, a
missing token, a request or response over its buffer). A traced request gets an
``mcpbill.call`` span joined to the W3C ``traceparent`` header the client sent (or to the span
an ASGI instrumentation opened for the request).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from mcpbill_cli.errors import BillingError, DuplicateCall, InvalidCreditToken, ResponseTooLarge
from mcpbill_cli.http.asgi import (
    ASGIApp,
    BufferedRequest,
    BufferedResponse,
    ClientGone,
    Receive,
    Scope,
    Send,
    read_request,
    replaying,
    route_path,
    run_buffered,
)
from mcpbill_cli.http.routes import PaidRoute, RouteTable
from mcpbill_cli.http.units import metering
from mcpbill_cli.http.wire import (
    IDEMPOTENCY_KEY_HEADER,
    TOKEN_HEADER,
    receipt_header,
    refusal,
    replayed_header,
)
from mcpbill_cli.pricing import quote
from mcpbill_cli.receipts import Receipt
from mcpbill_cli.tracing import ended, step
from mcpbill_cli.verifier import CALL_SOURCE, Hold, Quote, Verifier

if TYPE_CHECKING:
    from mcpbill_cli.http.payments import Payment, Run, X402Gate
    from mcpbill_cli.x402.accept import Acceptor, Unavailable

__all__ = ["PaymentMiddleware"]

logger = logging.getLogger("mcpbill")

MAX_REQUEST_BYTES = 1024 * 1024  # a billed request's body is read whole before the call opens
MAX_RESPONSE_BYTES = 8 * 1024 * 1024  # a billed response is held whole until its capture

Headers = list[tuple[bytes, bytes]]


class PaymentMiddleware:
    """Bill the requests of ``routes`` with ``verifier``; pass every other request through.

    ``routes`` maps ``"METHOD /path"`` to a tool name of the pricing table (or is a list of
    :class:`~mcpbill_cli.http.PaidRoute`). A route whose tool the table cannot price is refused
    here (PRICE_UNKNOWN), not per request. A free tool needs no credit token; a token sent to
    it is still checked. ``token_header`` names the request header the credit token comes in.

    ``acceptor`` (:meth:`Acceptor.from_settings <mcpbill_cli.x402.accept.Acceptor.from_settings>`)
    takes x402 payments for the tools the pricing table offers them on, and answers a missing
    token or BUDGET_EXCEEDED there with a 402 challenge; an :class:`Unavailable` one is logged
    and ignored, as is ``None``.
    """

    def __init__(self, app: ASGIApp, *, verifier: Verifier,
                 routes: Mapping[str, str] | Iterable[PaidRoute],
                 acceptor: Acceptor | Unavailable | None = None,
                 token_header: str = TOKEN_HEADER, max_request_bytes: int = MAX_REQUEST_BYTES,
                 max_response_bytes: int = MAX_RESPONSE_BYTES) -> None:
        self.app = app
        self.verifier = verifier
        self.routes = RouteTable.of(routes)
        self.token_header = token_header
        self.max_request_bytes = max_request_bytes
        self.max_response_bytes = max_response_bytes
        self.gate = _gate(acceptor)
        table = verifier.pricing.current()  # the file's table: no ledger needed to start
        for route in self.routes.routes:
            quote(table, route.tool, units=route.max_units)  # PRICE_UNKNOWN now, not per call

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = (self.routes.match(scope["method"], route_path(scope))
                 if scope["type"] == "http" else None)
        if route is None:
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        source = CALL_SOURCE.set(str(client[0]) if client else "")
        try:
            await self._traced(route, scope, receive, send)
        except ClientGone:
            return  # nothing was opened: the client left before its request arrived
        finally:
            CALL_SOURCE.reset(source)

    async def _traced(self, route: PaidRoute, scope: Scope, receive: Receive,
                      send: Send) -> None:
        """One billed request, in an ``mcpbill.call`` span when the verifier traces calls."""
        tracing = self.verifier.tracing
        if tracing is None:
            await self._billed(route, scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1")
                   for key, value in scope.get("headers") or ()}
        with tracing.call(route.tool, headers):  # joins the request's traceparent header
            await self._billed(route, scope, receive, send)

    # --- one billed request ---------------------------------------------------------------------

    async def _billed(self, route: PaidRoute, scope: Scope, receive: Receive,
                      send: Send) -> None:
        try:
            request = await read_request(scope, receive, self.max_request_bytes)
        except BillingError as error:  # REQUEST_TOO_LARGE
            self._refused_here(error, route.tool)
            await refusal(error).send_to(send, [])
            return
        app_receive = replaying(request.body, receive)
        payment = self.gate.payment_of(request) if self.gate is not None else None
        if payment is not None and not await self._free(route):
            ran: list[BufferedResponse] = []

            async def run() -> BufferedResponse:
                ran.append(await run_buffered(self.app, scope, app_receive,
                                              self.max_response_bytes))
                return ran[0]

            answer, extra = await self._pay(payment, route, request, run)
            await answer.send_to(send, extra)
            for response in ran:
                await response.finish()
            return
        opened = await self._open(route, request)
        if isinstance(opened, BufferedResponse):  # refused
            await opened.send_to(send, [])
        elif not isinstance(opened, Hold):  # free: nothing to hold, nothing to hold back
            self._free_call(route.tool, counted=opened is not None)
            await self.app(scope, app_receive, send)
        elif opened.replayed is not None:
            ended("replayed", amount=opened.replayed.amount)
            await _replay(opened, opened.replayed).send_to(
                send, [receipt_header(opened.replayed), replayed_header()])
        else:
            response, units = await self._run(opened, scope, app_receive)
            answer, extra = await self._settle(opened, response, units)
            await answer.send_to(send, extra)
            await response.finish()

    async def _pay(self, payment: Payment, route: PaidRoute, request: BufferedRequest,
                   run: Run) -> tuple[BufferedResponse, Headers]:
        """A request paid with x402; a credit token sent along (it must verify) books it to
        its tenant and agent, at its tenant's price."""
        assert self.gate is not None  # noqa: S101 - a payment is read only with a gate
        token = request.header(self.token_header)
        try:
            claims = (None if token is None
                      else await asyncio.to_thread(self.verifier.claims_of, token))
        except BillingError as error:
            return refusal(error), []
        return await self.gate.pay(payment, route.tool, request, run,
                                   tenant=claims.tenant if claims else None,
                                   agent=claims.agent if claims else None)

    async def _open(self, route: PaidRoute, request: BufferedRequest
                    ) -> Hold | Quote | BufferedResponse | None:
        """The verifier's begin for this request; ``None`` for a free tool called without a
        token; a refusal as its response."""
        token = request.header(self.token_header)
        if token is None:
            if await self._free(route):
                return None
            missing = self._missing_token()
            self._refused_here(missing, route.tool)
            return await self._refused(missing, route, request)
        try:
            with step(self.verifier.tracing, "hold"):
                return await self.verifier.abegin(
                    token, route.tool, args=request.arguments(),
                    idempotency_key=request.header(IDEMPOTENCY_KEY_HEADER),
                    max_units=route.max_units)
        except BillingError as error:  # the verifier counted it
            ended("refused", code=error.code)
            return await self._refused(error, route, request)

    async def _refused(self, error: BillingError, route: PaidRoute,
                       request: BufferedRequest) -> BufferedResponse:
        """The refusal's response; with x402 on, a missing token or BUDGET_EXCEEDED is also
        a challenge (402) that a payment can answer (over budget: at the token's tenant's
        price)."""
        if self.gate is None:
            return refusal(error)
        if error.code == "BUDGET_EXCEEDED":  # the token verified: its tenant's price
            token = request.header(self.token_header) or ""
            tenant = (await asyncio.to_thread(self.verifier.claims_of, token)).tenant
            return await self.gate.challenge(error, route.tool, request.url, tenant=tenant)
        if error.details.get("reason") == "missing":
            return await self.gate.challenge(error, route.tool, request.url)
        return refusal(error)

    async def _run(self, hold: Hold, scope: Scope, receive: Receive
                   ) -> tuple[BufferedResponse, int | None]:
        """Run the endpoint, its response held back; an exception voids the hold."""
        with metering() as meter:
            try:
                response = await run_buffered(self.app, scope, receive, self.max_response_bytes)
            except BaseException:
                await self._void(hold)
                ended("voided")
                raise
        return response, meter.units

    async def _settle(self, hold: Hold, response: BufferedResponse, units: int | None
                      ) -> tuple[BufferedResponse, Headers]:
        """Capture a 2xx and attach its receipt; void anything else and pass it on."""
        if not response.succeeded:
            await self._void(hold)
            if response.too_large:
                too_large = ResponseTooLarge(
                    f"the endpoint answered with more than {self.max_response_bytes} bytes, "
                    "the most a billed response is held back; the call was not billed",
                    limitBytes=self.max_response_bytes, tool=hold.tool)
                if self.verifier.metrics is not None:
                    self.verifier.metrics.refusal(hold.tool, too_large.code)  # the call: voided
                ended("voided", code=too_large.code)
                return refusal(too_large), []
            ended("voided")
            return response, []
        try:
            with step(self.verifier.tracing, "capture"):
                receipt = await self.verifier.acapture(hold, units=units,
                                                       result=response.to_json())
        except BillingError as error:  # e.g. the hold lapsed: not billed, output withheld
            ended("refused", code=error.code)  # the verifier counted it
            return refusal(error), []
        ended("captured", amount=receipt.amount)
        return response, [receipt_header(receipt)]

    async def _void(self, hold: Hold) -> None:
        """Release ``hold``; shielded, so a request cancelled by its client still releases it.
        A void the ledger refuses leaves the hold to lapse by itself (it is no longer kept
        alive): the endpoint's answer still stands."""
        try:
            with step(self.verifier.tracing, "void"):
                await asyncio.shield(self.verifier.avoid(hold))
        except BillingError as failure:
            logger.warning("could not void hold %s: %s", hold.id, failure.message)

    def _refused_here(self, error: BillingError, tool: str) -> None:
        """Count a refusal of the middleware's own (the verifier never saw the call)."""
        if self.verifier.metrics is not None:
            self.verifier.metrics.refused(tool, error.code)
        ended("refused", code=error.code)

    def _free_call(self, tool: str, *, counted: bool) -> None:
        """A free call runs unbilled; the verifier counted it when a token came along."""
        if not counted and self.verifier.metrics is not None:
            self.verifier.metrics.finished(tool, "free")
        ended("free")

    async def _free(self, route: PaidRoute) -> bool:
        """Whether an anonymous call of ``route`` costs nothing (its base price is 0); not a
        tool the table lost the price of since the app started (the verifier refuses a call
        with a token PRICE_UNKNOWN; one without is asked for a token)."""
        table = await asyncio.to_thread(self.verifier.pricing.current)  # a file read at most
        try:
            return quote(table, route.tool, units=route.max_units).free
        except BillingError:
            return False

    def _missing_token(self) -> InvalidCreditToken:
        how = " or pay with x402 (PAYMENT-SIGNATURE)" if self.gate is not None else ""
        return InvalidCreditToken(
            f"no credit token: send one in the {self.token_header} header (Authorization is "
            f"not read for it){how}; ask the operator for one with `mcpbill token issue`",
            reason="missing")


def _gate(acceptor: Acceptor | Unavailable | None) -> X402Gate | None:
    """The x402 side for ``acceptor``; imported only when there is one (it loads the chain)."""
    if acceptor is None:
        return None
    from mcpbill_cli.http.payments import X402Gate
    from mcpbill_cli.x402.accept import Unavailable

    if isinstance(acceptor, Unavailable):
        logger.warning("x402 payments are not taken on HTTP: %s", acceptor.reason)
        return None
    return X402Gate(acceptor)


def _replay(hold: Hold, receipt: Receipt) -> BufferedResponse:
    """A replay's answer: the first run's kept response, else DUPLICATE_CALL with its receipt
    (the response was over the verifier's ``result_cap``)."""
    kept = BufferedResponse.from_json(hold.result) if hold.result is not None else None
    if kept is not None:
        return kept
    return refusal(DuplicateCall(
        f"this request was made already (receipt {receipt.receipt_id}) and its response was "
        "too large to keep; it is not run or billed again", receipt=receipt))

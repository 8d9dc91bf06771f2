"""mcpbill for plain HTTP: an ASGI middleware (Starlette, FastAPI) that bills routes per call.

    from mcpbill_cli import Verifier
    from mcpbill_cli.http import PaymentMiddleware

    app = FastAPI()
    app.add_middleware(PaymentMiddleware, verifier=Verifier.from_settings(),
                       routes={"GET /report": "report", "POST /summarize": "summarize"})

A request to a billed route sends its credit token in ``Mcpbill-Token`` (``Authorization``
stays the application's), may send an ``Idempotency-Key``, and gets its signed receipt in
``Mcpbill-Receipt``. See :mod:`mcpbill_cli.http.wire` for the wire shapes and
:class:`PaymentMiddleware` for the flow. Pure ASGI: no framework is imported.
"""

from __future__ import annotations

from mcpbill_cli.http.middleware import MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES, PaymentMiddleware
from mcpbill_cli.http.routes import PaidRoute
from mcpbill_cli.http.units import report_units
from mcpbill_cli.http.wire import (
    IDEMPOTENCY_KEY_HEADER,
    RECEIPT_HEADER,
    REPLAYED_HEADER,
    STATUS,
    TOKEN_HEADER,
)

__all__ = [
    "IDEMPOTENCY_KEY_HEADER",
    "MAX_REQUEST_BYTES",
    "MAX_RESPONSE_BYTES",
    "RECEIPT_HEADER",
    "REPLAYED_HEADER",
    "STATUS",
    "TOKEN_HEADER",
    "PaidRoute",
    "PaymentMiddleware",
    "report_units",
]

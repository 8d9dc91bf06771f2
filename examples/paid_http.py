"""A paid HTTP API: a free ``GET /status``, a paid ``POST /search`` and a per-word
``POST /summarize``, billed by mcpbill's ASGI middleware.

    pip install 'mcpbill' starlette uvicorn
    python examples/paid_http.py --port 8000

Prices, keys and the ledger come from the mcpbill home (``MCPBILL_HOME``, see ``mcpbill init``);
the sample pricing table prices status at 0, search at 0.002 and summarize at 0.00001 a word.
A client sends its credit token in the ``Mcpbill-Token`` header and gets its signed receipt in
``Mcpbill-Receipt``; where pricing.toml has ``[x402]`` (live mode, a chain and a deposit
address), an x402 client pays ``POST /search`` with ``PAYMENT-SIGNATURE`` instead::

    curl -s -X POST localhost:8000/search -H "Mcpbill-Token: $TOKEN" \\
         -H 'content-type: application/json' -d '{"q": "usdc"}' -D -
"""

from __future__ import annotations

import argparse
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from mcpbill_cli import Verifier
from mcpbill_cli.http import PaidRoute, PaymentMiddleware, report_units
from mcpbill_cli.x402.accept import Acceptor

MAX_WORDS = 2000  # summarize holds 2000 words' worth while it runs, and captures what it used

ROUTES = [
    PaidRoute("GET", "/status", "status"),
    PaidRoute("POST", "/search", "search"),
    PaidRoute("POST", "/summarize", "summarize", max_units=MAX_WORDS),
]


async def status(request: Request) -> JSONResponse:
    """Free: no token needed (one sent is still checked)."""
    return JSONResponse({"status": "ok"})


async def search(request: Request) -> JSONResponse:
    """Billed per call; an error status (here: an empty query) is voided, not billed."""
    query = str((await _json(request)).get("q", "")).strip()
    if not query:
        return JSONResponse({"error": "the query is empty"}, status_code=400)
    return JSONResponse({"results": [f"{query}: result {n}" for n in range(1, 4)]})


async def summarize(request: Request) -> JSONResponse:
    """Billed per word, at most 2000 words."""
    words = str((await _json(request)).get("text", "")).split()
    if not words or len(words) > MAX_WORDS:
        return JSONResponse({"error": f"send 1 to {MAX_WORDS} words"}, status_code=400)
    report_units(len(words))
    return JSONResponse({"summary": " ".join(words[:12]) + (" ..." if len(words) > 12 else "")})


async def _json(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def build_app(verifier: Verifier, acceptor: Any = None) -> Starlette:
    """The example API, billed by ``verifier``; x402 payments through ``acceptor``
    (:meth:`Acceptor.from_settings`: none in demo mode or without ``[x402]``)."""
    return Starlette(
        routes=[Route("/status", status), Route("/search", search, methods=["POST"]),
                Route("/summarize", summarize, methods=["POST"])],
        middleware=[Middleware(PaymentMiddleware, verifier=verifier, routes=ROUTES,
                               acceptor=acceptor)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A paid HTTP API (mcpbill example).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    verifier = Verifier.from_settings()
    try:
        app = build_app(verifier, Acceptor.from_settings(verifier))
        uvicorn.run(app, host=args.host, port=args.port)
    finally:
        verifier.close()


if __name__ == "__main__":
    main()

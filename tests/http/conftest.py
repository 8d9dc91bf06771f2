"""A FastAPI app behind the billing middleware, served by uvicorn on 127.0.0.1 for the session,
and a verifier on a real ledger (SQLite file, PostgreSQL schema) per test.

The server is started once; each test points it at its own app (its own verifier and ledger)
through :class:`Switch`, so a test costs no server start.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import Engine

from mcpbill_cli.clock import utcnow
from mcpbill_cli.http import PaidRoute, PaymentMiddleware, report_units
from mcpbill_cli.keys import KeyRing, KeySource, init_keyring
from mcpbill_cli.ledger import credit, invariants
from mcpbill_cli.ledger.credit import IssuedToken, TokenView
from mcpbill_cli.ledger.engine import reading, writing
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.verifier import Verifier
from tests.verifier.billing_support import PRICING_DOC, USDC, fund, mint
from tests.wallet.conftest import token_build  # noqa: F401 - the session's compiled test USDC
from tests.x402.conftest import fuji_anvil, peer  # noqa: F401 - the chain x402 payments use
from tests.x402.peer import ServedApp

ROUTES = [
    PaidRoute("GET", "/report", "search"),
    PaidRoute("POST", "/search", "search"),
    PaidRoute("GET", "/reports/{id}", "translate"),
    PaidRoute("GET", "/status", "status"),
    PaidRoute("GET", "/broken", "search"),
    PaidRoute("GET", "/crash", "search"),
    PaidRoute("GET", "/big", "search"),
    PaidRoute("GET", "/slow", "search"),
    PaidRoute("POST", "/summarize", "summarize", max_units=2000),
    PaidRoute("GET", "/hang", "search"),  # hangs in tests/http/crash_server.py only
]
MAX_RESPONSE = 64 * 1024
MAX_REQUEST = 16 * 1024
Mint = Callable[..., IssuedToken]


@dataclass
class Endpoints:
    """What the app's endpoints did: how often each ran; ``gate`` holds ``/slow`` back."""

    runs: Counter[str] = field(default_factory=Counter)
    gate: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)


def build_app(verifier: Verifier, endpoints: Endpoints) -> FastAPI:
    app = FastAPI()
    app.add_middleware(PaymentMiddleware, verifier=verifier, routes=ROUTES,
                       max_request_bytes=MAX_REQUEST, max_response_bytes=MAX_RESPONSE)
    _paid_endpoints(app, endpoints.runs)
    _failing_endpoints(app, endpoints)
    _unbilled_endpoints(app, endpoints.runs)
    return app


def _paid_endpoints(app: FastAPI, runs: Counter[str]) -> None:
    @app.get("/hang")
    async def hang() -> dict[str, Any]:
        runs["hang"] += 1
        return {"finished": True}


    @app.api_route("/report", methods=["GET", "HEAD"])  # HEAD runs it too, as Starlette's do
    async def report(request: Request) -> dict[str, Any]:
        runs["report"] += 1
        # The application's own auth header reaches the endpoint untouched.
        return {"report": "paid content", "run": runs["report"],
                "authorization": request.headers.get("authorization")}

    @app.post("/search")
    async def search(request: Request) -> dict[str, Any]:
        runs["search"] += 1
        return {"query": (await request.json())["q"], "run": runs["search"]}

    @app.get("/reports/{report_id}")
    def one_report(report_id: str) -> dict[str, Any]:
        runs["reports"] += 1
        return {"id": report_id}

    @app.get("/status")
    async def status() -> dict[str, Any]:
        runs["status"] += 1
        return {"status": "ok"}

    @app.post("/summarize")
    def summarize(body: dict[str, str]) -> dict[str, Any]:
        runs["summarize"] += 1
        words = body["text"].split()
        report_units(len(words))
        return {"words": len(words)}


def _failing_endpoints(app: FastAPI, endpoints: Endpoints) -> None:
    runs = endpoints.runs

    @app.get("/broken")
    async def broken() -> Response:
        runs["broken"] += 1
        return JSONResponse({"error": "upstream down"}, status_code=500)

    @app.get("/crash")
    async def crash() -> None:
        runs["crash"] += 1
        raise RuntimeError("the endpoint crashed")

    @app.get("/big")
    async def big() -> Response:
        runs["big"] += 1
        return Response(b"x" * (MAX_RESPONSE + 1), media_type="text/plain")

    @app.get("/slow")
    async def slow() -> dict[str, Any]:
        runs["slow"] += 1
        endpoints.entered.set()
        await asyncio.to_thread(endpoints.gate.wait, 10)
        return {"slow": True}


def _unbilled_endpoints(app: FastAPI, runs: Counter[str]) -> None:
    @app.get("/free")
    async def unbilled() -> dict[str, Any]:
        runs["free"] += 1
        return {"free": True}

    @app.get("/private")
    async def private(request: Request) -> dict[str, Any]:
        if request.headers.get("authorization") != "Bearer app-secret":
            raise HTTPException(status_code=401, detail="the app's own auth")
        return {"private": True}


class Switch:
    """An ASGI app that forwards to whichever app the current test set."""

    app: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return
        await self.app(scope, receive, send)


@pytest.fixture(scope="session")
def served() -> Iterator[tuple[Switch, str]]:
    switch = Switch()
    server = ServedApp(switch)
    try:
        yield switch, server.start()
    finally:
        server.stop()


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "keys"
    init_keyring(directory, "EdDSA", now=utcnow(), force=False).save()
    return directory


@pytest.fixture
def verifier(engine: Engine, keys_dir: Path) -> Iterator[Verifier]:
    """A ledger-backed verifier; tenants acme and beta are funded with 100 USDC each."""
    fund(engine, "acme", 100 * USDC, now=utcnow())
    fund(engine, "beta", 100 * USDC, now=utcnow())
    verifier = Verifier(keys=KeySource(directory=keys_dir),
                        pricing=PricingTable.from_document(PRICING_DOC), engine=engine)
    yield verifier
    verifier.close()


@pytest.fixture
def endpoints() -> Endpoints:
    return Endpoints()


@pytest.fixture
def client(served: tuple[Switch, str], verifier: Verifier,
           endpoints: Endpoints) -> Iterator[httpx.Client]:
    """An HTTP client of the billed app, served for real."""
    switch, url = served
    switch.app = build_app(verifier, endpoints)
    with httpx.Client(base_url=url, timeout=30) as http:
        yield http
    endpoints.gate.set()
    switch.app = None


@pytest.fixture
def new_token(verifier: Verifier, keys_dir: Path) -> Callable[..., IssuedToken]:
    """``new_token(limit=..., tenant=..., scope=...)``: a credit token on the ledger."""

    def make(limit: int = USDC, tenant: str = "acme",
             scope: list[str] | None = None) -> IssuedToken:
        assert verifier.engine is not None
        return mint(verifier.engine, KeyRing.load(keys_dir), now=utcnow(), limit=limit,
                    tenant=tenant, scope=scope or ["*"])

    return make


def view(engine: Engine, token: IssuedToken) -> TokenView:
    with reading(engine) as conn:
        return credit.show(conn, token.claims.jti, now=utcnow())


def revoke(engine: Engine, token: IssuedToken) -> None:
    with writing(engine) as conn:
        credit.revoke(conn, [token.claims.jti], reason="test", clock=utcnow)


def assert_ledger_sound(engine: Engine) -> None:
    with reading(engine) as conn:
        assert invariants.check(conn) == []

"""The middleware where apps are not one flat FastAPI: mounted under a prefix or served with a
root path (paid routes are billed as the app routes them), a streamed response its client left
before its end (not billed, not replayed), and background tasks that run after a response (not
waited for, and a failing one does not void a call that succeeded). Served by uvicorn for real,
on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomli_w
import uvicorn
from fastapi import BackgroundTasks, FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import Engine
from starlette.applications import Starlette
from starlette.routing import Mount

from mcpbill_cli.errors import InvalidInput
from mcpbill_cli.http import (
    IDEMPOTENCY_KEY_HEADER,
    RECEIPT_HEADER,
    REPLAYED_HEADER,
    TOKEN_HEADER,
    PaidRoute,
    PaymentMiddleware,
)
from mcpbill_cli.keys import KeySource
from mcpbill_cli.ledger.credit import IssuedToken
from mcpbill_cli.pricing.source import PricingSource
from mcpbill_cli.verifier import Verifier
from tests.verifier.billing_support import PRICE, PRICING_DOC

from .conftest import assert_ledger_sound, view

Mint = Callable[..., IssuedToken]
ROUTES = [PaidRoute("POST", "/search", "search"), PaidRoute("GET", "/events", "search"),
          PaidRoute("POST", "/order", "search"), PaidRoute("GET", "/reports/{rid:int}", "search"),
          PaidRoute("GET", "/files/{name:path}", "search"), PaidRoute("GET", "/me", "search")]


class Served:
    """uvicorn serving ``app`` on an ephemeral port in a thread (``root_path`` as
    ``uvicorn --root-path`` sets it)."""

    def __init__(self, app: Any, root_path: str = "") -> None:
        self.server = uvicorn.Server(uvicorn.Config(
            app, host="127.0.0.1", port=0, log_level="critical", lifespan="off",
            access_log=False, root_path=root_path))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive()
            time.sleep(0.01)
        return f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class Runs:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.background_may_end = threading.Event()
        self.background_ended = threading.Event()


def billed_app(verifier: Verifier, runs: Runs) -> FastAPI:
    app = FastAPI()
    app.add_middleware(PaymentMiddleware, verifier=verifier, routes=ROUTES)
    _routed_endpoints(app, runs)

    @app.post("/search")
    async def search() -> dict[str, Any]:
        runs.counts["search"] += 1
        return {"ran": True}

    @app.get("/events")
    async def events() -> StreamingResponse:
        runs.counts["events"] += 1

        async def five() -> AsyncIterator[str]:
            for n in range(5):
                yield f"data: {n}\n\n"
                await asyncio.sleep(0.3)

        return StreamingResponse(five(), media_type="text/event-stream")

    @app.post("/order")
    async def order(background: BackgroundTasks, fail: bool = False) -> dict[str, Any]:
        runs.counts["order"] += 1

        def afterwards() -> None:
            runs.background_may_end.wait(20)
            runs.background_ended.set()
            if fail:
                raise RuntimeError("the confirmation e-mail could not be sent")

        background.add_task(afterwards)
        return {"ordered": runs.counts["order"]}

    return app


def _routed_endpoints(app: FastAPI, runs: Runs) -> None:
    """Endpoints behind convertors, and one with the application's own authorization."""

    @app.get("/reports/{rid:int}")
    async def report(rid: int) -> dict[str, Any]:
        runs.counts["report"] += 1
        return {"report": rid}

    @app.get("/files/{name:path}")
    async def file(name: str) -> dict[str, Any]:
        runs.counts["file"] += 1
        return {"file": name}

    @app.get("/me")
    async def me(request: Request) -> dict[str, Any]:  # the application's own authorization
        user = request.headers.get("authorization", "").removeprefix("Bearer ")
        if user not in ("alice", "mallory"):
            raise HTTPException(status_code=401, detail="who are you?")
        runs.counts[user] += 1
        return {"user": user, "statement": f"{user}'s account"}


@pytest.fixture
def runs() -> Iterator[Runs]:
    made = Runs()
    yield made
    made.background_may_end.set()


def mounted(verifier: Verifier, runs: Runs) -> Starlette:
    return Starlette(routes=[Mount("/v1", app=billed_app(verifier, runs))])


def fastapi_mounted(verifier: Verifier, runs: Runs) -> FastAPI:
    outer = FastAPI()
    outer.mount("/v1", billed_app(verifier, runs))
    return outer


@pytest.mark.parametrize(("how", "build", "root_path", "path"), [
    ("Mount('/v1', app)", mounted, "", "/v1/search"),
    ("FastAPI().mount('/v1', app)", fastapi_mounted, "", "/v1/search"),
    ("uvicorn --root-path /api", billed_app, "/api", "/search"),
])
def test_a_paid_route_of_an_app_mounted_or_served_under_a_prefix_is_billed(
        verifier: Verifier, engine: Engine, new_token: Mint, runs: Runs, how: str,
        build: Callable[[Verifier, Runs], Any], root_path: str, path: str) -> None:
    token = new_token()
    with Served(build(verifier, runs), root_path) as url, httpx.Client(base_url=url) as http:
        anonymous = http.post(path)
        assert anonymous.status_code == 401, (how, anonymous.text)
        assert anonymous.json()["code"] == "INVALID_CREDIT_TOKEN"
        assert runs.counts["search"] == 0
        billed = http.post(path, headers={TOKEN_HEADER: token.token})
        assert billed.status_code == 200 and billed.json() == {"ran": True}
        assert verifier.verify_receipt(billed.headers[RECEIPT_HEADER]).amount == PRICE
    assert view(engine, token).spent == PRICE
    assert_ledger_sound(engine)


def test_a_stream_its_client_left_before_the_end_is_not_billed_nor_replayed_cut_short(
        verifier: Verifier, engine: Engine, new_token: Mint, runs: Runs) -> None:
    """A billed response is held back whole, so a client that gives up before the stream's
    end gets nothing; the endpoint stops at the disconnect (ASGI 2.3 and later)."""
    token = new_token()
    headers = {TOKEN_HEADER: token.token, IDEMPOTENCY_KEY_HEADER: "feed-1"}
    with Served(billed_app(verifier, runs)) as url:
        with httpx.Client(base_url=url, timeout=0.5) as impatient, \
                pytest.raises(httpx.ReadTimeout):
            impatient.get("/events", headers=headers)
        deadline = time.monotonic() + 10  # the endpoint sees the disconnect at its next event
        while view(engine, token).held and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (view(engine, token).spent, view(engine, token).held) == (0, 0)
        with httpx.Client(base_url=url, timeout=10) as http:
            same_key = http.get("/events", headers=headers)
            again = http.get("/events", headers={**headers, IDEMPOTENCY_KEY_HEADER: "feed-2"})
    assert same_key.status_code == 409 and same_key.json()["code"] == "CALL_FAILED"
    assert again.status_code == 200 and REPLAYED_HEADER not in again.headers
    assert again.text == "".join(f"data: {n}\n\n" for n in range(5))
    assert runs.counts["events"] == 2
    assert view(engine, token).spent == PRICE
    assert_ledger_sound(engine)


@pytest.mark.parametrize("fails", [False, True])
def test_background_tasks_run_after_the_billed_response_and_cannot_void_it(
        verifier: Verifier, engine: Engine, new_token: Mint, runs: Runs, fails: bool) -> None:
    token = new_token()
    headers = {TOKEN_HEADER: token.token, IDEMPOTENCY_KEY_HEADER: f"order-{fails}"}
    path = f"/order?fail={str(fails).lower()}"
    with Served(billed_app(verifier, runs)) as url, \
            httpx.Client(base_url=url, timeout=15) as http:
        ordered = http.post(path, headers=headers)  # its background task is still waiting
        assert not runs.background_ended.is_set()
        assert ordered.status_code == 200 and ordered.json() == {"ordered": 1}
        assert verifier.verify_receipt(ordered.headers[RECEIPT_HEADER]).amount == PRICE
        runs.background_may_end.set()
        assert runs.background_ended.wait(10)
    with Served(billed_app(verifier, runs)) as url, httpx.Client(base_url=url) as http:
        retried = http.post(path, headers=headers)  # a failed task closed the connection
    assert retried.status_code == 200 and retried.headers[REPLAYED_HEADER] == "true"
    assert retried.json() == {"ordered": 1}
    assert runs.counts["order"] == 1  # the order was placed once
    assert view(engine, token).spent == PRICE
    assert_ledger_sound(engine)


def test_a_route_whose_tool_lost_its_price_asks_an_anonymous_caller_for_a_token(
        engine: Engine, keys_dir: Path, new_token: Mint, runs: Runs, tmp_path: Path) -> None:
    """The operator unsets the tool's price while the app runs: a call with a token is refused
    PRICE_UNKNOWN, one without a token INVALID_CREDIT_TOKEN, both as JSON; nothing runs."""
    pricing = tmp_path / "pricing.toml"
    pricing.write_text(tomli_w.dumps(PRICING_DOC))
    verifier = Verifier(keys=KeySource(directory=keys_dir), engine=engine,
                        pricing=PricingSource(pricing, check_interval=0))
    token = new_token()
    try:
        with Served(billed_app(verifier, runs)) as url, httpx.Client(base_url=url) as http:
            assert http.post("/search", headers={TOKEN_HEADER: token.token}).status_code == 200
            unpriced = {key: value for key, value in PRICING_DOC.items()
                        if key != "default_price"}
            unpriced["tools"] = {name: terms for name, terms in PRICING_DOC["tools"].items()
                                 if name != "search"}
            pricing.write_text(tomli_w.dumps(unpriced))
            with_token = http.post("/search", headers={TOKEN_HEADER: token.token})
            anonymous = http.post("/search")
    finally:
        verifier.close()
    assert (with_token.status_code, with_token.json()["code"]) == (500, "PRICE_UNKNOWN")
    assert (anonymous.status_code, anonymous.json()["code"]) == (401, "INVALID_CREDIT_TOKEN")
    assert runs.counts["search"] == 1
    assert view(engine, token).spent == PRICE


@pytest.mark.parametrize("path", ["/reports/42", "/files/a/b.txt"])
def test_a_route_with_a_convertor_is_billed_as_the_framework_routes_it(
        verifier: Verifier, engine: Engine, new_token: Mint, runs: Runs, path: str) -> None:
    token = new_token()
    with Served(billed_app(verifier, runs)) as url, httpx.Client(base_url=url) as http:
        anonymous = http.get(path)
        billed = http.get(path, headers={TOKEN_HEADER: token.token})
    assert (anonymous.status_code, anonymous.json()["code"]) == (401, "INVALID_CREDIT_TOKEN")
    assert billed.status_code == 200 and RECEIPT_HEADER in billed.headers
    assert sum(runs.counts.values()) == 1
    assert view(engine, token).spent == PRICE


@pytest.mark.parametrize("path", ["/reports/{rid:integer}", "/reports/{rid", "/reports/}"])
def test_a_route_with_a_brace_the_middleware_cannot_match_is_refused_at_start(
        verifier: Verifier, path: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        PaymentMiddleware(billed_app(verifier, Runs()), verifier=verifier,
                          routes={f"GET {path}": "search"})
    assert refused.value.details["field"] == "routes" and path in refused.value.message


def test_a_replay_never_serves_a_response_made_for_other_credentials_of_the_app(
        verifier: Verifier, engine: Engine, new_token: Mint, runs: Runs) -> None:
    """One credit token shared by a gateway's users: the app tells them apart by its own
    Authorization. A replay does not run the endpoint, so it must not answer mallory (or no
    one) with alice's response, under her idempotency key or a derived one."""
    token = new_token()

    def as_user(user: str | None, key: str | None = None) -> dict[str, str]:
        headers = {TOKEN_HEADER: token.token}
        if user:
            headers["Authorization"] = f"Bearer {user}"
        if key:
            headers[IDEMPOTENCY_KEY_HEADER] = key
        return headers

    with Served(billed_app(verifier, runs)) as url, httpx.Client(base_url=url) as http:
        alice = http.get("/me", headers=as_user("alice", "statement-1"))
        keyed = [http.get("/me", headers=as_user(user, "statement-1"))
                 for user in ("mallory", None)]
        again = http.get("/me", headers=as_user("alice", "statement-1"))
        derived = http.get("/me", headers=as_user("alice"))
        derived_others = [http.get("/me", headers=as_user(user)) for user in ("mallory", None)]
    assert alice.json()["user"] == "alice"
    assert [(r.status_code, r.json()["code"]) for r in keyed] == [
        (409, "IDEMPOTENCY_CONFLICT")] * 2
    assert again.headers[REPLAYED_HEADER] == "true" and again.json()["user"] == "alice"
    assert derived.json()["user"] == "alice" and REPLAYED_HEADER not in derived.headers
    mallory, nobody = derived_others
    assert mallory.json()["user"] == "mallory" and REPLAYED_HEADER not in mallory.headers
    assert nobody.status_code == 401 and "alice" not in nobody.text
    assert (runs.counts["alice"], runs.counts["mallory"]) == (2, 1)
    assert view(engine, token).spent == 3 * PRICE

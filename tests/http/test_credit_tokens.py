"""Billing plain HTTP endpoints with credit tokens, over real HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine

from mcpbill_cli.http import IDEMPOTENCY_KEY_HEADER, RECEIPT_HEADER, REPLAYED_HEADER, TOKEN_HEADER
from mcpbill_cli.keys import KeySource
from mcpbill_cli.ledger.credit import IssuedToken
from mcpbill_cli.ledger.engine import make_engine
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.verifier import Verifier
from tests.verifier.billing_support import PRICE, PRICING_DOC

from .conftest import Endpoints, Switch, assert_ledger_sound, build_app, revoke, view

Mint = Callable[..., IssuedToken]


def paid(token: IssuedToken, **headers: str) -> dict[str, str]:
    return {TOKEN_HEADER: token.token, **headers}


def test_a_token_in_its_header_pays_and_gets_a_verifiable_receipt(
        client: httpx.Client, verifier: Verifier, engine: Engine, endpoints: Endpoints,
        new_token: Mint) -> None:
    token = new_token()
    response = client.get("/report", headers=paid(token))
    assert response.status_code == 200, response.text
    assert response.json()["report"] == "paid content"
    receipt = verifier.verify_receipt(response.headers[RECEIPT_HEADER])
    assert receipt.amount == PRICE and receipt.claims["tool"] == "search"
    assert receipt.claims["jti"] == token.claims.jti
    assert REPLAYED_HEADER not in response.headers
    assert endpoints.runs["report"] == 1
    state = view(engine, token)
    assert (state.spent, state.held, receipt.remaining) == (PRICE, 0, state.remaining)
    assert_ledger_sound(engine)


def test_authorization_bearer_is_not_taken_as_a_credit_token(
        client: httpx.Client, engine: Engine, endpoints: Endpoints, new_token: Mint) -> None:
    token = new_token()
    response = client.get("/report", headers={"Authorization": f"Bearer {token.token}"})
    assert response.status_code == 401
    assert response.json()["code"] == "INVALID_CREDIT_TOKEN"
    assert response.json()["reason"] == "missing"
    assert TOKEN_HEADER in response.json()["message"]
    assert endpoints.runs["report"] == 0 and view(engine, token).spent == 0


def test_the_applications_own_authorization_reaches_the_endpoint(
        client: httpx.Client, new_token: Mint) -> None:
    token = new_token()
    response = client.get("/report", headers=paid(token, Authorization="Bearer app-secret"))
    assert response.status_code == 200
    assert response.json()["authorization"] == "Bearer app-secret"


def test_an_error_status_voids_and_is_passed_on(
        client: httpx.Client, engine: Engine, endpoints: Endpoints, new_token: Mint) -> None:
    token = new_token()
    response = client.get("/broken", headers=paid(token))
    assert response.status_code == 500 and response.json() == {"error": "upstream down"}
    assert RECEIPT_HEADER not in response.headers
    state = view(engine, token)
    assert (endpoints.runs["broken"], state.spent, state.held) == (1, 0, 0)
    assert_ledger_sound(engine)


def test_an_exception_voids(client: httpx.Client, engine: Engine, endpoints: Endpoints,
                            new_token: Mint) -> None:
    token = new_token()
    response = client.get("/crash", headers=paid(token))
    assert response.status_code == 500 and RECEIPT_HEADER not in response.headers
    state = view(engine, token)
    assert (endpoints.runs["crash"], state.spent, state.held) == (1, 0, 0)
    assert_ledger_sound(engine)


def test_a_replay_with_the_same_idempotency_key_does_not_run_again(
        client: httpx.Client, engine: Engine, endpoints: Endpoints, new_token: Mint) -> None:
    token = new_token()
    headers = paid(token, **{IDEMPOTENCY_KEY_HEADER: "order-1"})
    first = client.post("/search", json={"q": "usdc"}, headers=headers)
    again = client.post("/search", json={"q": "usdc"}, headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json() == {"query": "usdc", "run": 1}
    assert again.headers[RECEIPT_HEADER] == first.headers[RECEIPT_HEADER]
    assert again.headers[REPLAYED_HEADER] == "true"
    assert endpoints.runs["search"] == 1 and view(engine, token).spent == PRICE
    conflict = client.post("/search", json={"q": "other"}, headers=headers)
    assert conflict.status_code == 409
    assert conflict.json()["code"] == "IDEMPOTENCY_CONFLICT"
    assert endpoints.runs["search"] == 1 and view(engine, token).spent == PRICE


def test_the_same_request_within_the_dedupe_window_is_one_call(
        client: httpx.Client, engine: Engine, endpoints: Endpoints, new_token: Mint) -> None:
    token = new_token()
    first = client.post("/search", json={"q": "usdc"}, headers=paid(token))
    again = client.post("/search", json={"q": "usdc"}, headers=paid(token))
    other = client.post("/search", json={"q": "eth"}, headers=paid(token))
    assert again.json() == first.json() and again.headers[REPLAYED_HEADER] == "true"
    assert other.json() == {"query": "eth", "run": 2} and REPLAYED_HEADER not in other.headers
    assert endpoints.runs["search"] == 2 and view(engine, token).spent == 2 * PRICE


def test_another_tenants_idempotency_key_is_another_call(
        client: httpx.Client, engine: Engine, endpoints: Endpoints, new_token: Mint) -> None:
    acme, beta = new_token(tenant="acme"), new_token(tenant="beta")
    key = {IDEMPOTENCY_KEY_HEADER: "shared-key"}
    first = client.post("/search", json={"q": "usdc"}, headers=paid(acme, **key))
    second = client.post("/search", json={"q": "usdc"}, headers=paid(beta, **key))
    assert first.status_code == second.status_code == 200
    assert REPLAYED_HEADER not in second.headers
    assert first.headers[RECEIPT_HEADER] != second.headers[RECEIPT_HEADER]
    assert endpoints.runs["search"] == 2
    assert view(engine, acme).spent == view(engine, beta).spent == PRICE


def test_a_replay_under_a_revoked_token_is_refused(
        client: httpx.Client, engine: Engine, endpoints: Endpoints, new_token: Mint) -> None:
    token = new_token()
    headers = paid(token, **{IDEMPOTENCY_KEY_HEADER: "k-1"})
    assert client.get("/report", headers=headers).status_code == 200
    revoke(engine, token)
    for response in (client.get("/report", headers=headers),
                     client.get("/report", headers=paid(token))):
        assert response.status_code == 403
        assert response.json()["code"] == "TOKEN_REVOKED"
    assert endpoints.runs["report"] == 1
    assert_ledger_sound(engine)


def test_scope_budget_and_bad_tokens_are_refused_with_their_status(
        client: httpx.Client, engine: Engine, endpoints: Endpoints, new_token: Mint) -> None:
    narrow = new_token(scope=["translate"])
    poor = new_token(limit=PRICE - 1)
    refused = {
        "SCOPE_DENIED": (403, client.get("/report", headers=paid(narrow))),
        "BUDGET_EXCEEDED": (402, client.get("/report", headers=paid(poor))),
        "INVALID_CREDIT_TOKEN": (401, client.get("/report",
                                                 headers={TOKEN_HEADER: "not.a.jwt"})),
    }
    for code, (status, response) in refused.items():
        assert (response.status_code, response.json()["code"]) == (status, code)
        assert response.headers["content-type"] == "application/json"
    budget = refused["BUDGET_EXCEEDED"][1].json()
    assert budget["shortfallUsd"] == "0.000001" and "fallback" in budget
    assert endpoints.runs["report"] == 0
    assert view(engine, narrow).spent == view(engine, poor).spent == 0


def test_a_free_tool_needs_no_token_but_checks_one_sent(
        client: httpx.Client, endpoints: Endpoints, new_token: Mint) -> None:
    anonymous = client.get("/status")
    assert anonymous.status_code == 200 and RECEIPT_HEADER not in anonymous.headers
    with_token = client.get("/status", headers=paid(new_token()))
    assert with_token.status_code == 200 and RECEIPT_HEADER not in with_token.headers
    forged = client.get("/status", headers={TOKEN_HEADER: "not.a.jwt"})
    assert forged.status_code == 401
    assert endpoints.runs["status"] == 2


def test_routes_that_are_not_billed_pass_through(client: httpx.Client,
                                                  endpoints: Endpoints) -> None:
    assert client.get("/free").json() == {"free": True}
    assert client.get("/private").status_code == 401  # the app's own auth, untouched
    assert client.get("/private", headers={"Authorization": "Bearer app-secret"}).json() == {
        "private": True}
    assert client.get("/missing").status_code == 404
    assert endpoints.runs["free"] == 1


def test_a_path_pattern_route_is_billed(client: httpx.Client, verifier: Verifier,
                                        new_token: Mint) -> None:
    response = client.get("/reports/42", headers=paid(new_token()))
    assert response.json() == {"id": "42"}
    assert verifier.verify_receipt(response.headers[RECEIPT_HEADER]).claims["tool"] == "translate"
    assert client.get("/reports/42/pdf", headers=paid(new_token())).status_code == 404


def test_a_per_unit_route_is_captured_for_the_units_it_reports(
        client: httpx.Client, verifier: Verifier, engine: Engine, new_token: Mint) -> None:
    token = new_token()
    response = client.post("/summarize", json={"text": "one two three four five"},
                           headers=paid(token))
    assert response.json() == {"words": 5}
    receipt = verifier.verify_receipt(response.headers[RECEIPT_HEADER])
    assert receipt.amount == 5 * 10  # 0.00001 USDC a word
    state = view(engine, token)
    assert (state.spent, state.held) == (50, 0)


def test_a_response_over_the_buffer_is_voided_and_withheld(
        client: httpx.Client, engine: Engine, endpoints: Endpoints, new_token: Mint) -> None:
    token = new_token()
    response = client.get("/big", headers=paid(token))
    assert response.status_code == 500
    assert response.json()["code"] == "RESPONSE_TOO_LARGE"
    state = view(engine, token)
    assert (endpoints.runs["big"], state.spent, state.held) == (1, 0, 0)


def test_a_request_over_the_limit_is_refused_before_anything_is_held(
        client: httpx.Client, engine: Engine, endpoints: Endpoints, new_token: Mint) -> None:
    token = new_token()
    response = client.post("/search", content=json.dumps({"q": "x" * 20_000}),
                           headers=paid(token, **{"content-type": "application/json"}))
    assert response.status_code == 413
    assert response.json()["code"] == "REQUEST_TOO_LARGE"
    assert endpoints.runs["search"] == 0 and view(engine, token).held == 0


def test_a_retry_while_the_call_runs_is_call_in_progress(
        client: httpx.Client, engine: Engine, endpoints: Endpoints, new_token: Mint) -> None:
    token = new_token()
    headers = paid(token, **{IDEMPOTENCY_KEY_HEADER: "slow-1"})
    first: list[httpx.Response] = []
    running = threading.Thread(target=lambda: first.append(client.get("/slow",
                                                                      headers=headers)))
    running.start()
    assert endpoints.entered.wait(10)
    retry = client.get("/slow", headers=headers)
    endpoints.gate.set()
    running.join(10)
    assert retry.status_code == 409 and retry.json()["code"] == "CALL_IN_PROGRESS"
    assert retry.headers["retry-after"] == "1"
    assert first[0].status_code == 200 and endpoints.runs["slow"] == 1
    assert view(engine, token).spent == PRICE


def test_an_empty_idempotency_key_is_no_key(client: httpx.Client, engine: Engine,
                                            new_token: Mint) -> None:
    token = new_token()
    response = client.get("/report", headers=paid(token, **{IDEMPOTENCY_KEY_HEADER: ""}))
    assert response.status_code == 200 and view(engine, token).spent == PRICE


def test_readme_http_status_table_matches_the_middleware() -> None:
    import re
    from pathlib import Path

    from mcpbill_cli.http import STATUS

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    documented: dict[str, int] = {}
    for line in readme.splitlines():
        row = re.match(r"\| (\d{3}) [A-Z][A-Za-z ]+ \| ([^|]*) \|", line)
        if row:
            for code in re.findall(r"`([A-Z][A-Z0-9_]+)`", row.group(2)):
                documented[code] = int(row.group(1))
    assert documented == STATUS


@pytest.mark.parametrize("down", ["postgresql+psycopg://postgres@127.0.0.1:1/nowhere",
                                  "sqlite:///{tmp}"])
def test_a_ledger_that_cannot_be_reached_is_503_with_retry_after(
        served: tuple[Switch, str], keys_dir: Path, new_token: Mint, tmp_path: Path,
        down: str) -> None:
    token = new_token()
    broken = Verifier(keys=KeySource(directory=keys_dir),
                      pricing=PricingTable.from_document(PRICING_DOC),
                      engine=make_engine(down.format(tmp=tmp_path)))
    endpoints = Endpoints()
    switch, url = served
    switch.app = build_app(broken, endpoints)  # the app starts: prices come from the file
    try:
        response = httpx.get(f"{url}/report", headers=paid(token))
        anonymous_free = httpx.get(f"{url}/status")
    finally:
        switch.app = None
        broken.close()
    assert response.status_code == 503 and response.json()["code"] == "LEDGER_UNAVAILABLE"
    assert response.headers["retry-after"] == "1"
    # Which ledger, where, and the driver's reason are the operator's, not the caller's.
    assert set(response.json()) == {"code", "message"}
    for told in ("nowhere", "127.0.0.1", str(tmp_path), "sqlite", "psycopg"):
        assert told not in response.text, told
    assert endpoints.runs["report"] == 0
    assert anonymous_free.status_code == 200  # a free tool without a token needs no ledger


def test_a_head_request_is_billed_like_the_get_it_runs(
        client: httpx.Client, engine: Engine, endpoints: Endpoints, new_token: Mint) -> None:
    assert client.head("/report").status_code == 401  # not a free way to run the endpoint
    token = new_token()
    response = client.head("/report", headers=paid(token))
    assert response.status_code == 200 and RECEIPT_HEADER in response.headers
    assert endpoints.runs["report"] == 1 and view(engine, token).spent == PRICE

"""Errors are data: every refusal has a stable code and a JSON ``to_dict()``; BUDGET_EXCEEDED
tells the agent how to carry on."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine
from sqlalchemy.engine import make_url

import mcpbill_cli.ledger.ops
import mcpbill_cli.receipts  # noqa: F401 - registers InvalidReceipt under BillingError
import mcpbill_cli.wallet.errors  # noqa: F401 - registers RpcUnavailable
from mcpbill_cli import errors
from mcpbill_cli.errors import BillingError, LedgerUnavailable
from mcpbill_cli.keys import KeyRing, KeySource
from mcpbill_cli.ledger.credit import IssuedToken, revoke
from mcpbill_cli.ledger.engine import make_engine, writing
from mcpbill_cli.ledger.schema import upgrade
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.receipts import Receipt
from mcpbill_cli.verifier import Verifier
from mcpbill_cli.x402.errors import X402PaymentInvalid  # also registers the x402 codes

from .billing_support import PRICE, PRICING_DOC, USDC, FakeClock, fund, mint

DESIGN_CODES = {"INVALID_CREDIT_TOKEN", "TOKEN_REVOKED", "SCOPE_DENIED", "BUDGET_EXCEEDED",
                "IDEMPOTENCY_CONFLICT", "CALL_IN_PROGRESS", "PRICE_UNKNOWN",
                "LEDGER_UNAVAILABLE"}
MORE_CREDIT = ("ask the operator for a new credit token for tenant acme "
               "(mcpbill token issue --limit AMOUNT)")


def refused(call: Callable[[], Any]) -> dict[str, Any]:
    with pytest.raises(BillingError) as caught:
        call()
    as_dict = caught.value.to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert as_dict["code"] == caught.value.code and as_dict["message"] == caught.value.message
    return as_dict


def without_message(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "message"}


def test_budget_exceeded_carries_price_remaining_shortfall_and_fallback(
        verifier: Verifier, new_token: Callable[..., IssuedToken]) -> None:
    token = new_token(limit=3 * PRICE)
    expected = {
        "code": "BUDGET_EXCEEDED", "reason": "token_limit", "tool": "translate",
        "jti": token.claims.jti, "priceUsd": "0.05", "remainingUsd": "0.03",
        "shortfallUsd": "0.02",
        "fallback": {"tools": [{"tool": "search", "priceUsd": "0.01"}],
                     "freeTools": ["status", "read.*"], "moreCredit": MORE_CREDIT},
    }
    for step in (verifier.preflight, verifier.hold, verifier.charge):
        doc = refused(lambda s=step: s(token.token, "translate"))
        assert without_message(doc) == expected, step.__name__
        assert "0.05" in doc["message"] and "0.03" in doc["message"]
    # The agent adapts with what the hint offers, and is never stuck.
    verifier.charge(token.token, "search")
    verifier.charge(token.token, "status")
    assert verifier.charge(token.token, "read.file").amount == 0


@pytest.mark.parametrize(("scope", "tool", "tools", "free"), [
    (["translate", "status"], "translate", [], ["status"]),
    (["read.*", "search", "summarize"], "summarize",
     [{"tool": "search", "priceUsd": "0.01"}], ["read.*"]),
    (["read.docs.*", "translate"], "translate", [], ["read.docs.*"]),
])
def test_budget_exceeded_fallback_stays_inside_the_scope(
        verifier: Verifier, new_token: Callable[..., IssuedToken], scope: list[str], tool: str,
        tools: list[dict[str, str]], free: list[str]) -> None:
    token = new_token(limit=3 * PRICE, scope=scope)
    doc = refused(lambda: verifier.charge(token.token, tool, units=100_000))
    assert doc["code"] == "BUDGET_EXCEEDED"
    assert doc["fallback"] == {"tools": tools, "freeTools": free, "moreCredit": MORE_CREDIT}


def test_budget_exceeded_counts_what_is_spent_and_held(
        verifier: Verifier, new_token: Callable[..., IssuedToken]) -> None:
    token = new_token(limit=6 * PRICE)
    verifier.charge(token.token, "search")
    hold = verifier.hold(token.token, "search", args={"q": 2})
    doc = refused(lambda: verifier.hold(token.token, "translate"))
    assert (doc["priceUsd"], doc["remainingUsd"], doc["shortfallUsd"]) == ("0.05", "0.04",
                                                                            "0.01")
    assert doc["fallback"]["tools"] == [{"tool": "search", "priceUsd": "0.01"}]
    verifier.void(hold)
    assert verifier.capture(verifier.hold(token.token, "translate")).remaining == 0


def _all_error_classes() -> list[type[BillingError]]:
    found: list[type[BillingError]] = []
    pending: list[type[BillingError]] = [BillingError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


def test_to_dict_works_for_every_code() -> None:
    classes = _all_error_classes()
    codes = set()
    for cls in classes:
        extra: dict[str, Any] = (
            {"reason": "malformed"}
            if issubclass(cls, errors.InvalidCreditToken | X402PaymentInvalid)
            else {"receipt": Receipt("a.b.c", {"receiptId": "rcpt_1"})}
            if issubclass(cls, errors.DuplicateCall) else {})
        error = cls("what happened and what to do next", detail="x", **extra)
        doc = error.to_dict()
        assert json.loads(json.dumps(doc)) == doc
        assert doc["code"] == cls.code and doc["message"] == error.message, cls
        assert doc["detail"] == "x"
        told = error.for_agent()  # the wire form: the same, but of the operator's own failures
        if cls.told is None:
            assert told == doc, cls
        else:
            assert told == {"code": cls.code, "message": cls.told}, cls  # "detail" not shown
        codes.add(cls.code)
    assert DESIGN_CODES <= codes
    own = [cls.code for cls in classes if "code" in vars(cls)]
    assert len(own) == len(set(own)), f"two error classes share a code: {sorted(own)}"
    assert {mcpbill_cli.ledger.ops.AccountClosed, mcpbill_cli.receipts.InvalidReceipt} <= set(
        classes)
    assert {cls.code for cls in classes if cls.told is not None} == {
        "LEDGER_UNAVAILABLE", "LEDGER_FULL", "RPC_UNAVAILABLE", "X402_FACILITATOR_UNAVAILABLE",
        "UPSTREAM_UNAVAILABLE"}


def test_every_refusal_on_the_call_path_is_data(
        funded: Engine, verifier: Verifier, keys: KeySource, offline: Verifier,
        new_token: Callable[..., IssuedToken], clock: FakeClock) -> None:
    token = new_token(limit=PRICE, scope=["search", "status"])
    hold = verifier.hold(token.token, "search", idempotency_key="k")
    verifier.void(hold)
    verifier.charge(token.token, "search")  # the budget is gone now
    running = new_token(limit=PRICE)
    verifier.hold(running.token, "search", idempotency_key="running")
    strict = PricingTable.from_document({k: v for k, v in PRICING_DOC.items()
                                         if k != "default_price"})
    no_default = Verifier(keys=keys, pricing=strict, engine=funded, clock=clock)
    cases = {
        "INVALID_CREDIT_TOKEN": lambda: verifier.preflight("x.y.z", "search"),
        "SCOPE_DENIED": lambda: verifier.charge(token.token, "translate"),
        "BUDGET_EXCEEDED": lambda: verifier.charge(token.token, "search", args={"q": 2}),
        "CALL_IN_PROGRESS": lambda: verifier.charge(running.token, "search",
                                                    idempotency_key="running"),
        "DUPLICATE_CALL": lambda: verifier.call(token.token, "search").__enter__(),
        "IDEMPOTENCY_CONFLICT": lambda: verifier.charge(token.token, "status",
                                                        idempotency_key="k"),
        "CALL_FAILED": lambda: verifier.charge(token.token, "search", idempotency_key="k"),
        "HOLD_NOT_ACTIVE": lambda: verifier.capture(hold),
        "PRICE_UNKNOWN": lambda: no_default.preflight(new_token(scope=["*"]).token, "unlisted"),
        "STATELESS_VERIFIER": lambda: offline.hold(token.token, "search"),
        "INVALID_RECEIPT": lambda: offline.verify_receipt("x.y.z"),
    }
    for code, call in cases.items():
        assert refused(call)["code"] == code
    scope = refused(cases["SCOPE_DENIED"])
    assert (scope["tool"], scope["scope"]) == ("translate", ["search", "status"])
    with writing(funded) as conn:
        revoke(conn, [token.claims.jti], reason=None, clock=clock)
    assert without_message(refused(lambda: verifier.charge(token.token, "search"))) == {
        "code": "TOKEN_REVOKED", "jti": token.claims.jti}


def test_ledger_unavailable(tmp_path: Path, keys: KeySource, pricing: PricingTable,
                            new_token: Callable[..., IssuedToken], clock: FakeClock) -> None:
    token = new_token(limit=USDC)
    down = ["postgresql+psycopg://postgres@127.0.0.1:1/nowhere", f"sqlite:///{tmp_path}"]
    for url in down:
        doc = refused(lambda u=url: Verifier(keys=keys, pricing=pricing, db_url=u, clock=clock))
        assert doc["code"] == "LEDGER_UNAVAILABLE", url
        broken = Verifier(keys=keys, pricing=pricing, engine=make_engine(url), clock=clock)
        for step in (broken.preflight, broken.hold, broken.charge):
            with pytest.raises(LedgerUnavailable) as caught:
                step(token.token, "search")
            assert caught.value.to_dict()["url"] in caught.value.message  # the operator's
            told = json.dumps(caught.value.for_agent())  # the agent's: nothing of the ledger
            for where in ("nowhere", "127.0.0.1", str(tmp_path), "sqlite", "psycopg"):
                assert where not in told, (url, step.__name__, where)
        broken.close()
    assert issubclass(LedgerUnavailable, BillingError)


def drop_connections(pg_database: str, application: str) -> None:
    """The server closes every connection of ``application`` (a restart, an idle timeout)."""
    with psycopg.connect(make_url(pg_database).set(drivername="postgresql")
                         .render_as_string(hide_password=False), autocommit=True) as admin:
        dropped = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = %s", (application,)).fetchone()
    assert dropped is not None and dropped[0] >= 1


@pytest.mark.parametrize("step", ["charge", "capture"])
def test_a_connection_the_server_dropped_is_replaced_within_the_call(
        pg_database: str, keys: KeySource, ring: KeyRing, pricing: PricingTable,
        clock: FakeClock, step: str) -> None:
    """A verifier keeps no round trip per call to test its pooled connections (and a cursor
    with each): the transaction that meets a connection the server dropped runs again on a
    new one, within the call. A capture after the tool ran is not lost to it (it was
    LEDGER_UNAVAILABLE, and the hold then lapsed: the tool's work unbilled and unanswered)."""
    url = make_url(pg_database).update_query_dict({"application_name": f"dropped-{step}"})
    engine = make_engine(url.render_as_string(hide_password=False), pre_ping=False)
    upgrade(engine)
    fund(engine, "acme", USDC, now=clock())
    token = mint(engine, ring, now=clock()).token
    verifier = Verifier(keys=keys, pricing=pricing, engine=engine, clock=clock)
    verifier.charge(token, "search", idempotency_key=f"before-{step}")  # (one database for
    held = verifier.hold(token, "search", idempotency_key=f"running-{step}")  # both steps)
    drop_connections(pg_database, f"dropped-{step}")
    if step == "charge":
        receipt = verifier.charge(token, "search", idempotency_key=f"after-{step}")
        verifier.void(held)
    else:  # the tool ran meanwhile
        receipt = verifier.capture(held)
    assert verifier.verify_receipt(receipt.jws).amount == PRICE
    assert verifier.preflight(token, "search").remaining == USDC - 2 * PRICE
    verifier.close()

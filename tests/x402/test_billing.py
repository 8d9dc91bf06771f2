"""The agent's side of a payment on the ledger (SQLite and PostgreSQL): holds, keys, refusals.

No chain here: a 402 is built by hand and the payment is prepared (held and signed) but never
sent, which is all the ledger sees of a payment before its settlement.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account
from sqlalchemy import Engine

from mcpbill_cli.clock import utcnow
from mcpbill_cli.errors import (
    BudgetExceeded,
    CallFailed,
    CallInProgress,
    IdempotencyConflict,
    ScopeDenied,
    TokenRevoked,
)
from mcpbill_cli.keys import KeySource
from mcpbill_cli.ledger.credit import IssuedToken, revoke
from mcpbill_cli.ledger.engine import writing
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.verifier import Verifier
from mcpbill_cli.x402 import (
    IDEMPOTENCY_KEY,
    AgentBudget,
    AllowedAsset,
    PaymentPolicy,
    X402AlreadyPaid,
    X402Payer,
)
from mcpbill_cli.x402.client import EXPIRY_MARGIN
from tests.verifier.billing_support import PRICING_DOC

from .conftest import USDC

ASSET = "0x" + "aa" * 20
POLICY = PaymentPolicy((AllowedAsset("eip155:8453", ASSET, "USD Coin", "2"),), 50_000)
REQUEST = {"method": "GET", "url": "https://api.example.com/r", "body": ""}
NewToken = Callable[..., IssuedToken]


def challenge(amount: int = 10_000, timeout: int = 600) -> tuple[httpx.Headers, bytes]:
    document = {"x402Version": 2, "resource": {"url": "https://api.example.com/r"},
                "accepts": [{"scheme": "exact", "network": "eip155:8453", "amount": str(amount),
                             "asset": ASSET, "payTo": "0x" + "bb" * 20,
                             "maxTimeoutSeconds": timeout,
                             "extra": {"name": "USD Coin", "version": "2"}}]}
    encoded = base64.b64encode(json.dumps(document).encode()).decode()
    return httpx.Headers({"PAYMENT-REQUIRED": encoded}), b"{}"


def authorization_of(request: httpx.Request) -> dict[str, Any]:
    document = json.loads(base64.b64decode(request.headers["PAYMENT-SIGNATURE"]))
    authorization: dict[str, Any] = document["payload"]["authorization"]
    return authorization


def test_the_authorization_expires_before_the_hold_does(engine: Engine, keys_dir: Path,
                                                         new_token: NewToken) -> None:
    verifier = Verifier(keys=KeySource(directory=keys_dir),
                        pricing=PricingTable.from_document(PRICING_DOC), engine=engine,
                        hold_timeout=120)
    payer = X402Payer(AgentBudget(verifier, new_token().token, tool="search"),
                      Account.create(), POLICY)

    pending = payer.prepare(httpx.Request("GET", "https://api.example.com/r"), *challenge())

    valid_before = int(authorization_of(pending.request)["validBefore"])
    assert pending.hold.timeout_at is not None
    assert valid_before <= pending.hold.timeout_at.timestamp() - EXPIRY_MARGIN
    assert valid_before <= utcnow().timestamp() + 120


def test_a_key_is_never_signed_for_twice(verifier: Verifier, new_token: NewToken) -> None:
    issued = new_token()
    signer = Account.create()
    payer = X402Payer(AgentBudget(verifier, issued.token, tool="search"), signer, POLICY)
    request = httpx.Request("GET", "https://api.example.com/r",
                            extensions={IDEMPOTENCY_KEY: "pay-1"})
    first = payer.prepare(request, *challenge())

    with pytest.raises(CallInProgress, match="still running"):
        payer.prepare(request, *challenge())

    payer.budget.void(first.hold)
    with pytest.raises(CallFailed, match="stays failed"):
        payer.prepare(request, *challenge())


def test_a_paid_key_is_already_paid(verifier: Verifier, new_token: NewToken) -> None:
    budget = AgentBudget(verifier, new_token().token, tool="search")
    hold = budget.hold(10_000, key="pay-2", request=REQUEST)
    budget.capture(hold, {"transaction": "0x" + "cd" * 32, "network": "eip155:8453"})

    with pytest.raises(X402AlreadyPaid) as refused:
        budget.hold(10_000, key="pay-2", request=REQUEST)

    assert refused.value.details["transaction"] == "0x" + "cd" * 32
    assert budget.remaining() == USDC - 10_000


def test_a_key_reused_for_another_request_is_a_conflict(verifier: Verifier,
                                                        new_token: NewToken) -> None:
    budget = AgentBudget(verifier, new_token().token, tool="search")
    budget.hold(10_000, key="pay-3", request=REQUEST)

    with pytest.raises(IdempotencyConflict, match="another request"):
        budget.hold(10_000, key="pay-3", request={**REQUEST, "url": "https://elsewhere/"})


def test_derived_keys_name_the_request(verifier: Verifier, new_token: NewToken) -> None:
    budget = AgentBudget(verifier, new_token().token, tool="search")
    same = budget.request_key(REQUEST, "mcp-1")
    assert same == budget.request_key(REQUEST, "mcp-1")
    assert same != budget.request_key(REQUEST, "mcp-2")
    assert same != budget.request_key({**REQUEST, "url": "https://elsewhere/"}, "mcp-1")
    assert budget.request_key(REQUEST, None) != budget.request_key(REQUEST, None)


def test_the_tenants_daily_cap_bounds_payments_too(engine: Engine, keys_dir: Path,
                                                   new_token: NewToken) -> None:
    capped = {**PRICING_DOC, "tenants": {"acme": {"daily_cap": "0.005"}}}
    verifier = Verifier(keys=KeySource(directory=keys_dir),
                        pricing=PricingTable.from_document(capped), engine=engine)
    budget = AgentBudget(verifier, new_token().token, tool="search")

    with pytest.raises(BudgetExceeded) as refused:
        budget.hold(10_000, key="pay-4", request=REQUEST)

    assert refused.value.details["reason"] == "daily_cap"
    assert budget.remaining() == USDC


def test_a_revoked_token_pays_nothing(verifier: Verifier, new_token: NewToken) -> None:
    issued = new_token()
    assert verifier.engine is not None
    with writing(verifier.engine) as conn:
        revoke(conn, [issued.claims.jti], reason="test", clock=utcnow)

    with pytest.raises(TokenRevoked):
        AgentBudget(verifier, issued.token, tool="search").hold(10_000, key="pay-5",
                                                                 request=REQUEST)


def test_the_token_must_cover_the_tool(verifier: Verifier, new_token: NewToken) -> None:
    budget = AgentBudget(verifier, new_token(scope=["read.*"]).token, tool="search")
    with pytest.raises(ScopeDenied):
        budget.hold(10_000, key="pay-6", request=REQUEST)

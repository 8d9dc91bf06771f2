"""A verifier built from a JWKS and a revocation list: preflight only, and it says so."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mcpbill_cli.errors import BillingError
from mcpbill_cli.keys import KeyRing
from mcpbill_cli.ledger.credit import IssuedToken
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.verifier import Verifier

from .billing_support import PRICE, USDC, FakeClock


def refused(call: Callable[[], Any]) -> dict[str, Any]:
    with pytest.raises(BillingError) as caught:
        call()
    return caught.value.to_dict()


@pytest.fixture(params=["documents", "files"])
def stateless(request: pytest.FixtureRequest, ring: KeyRing, pricing: PricingTable,
              clock: FakeClock, tmp_path: Path) -> Verifier:
    revoked = {"revoked": [{"jti": "tok_revoked", "exp": 4102444800}]}
    if request.param == "documents":
        return Verifier.stateless(jwks=ring.jwks(), pricing=pricing, revocations=revoked,
                                  clock=clock)
    (tmp_path / "jwks.json").write_text(json.dumps(ring.jwks()))
    (tmp_path / "revoked.json").write_text(json.dumps(revoked))
    return Verifier.stateless(jwks=str(tmp_path / "jwks.json"), pricing=pricing,
                              revocations=tmp_path / "revoked.json", clock=clock)


def test_jwks_holds_public_keys_only(ring: KeyRing) -> None:
    for jwk in ring.jwks()["keys"]:
        assert "d" not in jwk and jwk["alg"] == "EdDSA" and jwk["kid"] == ring.active().kid


def test_preflight_checks_token_scope_and_price_without_a_ledger(
        stateless: Verifier, new_token: Callable[..., IssuedToken]) -> None:
    token = new_token(limit=PRICE, scope=["search", "summarize"])
    quote = stateless.preflight(token.token, "search")
    assert (quote.tool, quote.jti, quote.tenant, quote.agent, quote.amount, quote.remaining) == (
        "search", token.claims.jti, "acme", "agent-1", PRICE, None)
    assert quote.to_dict()["remainingUsd"] is None
    assert stateless.preflight(token.token, "summarize", units=300).amount == 3_000
    # No ledger, so no balance: a price above the limit is the ledger's business, not its own.
    assert stateless.preflight(token.token, "summarize").amount == 500_000
    assert refused(lambda: stateless.preflight(token.token, "translate"))["code"] == (
        "SCOPE_DENIED")
    assert refused(lambda: stateless.preflight("x.y.z", "search"))["reason"] == "malformed"


def test_money_moving_calls_say_the_verifier_is_stateless(
        stateless: Verifier, verifier: Verifier,
        new_token: Callable[..., IssuedToken]) -> None:
    token = new_token(limit=USDC)
    foreign_hold = verifier.hold(token.token, "search")
    attempts: dict[str, Callable[[], Any]] = {
        "hold": lambda: stateless.hold(token.token, "search"),
        "charge": lambda: stateless.charge(token.token, "search"),
        "call": lambda: stateless.call(token.token, "search").__enter__(),
        "capture": lambda: stateless.capture(foreign_hold),
        "void": lambda: stateless.void(foreign_hold),
        "receipt_for": lambda: stateless.receipt_for("k"),
        "sweep_expired": stateless.sweep_expired,
    }
    for name, attempt in attempts.items():
        doc = refused(attempt)
        assert doc["code"] == "STATELESS_VERIFIER", name
        assert "preflight" in doc["message"], name
    verifier.void(foreign_hold)


def test_stateless_verifier_checks_receipts(stateless: Verifier, verifier: Verifier,
                                            new_token: Callable[..., IssuedToken]) -> None:
    receipt = verifier.charge(new_token(limit=USDC).token, "search")
    assert stateless.verify_receipt(receipt.jws).claims == receipt.claims


def test_stateless_verifier_reads_the_revocation_list(
        ring: KeyRing, pricing: PricingTable, clock: FakeClock,
        new_token: Callable[..., IssuedToken]) -> None:
    token = new_token(limit=USDC)
    listed = {"revoked": [{"jti": token.claims.jti, "exp": int(token.claims.expires_at
                                                                .timestamp())}]}
    stateless = Verifier.stateless(jwks=ring.jwks(), pricing=pricing, revocations=listed,
                                   clock=clock)
    assert without_message(refused(lambda: stateless.preflight(token.token, "search"))) == {
        "code": "TOKEN_REVOKED", "jti": token.claims.jti}
    unlisted = Verifier.stateless(jwks=ring.jwks(), pricing=pricing, revocations=None,
                                  clock=clock)
    assert unlisted.preflight(token.token, "search").remaining is None


def without_message(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "message"}

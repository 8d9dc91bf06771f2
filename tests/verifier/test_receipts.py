"""Signed receipts: every field of DESIGN.md, verifiable offline with the JWKS, recoverable."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from sqlalchemy import Engine, select

from mcpbill_cli.errors import BillingError
from mcpbill_cli.keys import KeyRing, KeySource, retire, rotate
from mcpbill_cli.ledger.credit import IssuedToken, show
from mcpbill_cli.ledger.engine import reading
from mcpbill_cli.ledger.models import events, transfers
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.receipts import Receipt
from mcpbill_cli.verifier import Verifier

from .billing_support import PRICE, USDC, FakeClock, b64url, b64url_json, jwt_parts

# DESIGN.md "Receipts": x402's settlement response fields plus mcpbill's own.
DESIGN_FIELDS = ("success", "transaction", "network", "payer", "amount", "receiptId", "tool",
                 "amountUsd", "asset", "jti", "idempotencyKey", "remainingUsd",
                 "pricingVersion", "timestamp")


def refused_code(call: Callable[[], Any]) -> str:
    with pytest.raises(BillingError) as refused:
        call()
    return refused.value.code


def all_kinds_of_receipt(verifier: Verifier, token: str) -> list[Receipt]:
    receipts = [verifier.charge(token, "search", idempotency_key="k-1"),
                verifier.charge(token, "search", idempotency_key="k-1"),  # replayed
                verifier.charge(token, "status"),
                verifier.charge(token, "summarize", units=700),
                verifier.capture(verifier.hold(token, "translate"))]
    with verifier.call(token, "summarize", max_units=5_000) as billed:
        billed.report_units(4_321)
    assert billed.receipt is not None
    return [*receipts, billed.receipt]


def test_every_receipt_verifies_offline_with_the_jwks(
        verifier: Verifier, offline: Verifier, new_token: Callable[..., IssuedToken],
        ring: KeyRing) -> None:
    token = new_token(limit=USDC)
    receipts = all_kinds_of_receipt(verifier, token.token)
    assert [r.amount for r in receipts] == [PRICE, PRICE, 0, 7_000, 50_000, 43_210]
    for receipt in receipts:
        checked = offline.verify_receipt(receipt.jws)
        assert checked.claims == receipt.claims
        assert [f for f in DESIGN_FIELDS if f not in checked.claims] == []
        header, _, _ = jwt_parts(receipt.jws)
        assert (header["kid"], header["alg"]) == (ring.active().kid, "EdDSA")
    assert receipts[0].jws == receipts[1].jws


def test_receipt_fields_have_the_values_of_the_call(
        funded: Engine, verifier: Verifier, new_token: Callable[..., IssuedToken],
        clock: FakeClock) -> None:
    token = new_token(limit=USDC, agent="agent-9")
    receipt = verifier.charge(token.token, "search", args={"q": 1}, idempotency_key="k-9")
    with reading(funded) as conn:
        remaining = show(conn, token.claims.jti, now=clock()).remaining
    expected = {
        "success": True, "transaction": f"charge:{receipt.receipt_id}",
        "network": "mcpbill:ledger", "payer": "agent-9", "amount": "10000",
        "receiptId": receipt.receipt_id, "tool": "search", "amountUsd": "0.01", "asset": "USDC",
        "jti": token.claims.jti, "idempotencyKey": "k-9", "remainingUsd": "0.99",
        "pricingVersion": 1, "timestamp": clock().isoformat().replace("+00:00", "Z"),
    }
    assert {k: receipt.claims[k] for k in DESIGN_FIELDS} == expected
    assert receipt.remaining == remaining == USDC - PRICE
    hold = verifier.hold(token.token, "translate")
    captured = verifier.capture(hold)
    assert (captured.claims["transaction"], captured.receipt_id) == (f"capture:{hold.id}",
                                                                     hold.id)


def test_tampered_receipt_is_refused(verifier: Verifier, offline: Verifier,
                                     new_token: Callable[..., IssuedToken],
                                     ring: KeyRing) -> None:
    token = new_token(limit=USDC)
    receipt = verifier.charge(token.token, "search")
    header, claims, signature = jwt_parts(receipt.jws)
    head = receipt.jws.split(".")[0]
    attacker = ed25519.Ed25519PrivateKey.generate()
    public = next(iter(ring.verification_keys().values())).key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def signed(hdr: dict[str, Any], body: dict[str, Any], sign: Callable[[bytes], bytes]) -> str:
        signing_input = f"{b64url_json(hdr)}.{b64url_json(body)}"
        return f"{signing_input}.{b64url(sign(signing_input.encode()))}"

    forgeries = {
        "raised amount": f"{head}.{b64url_json({**claims, 'amount': '1'})}.{signature}",
        "other token": f"{head}.{b64url_json({**claims, 'jti': 'tok_x'})}.{signature}",
        "foreign key, same kid": signed(header, {**claims, "amount": "1"}, attacker.sign),
        "unknown kid": signed({**header, "kid": "nope"}, claims, attacker.sign),
        "alg none": f"{b64url_json({**header, 'alg': 'none'})}.{b64url_json(claims)}.",
        "hs256 with the public key": signed(
            {**header, "alg": "HS256"}, claims,
            lambda data: hmac.new(public, data, hashlib.sha256).digest()),
        "credit token": token.token,
        "garbage": "not.a.receipt",
    }
    for name, jws in forgeries.items():
        for checker in (offline, verifier):
            assert refused_code(lambda j=jws, c=checker: c.verify_receipt(j)) == (
                "INVALID_RECEIPT"), name


def test_receipt_for_recovers_a_lost_reply(verifier: Verifier,
                                           new_token: Callable[..., IssuedToken]) -> None:
    token = new_token(limit=USDC)
    lost = verifier.charge(token.token, "search", idempotency_key="lost-reply")
    by_key = verifier.receipt_for(tenant="acme", idempotency_key="lost-reply")
    by_id = verifier.receipt_for(lost.receipt_id)
    assert by_key is not None and by_id is not None
    assert by_key.jws == by_id.jws == lost.jws
    assert verifier.receipt_for(tenant="acme", idempotency_key="never-used") is None
    assert verifier.receipt_for(tenant="globex", idempotency_key="lost-reply") is None
    hold = verifier.hold(token.token, "search", idempotency_key="in-flight")
    assert verifier.receipt_for(tenant="acme", idempotency_key="in-flight") is None
    captured = verifier.capture(hold)
    recovered = verifier.receipt_for(tenant="acme", idempotency_key="in-flight")
    assert recovered is not None and recovered.jws == captured.jws


def test_receipts_still_verify_after_a_key_rotation(
        funded: Engine, keys_dir: Path, pricing: PricingTable, verifier: Verifier,
        new_token: Callable[..., IssuedToken], clock: FakeClock) -> None:
    token = new_token(limit=USDC)
    before = verifier.charge(token.token, "search")
    ring = KeyRing.load(keys_dir)
    old_kid = ring.active().kid
    rotate(ring, "EdDSA", now=clock(), last_expiry=clock().replace(year=clock().year + 1))
    ring.save()
    rotated = Verifier(keys=KeySource(directory=keys_dir), pricing=pricing, engine=funded,
                       clock=clock)
    after = rotated.charge(token.token, "search", args={"q": 2})  # the old key verifies it
    assert jwt_parts(after.jws)[0]["kid"] == ring.active().kid != old_kid
    offline = Verifier.stateless(jwks=ring.jwks(), pricing=pricing, clock=clock)
    assert offline.verify_receipt(before.jws).amount == offline.verify_receipt(after.jws).amount


@pytest.mark.parametrize("ending", ["lapsed", "retired"])
def test_the_verifier_still_verifies_its_own_receipts_once_their_key_signs_no_more(
        funded: Engine, keys_dir: Path, pricing: PricingTable,
        new_token: Callable[..., IssuedToken], clock: FakeClock, ending: str) -> None:
    """A running verifier and a new one (as after a restart) check a receipt whose key was
    rotated out, then lapsed or was retired: a receipt outlives its key's use for tokens."""
    running = Verifier(keys=KeySource(directory=keys_dir, check_interval=0), pricing=pricing,
                       engine=funded, clock=clock)
    receipt = running.charge(new_token(limit=USDC).token, "search")
    ring = KeyRing.load(keys_dir)
    old_kid = ring.active().kid
    rotate(ring, "EdDSA", now=clock(),
           last_expiry=clock() if ending == "lapsed" else clock().replace(year=2999))
    if ending == "retired":
        retire(ring, old_kid)
    ring.save()
    restarted = Verifier(keys=KeySource(directory=keys_dir), pricing=pricing, engine=funded,
                         clock=clock)
    try:
        for verifier in (running, restarted):
            assert old_kid not in verifier.keys.verification_keys()  # it verifies no token
            assert verifier.verify_receipt(receipt.jws).receipt_id == receipt.receipt_id
        forged = receipt.jws[:-4] + ("AAAA" if not receipt.jws.endswith("AAAA") else "BBBB")
        with pytest.raises(BillingError) as refused:
            restarted.verify_receipt(forged)
        assert refused.value.code == "INVALID_RECEIPT"
    finally:
        running.close()
        restarted.close()


def test_demo_mode_marks_receipts_transfers_and_events(
        funded: Engine, keys: KeySource, pricing: PricingTable, offline: Verifier,
        new_token: Callable[..., IssuedToken], clock: FakeClock) -> None:
    token = new_token(limit=USDC)
    demo = Verifier(keys=keys, pricing=pricing, engine=funded, demo=True, clock=clock)
    receipt = demo.charge(token.token, "search")
    checked = offline.verify_receipt(receipt.jws)
    assert (checked.claims["network"], checked.claims["demo"]) == ("mcpbill:demo", True)
    with reading(funded) as conn:
        moved = conn.execute(select(transfers.c.demo).where(
            transfers.c.ref == receipt.receipt_id)).scalars().all()
        logged = conn.execute(select(events.c.demo).where(
            events.c.ref == receipt.receipt_id)).scalars().all()
    assert moved == [True] and logged == [True]

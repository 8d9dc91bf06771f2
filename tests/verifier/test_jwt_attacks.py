"""One test per known attack on JWT credit tokens (like pyjwt's ``tests/test_advisory.py``).

Each forged token is refused with an exact ``code`` and ``reason``, moves no money, and an
unparseable one leaves only its sha256 in the audit trail.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from sqlalchemy import Engine, select

from mcpbill_cli.errors import BillingError
from mcpbill_cli.keys import KeyRing, KeySource, retire, rotate
from mcpbill_cli.ledger.credit import IssuedToken, revoke, revoked_list, show
from mcpbill_cli.ledger.engine import reading, writing
from mcpbill_cli.ledger.models import events, refusal_counts
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.tokens import MAX_TOKEN_BYTES, encode_token
from mcpbill_cli.verifier import Verifier

from .billing_support import PRICE, USDC, FakeClock, b64url, b64url_json, jwt_parts
from .invariants import assert_ledger_invariants

LEEWAY = 30


def refusal(call: Callable[[], Any]) -> tuple[str, str | None]:
    """(code, reason) of the BillingError ``call`` raises."""
    with pytest.raises(BillingError) as refused:
        call()
    as_dict = refused.value.to_dict()
    json.dumps(as_dict)
    return as_dict["code"], as_dict.get("reason")


def assert_refused_everywhere(verifier: Verifier, token: str, code: str,
                              reason: str | None, variant: Any = None) -> None:
    """preflight, hold and charge all refuse the same way (``variant`` names the case)."""
    for step in (verifier.preflight, verifier.hold, verifier.charge):
        assert refusal(lambda s=step: s(token, "search")) == (code, reason), (step.__name__,
                                                                          variant)


def ed25519_sign(key: ed25519.Ed25519PrivateKey) -> Callable[[bytes], bytes]:
    return key.sign


def forge(header: dict[str, Any], payload: dict[str, Any] | str | bytes,
          sign: Callable[[bytes], bytes] | None) -> str:
    if isinstance(payload, dict):
        body = b64url_json(payload)
    else:
        body = b64url(payload.encode() if isinstance(payload, str) else payload)
    signing_input = f"{b64url_json(header)}.{body}"
    signature = b64url(sign(signing_input.encode())) if sign else ""
    return f"{signing_input}.{signature}"


@pytest.fixture
def genuine(new_token: Callable[..., IssuedToken]) -> IssuedToken:
    return new_token(limit=USDC, scope=["search", "status"])


@pytest.fixture
def operator_key(ring: KeyRing) -> ed25519.Ed25519PrivateKey:
    key: ed25519.Ed25519PrivateKey = ring.signing_key()[1]
    return key


def header_of(token: IssuedToken, **changes: Any) -> dict[str, Any]:
    header, _, _ = jwt_parts(token.token)
    return {**header, **changes}


def payload_of(token: IssuedToken, **changes: Any) -> dict[str, Any]:
    _, payload, _ = jwt_parts(token.token)
    return {**payload, **changes}


def assert_nothing_moved(engine: Engine, token: IssuedToken, clock: FakeClock) -> None:
    with reading(engine) as conn:
        view = show(conn, token.claims.jti, now=clock())
        assert_ledger_invariants(conn)
    assert (view.spent, view.held, view.remaining) == (0, 0, token.claims.limit)


# --- algorithm attacks -------------------------------------------------------------------------


def test_alg_none(verifier: Verifier, funded: Engine, genuine: IssuedToken,
                  clock: FakeClock) -> None:
    for alg in ("none", "None", "NONE", "nOnE"):
        forged = forge(header_of(genuine, alg=alg), payload_of(genuine), None)
        assert_refused_everywhere(verifier, forged, "INVALID_CREDIT_TOKEN",
                                  "algorithm_not_allowed", alg)
    assert_nothing_moved(funded, genuine, clock)


def _public_key_forms(ring: KeyRing) -> dict[str, bytes]:
    public = next(iter(ring.verification_keys().values())).key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    pem = public.public_bytes(serialization.Encoding.PEM,
                              serialization.PublicFormat.SubjectPublicKeyInfo)
    openssh = public.public_bytes(serialization.Encoding.OpenSSH,
                                  serialization.PublicFormat.OpenSSH)
    jwk_x = ring.jwks()["keys"][0]["x"].encode()
    return {"raw": raw, "pem": pem, "openssh": openssh, "jwk_x": jwk_x}


def test_hs256_signed_with_the_public_key(verifier: Verifier, funded: Engine, ring: KeyRing,
                                          genuine: IssuedToken, clock: FakeClock) -> None:
    for form, secret in _public_key_forms(ring).items():
        forged = forge(header_of(genuine, alg="HS256"), payload_of(genuine),
                       lambda data, key=secret: hmac.new(key, data, hashlib.sha256).digest())
        assert_refused_everywhere(verifier, forged, "INVALID_CREDIT_TOKEN",
                                  "algorithm_not_allowed", form)
    assert_nothing_moved(funded, genuine, clock)


def test_es256_header_on_an_ed25519_kid(verifier: Verifier, genuine: IssuedToken,
                                        operator_key: ed25519.Ed25519PrivateKey) -> None:
    forged = forge(header_of(genuine, alg="ES256"), payload_of(genuine), operator_key.sign)
    assert_refused_everywhere(verifier, forged, "INVALID_CREDIT_TOKEN", "algorithm_not_allowed")


# --- key attacks -------------------------------------------------------------------------------


def test_unknown_kid(verifier: Verifier, genuine: IssuedToken,
                     operator_key: ed25519.Ed25519PrivateKey) -> None:
    forged = forge(header_of(genuine, kid="20990101-deadbeef"), payload_of(genuine),
                   operator_key.sign)
    assert_refused_everywhere(verifier, forged, "INVALID_CREDIT_TOKEN", "unknown_key")


def test_path_like_or_odd_kid(verifier: Verifier, genuine: IssuedToken, keys_dir: Path,
                              operator_key: ed25519.Ed25519PrivateKey) -> None:
    real = genuine.claims.kid
    kids: list[Any] = ["../../etc/passwd", "keys/x.pem", "/dev/null", "", f"../keys/{real}.pem",
                       f"{real}.pem", str(keys_dir / f"{real}.pem"), "keyring.json",
                       f"{real}\x00", f" {real}", real.upper(), 123, None, [real],
                       {"kid": real}]
    # A kid's hex part can be all digits (about 1 in 40): then upper() is the real kid itself.
    for kid in [kid for kid in kids if kid != real]:
        forged = forge(header_of(genuine, kid=kid), payload_of(genuine), operator_key.sign)
        assert_refused_everywhere(verifier, forged, "INVALID_CREDIT_TOKEN", "unknown_key", kid)


def test_missing_kid(verifier: Verifier, genuine: IssuedToken,
                     operator_key: ed25519.Ed25519PrivateKey) -> None:
    header = header_of(genuine)
    del header["kid"]
    forged = forge(header, payload_of(genuine), operator_key.sign)
    assert_refused_everywhere(verifier, forged, "INVALID_CREDIT_TOKEN", "unknown_key")


def test_foreign_key_with_the_same_kid(verifier: Verifier, funded: Engine,
                                       genuine: IssuedToken, clock: FakeClock) -> None:
    attacker = ed25519.Ed25519PrivateKey.generate()
    forged = forge(header_of(genuine), payload_of(genuine, spendLimitUsd="1000000.00"),
                   attacker.sign)
    assert_refused_everywhere(verifier, forged, "INVALID_CREDIT_TOKEN", "bad_signature")
    assert_nothing_moved(funded, genuine, clock)


def test_embedded_jwk_header_is_not_trusted(verifier: Verifier, genuine: IssuedToken) -> None:
    """CVE-2018-0114 style: the token carries the attacker's public key in its header."""
    attacker = ed25519.Ed25519PrivateKey.generate()
    raw = attacker.public_key().public_bytes(serialization.Encoding.Raw,
                                             serialization.PublicFormat.Raw)
    jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw), "kid": genuine.claims.kid}
    header = header_of(genuine, jwk=jwk, jku="https://attacker.example/jwks.json")
    forged = forge(header, payload_of(genuine), attacker.sign)
    assert_refused_everywhere(verifier, forged, "INVALID_CREDIT_TOKEN", "bad_signature")


def test_token_signed_by_a_retired_key(funded: Engine, keys_dir: Path, pricing: PricingTable,
                                       new_token: Callable[..., IssuedToken],
                                       clock: FakeClock) -> None:
    old = new_token(limit=PRICE)
    ring = KeyRing.load(keys_dir)
    rotate(ring, "EdDSA", now=clock(), last_expiry=None)
    retire(ring, old.claims.kid)
    ring.save()
    verifier = Verifier(keys=KeySource(directory=keys_dir), pricing=pricing, engine=funded,
                        clock=clock)
    assert_refused_everywhere(verifier, old.token, "INVALID_CREDIT_TOKEN", "unknown_key")


# --- payload attacks ---------------------------------------------------------------------------


def test_tampered_payload_with_the_original_signature(
        verifier: Verifier, funded: Engine, genuine: IssuedToken, clock: FakeClock) -> None:
    _, _, signature = jwt_parts(genuine.token)
    head = genuine.token.split(".")[0]
    changes: list[dict[str, Any]] = [
        {"spendLimitUsd": "1000000.00"}, {"scope": ["*"]}, {"exp": 4102444800},
        {"tenant": "someone-else"}, {"sub": "agent-2", "agentId": "agent-2"}]
    for change in changes:
        forged = f"{head}.{b64url_json(payload_of(genuine, **change))}.{signature}"
        assert_refused_everywhere(verifier, forged, "INVALID_CREDIT_TOKEN", "bad_signature",
                                  change)
    assert_nothing_moved(funded, genuine, clock)


def test_tampered_jti_points_at_another_token(
        verifier: Verifier, funded: Engine, genuine: IssuedToken, clock: FakeClock,
        new_token: Callable[..., IssuedToken]) -> None:
    rich = new_token(limit=50 * USDC)
    _, _, signature = jwt_parts(genuine.token)
    head = genuine.token.split(".")[0]
    forged = f"{head}.{b64url_json(payload_of(genuine, jti=rich.claims.jti))}.{signature}"
    assert_refused_everywhere(verifier, forged, "INVALID_CREDIT_TOKEN", "bad_signature")
    assert_nothing_moved(funded, rich, clock)


def test_non_json_payload(verifier: Verifier, genuine: IssuedToken,
                          operator_key: ed25519.Ed25519PrivateKey) -> None:
    """Signed with the operator's real key, so only the payload's shape can refuse it."""
    payloads: list[str | bytes] = ["not json at all", "{'single': 'quotes'}", "[1, 2, 3]",
                                   '"a string"', "null", "", b"\xff\xfe\x00binary"]
    for payload in payloads:
        forged = forge(header_of(genuine), payload, operator_key.sign)
        assert_refused_everywhere(verifier, forged, "INVALID_CREDIT_TOKEN", "malformed",
                                  payload)


def test_signed_payload_with_malformed_claims(verifier: Verifier, genuine: IssuedToken,
                                              operator_key: ed25519.Ed25519PrivateKey) -> None:
    changes: list[dict[str, Any]] = [{"scope": "search"}, {"scope": [1]},
                                     {"spendLimitUsd": "lots"}, {"spendLimitUsd": 1e308},
                                     {"spendLimitUsd": "-5"}, {"jti": None}, {"tenant": None},
                                     {"exp": None}, {"aud": None}]
    for change in changes:
        payload = {k: v for k, v in payload_of(genuine, **change).items() if v is not None}
        forged = forge(header_of(genuine), payload, operator_key.sign)
        assert_refused_everywhere(verifier, forged, "INVALID_CREDIT_TOKEN", "malformed",
                                  change)


def test_garbage_token(verifier: Verifier) -> None:
    for token in ["", "abc", "a.b", "a.b.c", "a.b.c.d.e", ".", "..", "eyJhbGciOiJFZERTQSJ9",
                  "\u00e9\u00e9.\u00e9.\u00e9", "Bearer x.y.z", "eyJ9.e30.", " \n"]:
        assert_refused_everywhere(verifier, token, "INVALID_CREDIT_TOKEN", "malformed", token)


def test_unencoded_payload_header(verifier: Verifier, genuine: IssuedToken,
                                  operator_key: ed25519.Ed25519PrivateKey) -> None:
    """RFC 7797 ``b64: false`` with ``crit``: not a form credit tokens use."""
    header = header_of(genuine, b64=False, crit=["b64"])
    forged = forge(header, "", operator_key.sign)
    assert_refused_everywhere(verifier, forged, "INVALID_CREDIT_TOKEN", "malformed")


def test_receipt_presented_as_a_credit_token(verifier: Verifier,
                                             genuine: IssuedToken) -> None:
    """A receipt is signed by the same operator key; it must never spend as a token."""
    receipt = verifier.charge(genuine.token, "status")
    assert_refused_everywhere(verifier, receipt.jws, "INVALID_CREDIT_TOKEN", "malformed")


def test_validly_signed_token_unknown_to_the_ledger(
        verifier: Verifier, ring: KeyRing, genuine: IssuedToken) -> None:
    """The balance comes from the ledger, never from the claims: a token minted outside the
    ledger (another environment with the same keys, a restored backup) cannot spend."""
    claims = genuine.claims
    ghost = dataclasses.replace(claims, jti="tok_" + "0" * 24, limit=1000 * USDC)
    info, key = ring.signing_key()
    token = encode_token(ghost, info.alg, key)
    assert_refused_everywhere(verifier, token, "INVALID_CREDIT_TOKEN", "unknown_token")


# --- time, audience, issuer --------------------------------------------------------------------


def test_expired(funded: Engine, keys: KeySource, pricing: PricingTable,
                 new_token: Callable[..., IssuedToken], clock: FakeClock) -> None:
    token = new_token(limit=USDC, ttl=60)
    fresh = Verifier(keys=keys, pricing=pricing, engine=funded, leeway=LEEWAY, clock=clock)
    cached = Verifier(keys=keys, pricing=pricing, engine=funded, leeway=LEEWAY, clock=clock)
    cached.preflight(token.token, "search")  # the claims are now cached
    clock.advance(60 + LEEWAY - 1)
    fresh.preflight(token.token, "search")
    Verifier(keys=keys, pricing=pricing, engine=funded, leeway=LEEWAY,
             clock=clock).preflight(token.token, "search")
    clock.advance(1)
    for verifier in (fresh, cached, Verifier(keys=keys, pricing=pricing, engine=funded,
                                             leeway=LEEWAY, clock=clock)):
        assert_refused_everywhere(verifier, token.token, "INVALID_CREDIT_TOKEN", "expired")
    assert_nothing_moved(funded, token, clock)


def test_nbf_in_the_future(funded: Engine, ring: KeyRing, keys: KeySource,
                           pricing: PricingTable, clock: FakeClock) -> None:
    from .billing_support import mint

    later = clock() + timedelta(hours=1)
    token = mint(funded, ring, now=later, limit=USDC)
    verifier = Verifier(keys=keys, pricing=pricing, engine=funded, leeway=LEEWAY, clock=clock)
    assert_refused_everywhere(verifier, token.token, "INVALID_CREDIT_TOKEN", "not_yet_valid")
    clock.now = later - timedelta(seconds=LEEWAY + 1)
    assert refusal(lambda: verifier.preflight(token.token, "search")) == (
        "INVALID_CREDIT_TOKEN", "not_yet_valid")
    clock.now = later - timedelta(seconds=LEEWAY)
    assert verifier.preflight(token.token, "search").remaining == USDC


def test_wrong_audience(verifier: Verifier, new_token: Callable[..., IssuedToken]) -> None:
    token = new_token(audience="another-server")
    assert_refused_everywhere(verifier, token.token, "INVALID_CREDIT_TOKEN", "wrong_audience")


def test_wrong_issuer(verifier: Verifier, new_token: Callable[..., IssuedToken]) -> None:
    token = new_token(issuer="evil-issuer")
    assert_refused_everywhere(verifier, token.token, "INVALID_CREDIT_TOKEN", "wrong_issuer")


# --- revocation --------------------------------------------------------------------------------


def test_revoked_on_the_ledger_is_refused_at_once(
        verifier: Verifier, funded: Engine, genuine: IssuedToken, clock: FakeClock,
        new_token: Callable[..., IssuedToken]) -> None:
    child = new_token(limit=PRICE * 3, parent=genuine.claims.jti, agent="sub-agent")
    verifier.preflight(genuine.token, "search")  # cached claims must not outlive revocation
    verifier.preflight(child.token, "search")
    with writing(funded) as conn:
        revoke(conn, [genuine.claims.jti], reason="leaked", clock=clock)
    assert_refused_everywhere(verifier, genuine.token, "TOKEN_REVOKED", None)
    assert_refused_everywhere(verifier, child.token, "TOKEN_REVOKED", None)


def test_revoked_in_the_exported_list_is_refused_by_a_stateless_verifier(
        funded: Engine, ring: KeyRing, pricing: PricingTable, genuine: IssuedToken,
        clock: FakeClock, tmp_path: Path) -> None:
    with writing(funded) as conn:
        revoke(conn, [genuine.claims.jti], reason="leaked", clock=clock)
        listed = revoked_list(conn, now=clock())
    document = {"revoked": listed}
    stateless = Verifier.stateless(jwks=ring.jwks(), pricing=pricing, revocations=document,
                                   clock=clock)
    assert refusal(lambda: stateless.preflight(genuine.token, "search")) == (
        "TOKEN_REVOKED", None)
    (tmp_path / "jwks.json").write_text(json.dumps(ring.jwks()))
    (tmp_path / "revoked.json").write_text(json.dumps(document))
    from_files = Verifier.stateless(jwks=tmp_path / "jwks.json", pricing=pricing,
                                    revocations=tmp_path / "revoked.json", clock=clock)
    assert refusal(lambda: from_files.preflight(genuine.token, "search")) == (
        "TOKEN_REVOKED", None)


def test_a_revoked_token_stays_listed_while_verifiers_accept_it_past_its_expiry(
        funded: Engine, ring: KeyRing, pricing: PricingTable, genuine: IssuedToken,
        clock: FakeClock) -> None:
    """A stateless verifier accepts a token for its leeway (30 s) past ``exp``: the list a
    revocation export writes then still names it, and the token is refused, not accepted."""
    with writing(funded) as conn:
        revoke(conn, [genuine.claims.jti], reason="leaked", clock=clock)
    clock.now = genuine.claims.expires_at + timedelta(seconds=10)  # past exp, inside leeway
    with reading(funded) as conn:
        listed = revoked_list(conn, now=clock(), leeway=30)
    assert [entry["jti"] for entry in listed] == [genuine.claims.jti]
    stateless = Verifier.stateless(jwks=ring.jwks(), pricing=pricing, leeway=30,
                                   revocations={"revoked": listed}, clock=clock)
    assert refusal(lambda: stateless.preflight(genuine.token, "search")) == (
        "TOKEN_REVOKED", None)
    clock.now = genuine.claims.expires_at + timedelta(seconds=31)  # no verifier accepts it
    with reading(funded) as conn:
        assert revoked_list(conn, now=clock(), leeway=30) == []


# --- size and the audit trail ------------------------------------------------------------------


def test_one_megabyte_token_is_refused_before_any_parsing(
        verifier: Verifier, offline: Verifier, genuine: IssuedToken,
        operator_key: ed25519.Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch) -> None:
    """Validly signed and otherwise well formed: only its size can refuse it."""
    huge = forge(header_of(genuine), payload_of(genuine, pad="A" * (1 << 20)),
                 operator_key.sign)
    assert len(huge) > 1 << 20 > MAX_TOKEN_BYTES
    parsed: list[int] = []
    real_loads, real_b64 = json.loads, base64.urlsafe_b64decode

    def spy_loads(text: Any, *args: Any, **kwargs: Any) -> Any:
        parsed.append(len(text))
        return real_loads(text, *args, **kwargs)

    def spy_b64(data: Any) -> bytes:
        parsed.append(len(data))
        return real_b64(data)

    monkeypatch.setattr(json, "loads", spy_loads)
    monkeypatch.setattr(base64, "urlsafe_b64decode", spy_b64)
    for checker in (offline, verifier):
        with pytest.raises(BillingError) as refused:
            checker.preflight(huge, "search")
        assert (refused.value.code, refused.value.details["reason"]) == (
            "INVALID_CREDIT_TOKEN", "malformed")
        assert str(MAX_TOKEN_BYTES) in refused.value.message
    assert parsed == []
    monkeypatch.undo()
    assert_refused_everywhere(verifier, huge, "INVALID_CREDIT_TOKEN", "malformed")


@pytest.mark.parametrize("kind", ["garbage", "bad_signature", "huge"])
def test_unparseable_token_is_recorded_only_as_a_hash(
        verifier: Verifier, funded: Engine, genuine: IssuedToken, kind: str) -> None:
    _, _, signature = jwt_parts(genuine.token)
    head = genuine.token.split(".")[0]
    token = {
        "garbage": "not-a-jwt-but-a-secret-" + "x" * 40,
        "bad_signature": f"{head}.{b64url_json(payload_of(genuine, scope=['*']))}.{signature}",
        "huge": "h" * (MAX_TOKEN_BYTES + 1),
    }[kind]
    for call in (verifier.preflight, verifier.hold, verifier.charge):
        with pytest.raises(BillingError):
            call(token, "search")
    verifier.seal()  # no key we hold signed it: counted, not an event each
    with reading(funded) as conn:
        assert conn.execute(select(events).where(events.c.kind == "refusal")).all() == []
        rows = conn.execute(select(refusal_counts)).mappings().all()
    reason = "bad_signature" if kind == "bad_signature" else "malformed"
    digest = hashlib.sha256(token.encode()).hexdigest()
    assert [(row["code"], row["reason"], row["count"], row["sample"]) for row in rows] == [
        ("INVALID_CREDIT_TOKEN", reason, 3, digest)]
    stored = " ".join(str(value) for value in rows[0].values())
    for fragment in (token, token[:24], token[-24:], signature):
        assert fragment not in stored

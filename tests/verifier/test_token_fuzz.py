"""Fuzz the verifier with hostile credit tokens: only ``BillingError`` ever leaves it, and every
refusal is accounted for: an event of its own when the token is one we signed (scope, budget,
expiry, revocation...), one more in ``refusal_counts`` when no known key signed it (garbage,
unknown keys, bad signatures), once the verifier has written its counts (``seal()``).

The tokens: random text, random base64url segments (non-UTF-8 inside), JOSE headers and claims
built by hypothesis (deep nesting, huge numbers, NaN, every header field with odd values, real
claims with fields mutated), real tokens mutated (a flipped character, segments swapped or
repeated, data appended), forgeries re-signed with the real private key (the signature passes,
the claims are hostile), alg ``none`` and HS256 keyed with the public key, 1 MB tokens and
values that are not strings at all. Each goes through ``preflight``, ``begin`` or ``charge`` on
a ledger-backed verifier, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, func, select

from mcpbill_cli.errors import BillingError, InvalidCreditToken
from mcpbill_cli.keys import KeyRing, KeySource
from mcpbill_cli.ledger.audit import token_fingerprint
from mcpbill_cli.ledger.credit import IssuedToken
from mcpbill_cli.ledger.engine import make_engine, reading
from mcpbill_cli.ledger.models import events, refusal_counts
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.tokens import (
    MAX_TOKEN_BYTES,
    Claims,
    decode_token,
    encode_token,
    new_jti,
    peek_header,
)
from mcpbill_cli.verifier import Hold, Verifier

from .billing_support import USDC, FakeClock, b64url, jwt_parts, mint

# Tokens per backend, drawn BATCH to a hypothesis example (its overhead per example grows with
# the number of examples). A refusal of a token we signed commits one audit row, about 3.5 ms
# on either backend when the commit waits for the disk (garbage is only counted in memory), so
# the fuzzed verifier's engine does not wait (``durable=False``, as a demo verifier's), which
# changes nothing the test asserts. Should the file grow past 90 s, halve PostgreSQL's share
# first, down to 3,000.
TOKENS = {"sqlite": 20_000, "postgres": 20_000}
BATCH = 10
DIRECT_TOKENS = 5_000  # straight to decode_token: no ledger, no commit
AUDIT_EVERY = 97  # compare the trail with the refusals made (a flush and queries: not always)
# INVALID_CREDIT_TOKEN reasons that say no key we hold signed the token: such a refusal is
# counted in refusal_counts, never an event (ledger/refusals.py); any other stays an event.
ENTRIES = ("preflight", "begin", "charge")
DECODE_REASONS = {"malformed", "bad_signature", "unknown_key", "algorithm_not_allowed",
                  "expired", "not_yet_valid", "wrong_audience", "wrong_issuer"}


# --- JSON texts that json.dumps will not write -------------------------------------------------


class Raw(str):
    """JSON text put in as it is: a number past int's digit limit, NaN, deep nesting."""


def to_json(value: Any) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{to_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(to_json(v) for v in value) + "]"
    return json.dumps(value)  # NaN and Infinity as json writes them; lone surrogates escaped


def nested(depth: int, opener: str, closed: bool) -> Raw:
    if opener == "[":
        return Raw("[" * depth + ("]" * depth if closed else ""))
    return Raw('{"a":' * depth + "1" + ("}" * depth if closed else ""))


def segment(data: str | bytes) -> str:
    return b64url(data.encode() if isinstance(data, str) else data)


any_text = st.text(st.characters(exclude_categories=()), max_size=40)  # lone surrogates too
numbers = st.one_of(
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1e-400", "-0",
                     "1E308", "0.0000001"]).map(Raw),
    st.integers(min_value=4000, max_value=5000).map(lambda n: Raw("9" * n)),  # 4300-digit cap
)
deep = st.builds(nested, st.integers(min_value=1, max_value=5000), st.sampled_from("[{"),
                 st.booleans())
scalars = st.none() | st.booleans() | numbers | any_text
json_values = deep | st.recursive(
    scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(any_text, kids,
                                                                       max_size=4),
    max_leaves=6)


# --- what the strategies need from the test's key ring ------------------------------------------


@dataclass(frozen=True)
class Kit:
    kid: str
    sign: Callable[[bytes], bytes]
    public_forms: tuple[bytes, ...]  # the public key as an HMAC secret, in every usual form
    genuine: tuple[str, ...]  # real tokens: valid, of a narrow scope, a child, expired
    claims: dict[str, Any]  # the first one's payload

    @property
    def header(self) -> dict[str, Any]:
        return {"alg": "EdDSA", "kid": self.kid, "typ": "JWT"}

    def signed(self, signing_input: str) -> str:
        return f"{signing_input}.{b64url(self.sign(signing_input.encode()))}"


def public_forms(ring: KeyRing) -> tuple[bytes, ...]:
    public = next(iter(ring.verification_keys().values())).key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    pem = public.public_bytes(serialization.Encoding.PEM,
                              serialization.PublicFormat.SubjectPublicKeyInfo)
    return raw, pem, ring.jwks()["keys"][0]["x"].encode()


# --- the hostile classes ----------------------------------------------------------------------


JWT_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ \n\t\x00\u00e9"
ALGS = ["EdDSA", "none", "None", "NONE", "nOnE", "HS256", "HS512", "ES256", "RS256", "PS256",
        "", "eddsa", "Ed25519"]
CLAIM_NAMES = ["iss", "aud", "sub", "jti", "iat", "nbf", "exp", "agentId", "tenant", "scope",
               "spendLimitUsd", "parent"]
ODD_CLAIMS: list[Any] = [
    "lots", "-5", "5e3", "1.0000001", "$5", " 5 ", "0", "NaN", "1" * 5000, "\u0661\u0662", "",
    "*", "9999999999", "2026-01-01T00:00:00Z", "\ud800", "x" * 300, True, False, 0, -1, 1.5,
    10**18, -(10**18), 2**63, Raw("1e400"), Raw("NaN"), Raw("-Infinity"), Raw("9" * 5000), {},
    [], ["*"], [1], ["search", None], {"jti": "x"}]
DROP = object()  # a claim taken out of the payload


def random_text() -> st.SearchStrategy[tuple[str, Any]]:
    return st.tuples(st.just("random text"), any_text | st.text(JWT_CHARS, max_size=120))


def random_segments() -> st.SearchStrategy[tuple[str, Any]]:
    parts = st.lists(st.binary(max_size=120).map(segment), min_size=1, max_size=5)
    return st.tuples(st.just("random base64url segments"), parts.map(".".join))


def header_fields(kit: Kit) -> st.SearchStrategy[dict[str, Any]]:
    """The real header with up to four JOSE fields set, each to a telling or a random value."""
    kids = st.sampled_from([kit.kid, "../../etc/passwd", "/dev/null", "", "keyring.json",
                            f"{kit.kid}.pem", kit.kid.upper(), f"{kit.kid}\x00", "k" * 3000])
    attacker_jwk = st.fixed_dictionaries(
        {"kty": st.sampled_from(["OKP", "oct", "EC"]), "crv": st.just("Ed25519"),
         "x": st.binary(min_size=32, max_size=32).map(segment), "kid": st.just(kit.kid)})
    urls = st.sampled_from(["https://attacker.example/jwks.json", "file:///etc/passwd"])
    telling: dict[str, st.SearchStrategy[Any]] = {
        "alg": st.sampled_from(ALGS), "kid": kids,
        "typ": st.sampled_from(["JWT", "jwt", "at+jwt", "JOSE"]),
        "cty": st.sampled_from(["JWT", "json"]),
        "crit": st.lists(st.sampled_from(["b64", "exp", "x", ""]), max_size=3),
        "b64": st.booleans(), "jku": urls, "x5u": urls, "jwk": attacker_jwk,
        "x5c": st.lists(st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()),
                        max_size=3),
        "x5t": st.binary(max_size=20).map(segment), "zip": st.sampled_from(["DEF", "GZIP"]),
    }
    field = st.one_of(*(st.tuples(st.just(name), values | json_values)
                        for name, values in telling.items()))
    return st.lists(field, min_size=1, max_size=4).map(lambda pairs: {**kit.header,
                                                                     **dict(pairs)})


def mutated_claims(kit: Kit) -> st.SearchStrategy[dict[str, Any]]:
    value = st.sampled_from(ODD_CLAIMS) | json_values | st.just(DROP)
    changes = st.lists(st.tuples(st.sampled_from(CLAIM_NAMES), value), min_size=1, max_size=3)

    def apply(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        claims = dict(kit.claims)
        for name, new in pairs:
            if new is DROP:
                claims.pop(name, None)
            else:
                claims[name] = new
        return claims

    return changes.map(apply)


@st.composite
def forged(draw: st.DrawFn, kit: Kit, headers: st.SearchStrategy[Any],
           payloads: st.SearchStrategy[Any]) -> tuple[str, Any]:
    """A JOSE header and a payload built by hypothesis, signed one of several ways."""
    header, payload = draw(headers), draw(payloads)
    signing_input = f"{segment(to_json(header))}.{segment(to_json(payload))}"
    how = draw(st.sampled_from(["real key", "real key", "unsigned", "random signature"]))
    if how == "real key":
        return "forged, signed with the real key", kit.signed(signing_input)
    if how == "unsigned":
        return "forged, unsigned", f"{signing_input}."
    return "forged, random signature", f"{signing_input}.{segment(draw(st.binary()))}"


def resigned(kit: Kit, claims: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[str, Any]]:
    """Hostile claims under the real header, signed with the real key: the signature passes."""
    head = segment(to_json(kit.header))
    return claims.map(lambda payload: (
        "hostile claims, signed with the real key",
        kit.signed(f"{head}.{segment(to_json(payload))}")))


@st.composite
def odd_header(draw: st.DrawFn, kit: Kit, headers: st.SearchStrategy[Any]) -> tuple[str, Any]:
    """The real claims under a header with odd JOSE fields, signed with the real key; with
    ``b64: false``, maybe the payload unencoded (RFC 7797) or detached."""
    header = draw(headers)
    body = segment(to_json(kit.claims))
    if header.get("b64") is False:
        body = draw(st.sampled_from([body, to_json(kit.claims), ""]))
    return "odd JOSE header, signed with the real key", kit.signed(
        f"{segment(to_json(header))}.{body}")


@st.composite
def alg_confusion(draw: st.DrawFn, kit: Kit, claims: st.SearchStrategy[Any]) -> tuple[str, Any]:
    """The real claims (maybe mutated) under alg none, or HS256 keyed with the public key."""
    payload = draw(st.just(kit.claims) | claims)
    alg = draw(st.sampled_from(["none", "None", "NONE", "HS256", "HS384", "HS512"]))
    signing_input = f"{segment(to_json({**kit.header, 'alg': alg}))}.{segment(to_json(payload))}"
    if alg.lower() == "none":
        return "alg none", f"{signing_input}." + draw(st.sampled_from(["", "AAAA"]))
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    secret = draw(st.sampled_from(kit.public_forms))
    mac = hmac.new(secret, signing_input.encode(), digest).digest()
    return "alg HS* keyed with the public key", f"{signing_input}.{b64url(mac)}"


@st.composite
def mutated_genuine(draw: st.DrawFn, kit: Kit) -> tuple[str, Any]:
    token = draw(st.sampled_from(kit.genuine))
    parts = token.split(".")
    how = draw(st.sampled_from(["flip", "swap", "truncate", "append", "repeat", "pad",
                                "case", "as is"]))
    if how == "flip":
        at = draw(st.integers(min_value=0, max_value=len(token) - 1))
        token = token[:at] + draw(st.sampled_from(JWT_CHARS)) + token[at + 1:]
    elif how == "swap":
        token = ".".join(draw(st.permutations(parts)))
    elif how == "truncate":
        token = token[:draw(st.integers(min_value=0, max_value=len(token) - 1))]
    elif how == "append":
        token += draw(st.text(JWT_CHARS, min_size=1, max_size=40) | st.binary().map(
            lambda b: "." + segment(b)))
    elif how == "repeat":
        token = ".".join(draw(st.lists(st.sampled_from(parts), min_size=1, max_size=6)))
    elif how == "pad":
        at = draw(st.integers(min_value=0, max_value=2))
        parts[at] += draw(st.sampled_from(["=", "==", "===", " ", "\n", "\t"]))
        token = ".".join(parts)
    elif how == "case":
        token = token.swapcase()
    return f"real token: {how}", token


def non_utf8(kit: Kit) -> st.SearchStrategy[tuple[str, Any]]:
    junk = st.binary(min_size=1, max_size=40).map(lambda b: b"\xff\xfe" + b)
    inside = st.tuples(junk, junk).map(
        lambda pair: f"{segment(pair[0])}.{segment(pair[1])}.")
    claims = junk.map(lambda b: kit.signed(f"{segment(to_json(kit.header))}.{segment(b)}"))
    surrogates = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=4).map(
        lambda s: kit.genuine[0] + s)
    return st.tuples(st.just("non-UTF-8"), inside | claims | surrogates)


def huge(kit: Kit) -> st.SearchStrategy[tuple[str, Any]]:
    megabyte = 1 << 20
    payload = {**kit.claims, "pad": "A" * megabyte}
    values = [
        "a" * megabyte, "." * megabyte, kit.genuine[0] + "A" * megabyte,
        kit.signed(f"{segment(to_json(kit.header))}.{segment(to_json(payload))}"),
        "b" * (MAX_TOKEN_BYTES + 1), "c" * MAX_TOKEN_BYTES, b"d" * megabyte,
        segment("[" * 6000) + ".e30.",
    ]
    return st.tuples(st.just("huge"), st.sampled_from(values))


def non_str(kit: Kit) -> st.SearchStrategy[tuple[str, Any]]:
    values = (st.none() | st.booleans() | st.integers() | st.floats() | st.binary()
              | st.lists(st.integers(), max_size=3) | st.dictionaries(st.text(), st.integers())
              | st.just(kit.genuine[0].encode()) | st.just(bytearray(kit.genuine[0], "ascii"))
              | st.just(tuple(kit.genuine[0].split("."))) | st.builds(object))
    return st.tuples(st.just("not a str"), values)


@dataclass(frozen=True)
class Case:
    kind: str
    token: Any

    def __repr__(self) -> str:
        shown = repr(self.token)
        if len(shown) > 300:
            shown = f"{shown[:300]}... ({len(shown)} characters)"
        return f"Case({self.kind!r}, {shown})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """How hypothesis prints a failing example: this repr, not a megabyte (it would warn,
        and the warning, an error here, would hide the failure)."""
        printer.text(repr(self))


def hostile_tokens(kit: Kit) -> st.SearchStrategy[Case]:
    claims, fields = mutated_claims(kit), header_fields(kit)
    headers = st.just(kit.header) | fields | json_values
    classes = st.one_of(
        random_text(), random_segments(), forged(kit, headers, claims | json_values),
        resigned(kit, claims), odd_header(kit, fields), alg_confusion(kit, claims),
        mutated_genuine(kit), non_utf8(kit), huge(kit), non_str(kit))
    return classes.map(lambda drawn: Case(*drawn))


# --- driving the verifier ---------------------------------------------------------------------


def attempt(verifier: Verifier, entry: str, token: Any, n: int) -> BillingError | None:
    """Run one call; the refusal, or None when the token was good enough to pass."""
    args = {"q": f"fuzz {n}"}
    try:
        if entry == "preflight":
            verifier.preflight(token, "search", args=args)
        elif entry == "begin":
            hold = verifier.begin(token, "search", args=args)
            if isinstance(hold, Hold):
                verifier.void(hold)
        else:
            verifier.charge(token, "search", args=args, idempotency_key=f"fuzz-{n}")
    except BillingError as refused:
        return refused
    return None


def refusal_events(engine: Engine) -> int:
    with reading(engine) as conn:
        found = conn.execute(select(func.count()).select_from(events)
                             .where(events.c.kind == "refusal")).scalar_one()
    return int(found)


def refusals_counted(engine: Engine) -> int:
    with reading(engine) as conn:
        found = conn.execute(select(func.coalesce(func.sum(refusal_counts.c.count), 0)))
        return int(found.scalar_one())


def refusals_recorded(verifier: Verifier, engine: Engine) -> int:
    """Refusal events plus refusals counted, once the verifier has written its counts."""
    verifier.seal()
    return refusal_events(engine) + refusals_counted(engine)


def is_counted(refused: BillingError) -> bool:
    """Whether ``refused`` is one of the refusals counted rather than written as an event:
    every refusal before a token was verified (garbage, forged, expired, misdirected). A
    token validly signed but unknown to the ledger was verified first: an event."""
    return refused.code == "INVALID_CREDIT_TOKEN" and (
        refused.details.get("reason") != "unknown_token")


def assert_last_refusal_is(verifier: Verifier, engine: Engine, refused: BillingError,
                           token: Any) -> None:
    """Where ``refused`` must be: the last refusal event, or a count of its code and reason
    (whose sample is a token hash, never a token)."""
    verifier.seal()
    with reading(engine) as conn:
        if is_counted(refused):
            row = conn.execute(select(refusal_counts).where(
                refusal_counts.c.code == refused.code,
                refusal_counts.c.reason == refused.details["reason"])).mappings().one()
            assert row["count"] >= 1 and row["source"] == ""
            assert row["sample"] is None or len(row["sample"]) == 64
            if isinstance(token, str) and len(token) >= 16:
                assert token not in " ".join(str(value) for value in row.values())
            return
        row = conn.execute(select(events).where(events.c.kind == "refusal")
                           .order_by(events.c.id.desc()).limit(1)).mappings().one()
    assert (row["code"], row["tool"]) == (refused.code, "search")
    if row["jti"] is None and token:  # not parsed: the trail keeps a hash, never the token
        assert row["token_hash"] == token_fingerprint(token)


def kit_of(ring: KeyRing, genuine: tuple[str, ...]) -> Kit:
    info, key = ring.signing_key()
    return Kit(kid=info.kid, sign=key.sign, public_forms=public_forms(ring), genuine=genuine,
               claims=jwt_parts(genuine[0])[1])


@pytest.fixture
def kit(funded: Engine, ring: KeyRing, clock: FakeClock,
        new_token: Callable[..., IssuedToken]) -> Kit:
    """Real tokens on the ledger: valid, of a narrow scope, a child, expired."""
    wide = new_token(limit=30 * USDC, scope=["*"])
    narrow = new_token(limit=USDC, scope=["status"])
    child = new_token(limit=USDC, parent=wide.claims.jti, agent="sub-agent")
    expired = mint(funded, ring, now=clock() - timedelta(hours=2), ttl=3600)
    return kit_of(ring, (wide.token, narrow.token, child.token, expired.token))


@pytest.fixture
def offline_kit(ring: KeyRing, clock: FakeClock) -> Kit:
    """The same kinds of real tokens, signed without a ledger."""
    info, key = ring.signing_key()
    now = clock()
    claims = Claims(jti=new_jti(), tenant="acme", agent="agent-1", scope=("*",),
                    audience="mcpbill", issuer="mcpbill", issued_at=now, not_before=now,
                    expires_at=now + timedelta(hours=1), limit=USDC, kid=info.kid)
    variants = [claims, replace(claims, scope=("status",)), replace(claims, parent=new_jti()),
                replace(claims, issued_at=now - timedelta(hours=2),
                        not_before=now - timedelta(hours=2), expires_at=now - timedelta(hours=1))]
    return kit_of(ring, tuple(encode_token(c, info.alg, key) for c in variants))


@pytest.fixture
def undurable(db_url: str, funded: Engine, keys: KeySource, pricing: PricingTable,
              clock: FakeClock) -> Iterator[Verifier]:
    """The ``verifier`` fixture's twin on the same ledger, whose commits do not wait for the
    disk: the fuzz is about what leaves the verifier and what the trail records, not fsync."""
    verifier = Verifier(keys=keys, pricing=pricing, engine=make_engine(db_url, durable=False),
                        hold_timeout=300, clock=clock)
    yield verifier
    verifier.close()


def backend_of(engine: Engine) -> str:
    return "sqlite" if engine.dialect.name == "sqlite" else "postgres"


@pytest.mark.slow
def test_only_billing_errors_leave_the_verifier(undurable: Verifier, funded: Engine,
                                                kit: Kit) -> None:
    counted = {"tokens": 0, "refusals": refusals_recorded(undurable, funded), "events": 0}
    tokens = TOKENS[backend_of(funded)]

    @settings(max_examples=tokens // BATCH, deadline=None, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.large_base_example])
    @given(st.lists(st.tuples(hostile_tokens(kit), st.sampled_from(ENTRIES)), min_size=BATCH,
                    max_size=BATCH))
    def run(batch: list[tuple[Case, str]]) -> None:
        for case, entry in batch:
            n = counted["tokens"] = counted["tokens"] + 1
            refused = attempt(undurable, entry, case.token, n)  # anything else fails the test
            if refused is not None:
                counted["refusals"] += 1
                counted["events"] += not is_counted(refused)
                if n % AUDIT_EVERY == 0:
                    assert refusals_recorded(undurable, funded) == counted["refusals"]
                    assert refusal_events(funded) == counted["events"]
                    assert_last_refusal_is(undurable, funded, refused, case.token)

    run()
    assert counted["tokens"] >= tokens
    assert refusals_recorded(undurable, funded) == counted["refusals"]
    assert refusal_events(funded) == counted["events"]
    assert 0 < counted["events"] < counted["refusals"]  # both kinds were made


@pytest.mark.slow
def test_decode_token_is_total(offline_kit: Kit, ring: KeyRing, clock: FakeClock) -> None:
    """Straight to tokens.py, as the CLI calls it too (``token inspect``, ``revoke``): the
    claims or InvalidCreditToken with a documented reason, for any value, even a non-str the
    verifier now refuses before decoding."""
    keys = ring.verification_keys()
    counted = {"tokens": 0}

    def decodings(token: Any) -> list[Callable[[], object]]:
        return [lambda: peek_header(token),
                lambda: decode_token(token, keys, audience="mcpbill", issuer="mcpbill",
                                     now=clock()),
                lambda: decode_token(token, keys, audience=None, issuer=None, verify_exp=False)]

    @settings(max_examples=DIRECT_TOKENS // BATCH, deadline=None, database=None,
              print_blob=True, suppress_health_check=[
                  HealthCheck.too_slow, HealthCheck.data_too_large,
                  HealthCheck.large_base_example])
    @given(st.lists(hostile_tokens(offline_kit), min_size=BATCH, max_size=BATCH))
    def run(batch: list[Case]) -> None:
        for case in batch:
            counted["tokens"] += 1
            assert len(token_fingerprint(case.token)) == 64
            for decoding in decodings(case.token):
                try:
                    decoding()
                except InvalidCreditToken as refused:  # anything else fails the test
                    assert refused.reason in DECODE_REASONS

    run()
    assert counted["tokens"] >= DIRECT_TOKENS


# --- regressions ------------------------------------------------------------------------------


def test_token_header_of_3000_nested_brackets_is_a_refusal(verifier: Verifier,
                                                           funded: Engine) -> None:
    """It raised RecursionError out of the verifier: unaudited, and missed by servers that
    catch BillingError. Now each is a refusal, counted with the token's hash as sample."""
    token = segment("[" * 3000) + ".e30."
    assert len(token) <= MAX_TOKEN_BYTES
    for n, entry in enumerate(ENTRIES):
        refused = attempt(verifier, entry, token, n)
        assert isinstance(refused, InvalidCreditToken), entry
        assert refused.reason == "malformed"
    verifier.seal()
    with reading(funded) as conn:
        rows = conn.execute(select(refusal_counts.c.code, refusal_counts.c.reason,
                                   refusal_counts.c.count, refusal_counts.c.sample)).all()
    digest = hashlib.sha256(token.encode()).hexdigest()
    assert [tuple(row) for row in rows] == [("INVALID_CREDIT_TOKEN", "malformed", len(ENTRIES),
                                             digest)]
    assert refusal_events(funded) == 0


# --- hostile arguments on a good token ---------------------------------------------------------

ARGUMENT_CALLS = 2_000  # per backend
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**40), 10**40) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=5) | st.integers() | st.none(), inner, max_size=4),
    max_leaves=12)
ODD_VALUE = (st.none() | st.integers(-(10**30), 10**30) | st.floats() | st.booleans()
             | st.text(max_size=300) | st.binary(max_size=10) | st.just("") | st.just("a\x00b")
             | st.just("\ud800") | st.just("x" * 201) | st.just("search"))
DEEP = st.integers(100, 5_000).map(lambda depth: _deep_list(depth))


def _deep_list(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


@st.composite
def hostile_call(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    entry = draw(st.sampled_from(("preflight", "begin", "hold", "charge")))
    call: dict[str, Any] = {"tool": draw(ODD_VALUE | st.sampled_from(("search", "summarize"))),
                            "args": draw(JSONISH | DEEP | ODD_VALUE)}
    if entry in ("hold", "charge"):
        call["idempotency_key"] = draw(ODD_VALUE)
    if entry != "begin":
        call["units" if entry in ("preflight", "charge") else "max_units"] = draw(ODD_VALUE)
    return entry, call


@pytest.mark.slow
def test_only_billing_errors_leave_the_verifier_whatever_the_arguments(
        undurable: Verifier, funded: Engine, new_token: Callable[..., IssuedToken]) -> None:
    """Tool names, arguments, keys and units of every odd kind, on a token that is fine: a
    call is made or refused, and every refusal is audited."""
    token = new_token(limit=90 * USDC, scope=["*"]).token
    counted = {"refusals": refusals_recorded(undurable, funded), "calls": 0, "made": 0}

    @settings(max_examples=ARGUMENT_CALLS, deadline=None, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(hostile_call())
    def run(call: tuple[str, dict[str, Any]]) -> None:
        entry, options = call
        tool = options.pop("tool")
        counted["calls"] += 1
        try:
            made = getattr(undurable, entry)(token, tool, **options)
        except BillingError:
            counted["refusals"] += 1
            return
        counted["made"] += 1
        if isinstance(made, Hold) and made.replayed is None:
            undurable.void(made)

    run()
    assert counted["calls"] >= ARGUMENT_CALLS and counted["made"] > 0
    assert refusals_recorded(undurable, funded) == counted["refusals"]

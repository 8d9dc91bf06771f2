"""Credit tokens: signed, short-lived, scoped JWTs whose spend limit is allotted in the ledger.

The claims are read-only facts; what a token has left lives in its ledger account only.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt

from mcpbill_cli.budgets import TokenTerms
from mcpbill_cli.errors import InvalidCreditToken, InvalidInput
from mcpbill_cli.keys import VerificationKey
from mcpbill_cli.money import format_usd, parse_usd
from mcpbill_cli.names import require_name
from mcpbill_cli.ratelimits import CLAIM as RATES_CLAIM
from mcpbill_cli.ratelimits import Rate, rates_claim, rates_from_claim
from mcpbill_cli.scope import pattern_problem

# A credit token is a few hundred bytes; anything this large is refused before parsing.
MAX_TOKEN_BYTES = 8192
# A header is one flat object; a few nested ones (a jwk, a crit list) is already unusual.
MAX_HEADER_NESTING = 8
# The audience a verifier accepts: one name, any of several, or None (not checked).
Audience = str | Sequence[str] | None
REQUIRED_CLAIMS = ["iss", "aud", "sub", "jti", "iat", "nbf", "exp", "tenant", "scope",
                   "spendLimitUsd"]


@dataclass(frozen=True)
class Claims:
    jti: str
    tenant: str
    agent: str
    scope: tuple[str, ...]
    audience: str
    issuer: str
    issued_at: datetime
    not_before: datetime
    expires_at: datetime
    limit: int
    kid: str
    parent: str | None = None
    rates: tuple[Rate, ...] = ()  # the token's own rate limits (``rateLimits``)
    terms: TokenTerms = TokenTerms()  # its own caps and auto top-up (claim ``budget``)

    def to_jwt_payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "iss": self.issuer, "aud": self.audience, "sub": self.agent, "jti": self.jti,
            "iat": int(self.issued_at.timestamp()), "nbf": int(self.not_before.timestamp()),
            "exp": int(self.expires_at.timestamp()), "agentId": self.agent,
            "tenant": self.tenant, "scope": list(self.scope),
            "spendLimitUsd": format_usd(self.limit),
        }
        if self.parent:
            payload["parent"] = self.parent
        if self.rates:
            payload[RATES_CLAIM] = rates_claim(self.rates)
        budget = self.terms.to_claim()
        if budget is not None:
            payload["budget"] = budget
        return payload


def new_jti() -> str:
    return f"tok_{secrets.token_hex(12)}"


def encode_token(claims: Claims, alg: str, private_key: Any) -> str:
    """The signed JWT of ``claims``; INVALID_INPUT for an audience or issuer that is not a
    name (blank, outer spaces, control characters): no token is signed with one."""
    require_name(claims.audience, "audience")
    require_name(claims.issuer, "issuer")
    headers = {"kid": claims.kid, "typ": "JWT"}
    return jwt.encode(claims.to_jwt_payload(), private_key, algorithm=alg, headers=headers)


def peek_header(token: str) -> dict[str, Any]:
    """The token's JOSE header, parsed without trusting it (cheaper than PyJWT's own).

    Total: for any value at all, the header or InvalidCreditToken ``malformed``.
    """
    if not isinstance(token, str):  # a server may hand over whatever its transport gave it
        raise InvalidCreditToken("a credit token is a string (a JWT)", reason="malformed")
    if len(token) > MAX_TOKEN_BYTES:
        raise InvalidCreditToken(f"token is longer than {MAX_TOKEN_BYTES} bytes",
                                 reason="malformed")
    # base64url and dots only; isascii() is O(1) in CPython, and it spares PyJWT a str that
    # cannot even be encoded (a lone surrogate raises UnicodeEncodeError inside it).
    if not token.isascii():
        raise _not_a_jwt()
    head, dot, _ = token.partition(".")
    try:
        raw = base64.urlsafe_b64decode(head + "=" * (-len(head) % 4))
        if raw.count(b"[") + raw.count(b"{") > MAX_HEADER_NESTING:
            raise _not_a_jwt()  # before json.loads, whose recursion follows the nesting
        header = json.loads(raw)
    except (ValueError, RecursionError):  # binascii.Error and UnicodeDecodeError included
        raise _not_a_jwt() from None
    if not dot or not isinstance(header, dict):
        raise _not_a_jwt()
    return header


def peek_audience(token: str) -> Any:
    """The token's ``aud`` claim, read without verifying anything (``None``: not a JWT, or no
    claim). For a check that must come before verification; the verifier checks the rest."""
    parts = token.split(".") if isinstance(token, str) and len(token) <= MAX_TOKEN_BYTES else []
    if len(parts) != 3 or not token.isascii():
        return None
    body = parts[1]
    try:
        payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (ValueError, RecursionError):
        return None
    return payload.get("aud") if isinstance(payload, dict) else None


def _not_a_jwt() -> InvalidCreditToken:
    return InvalidCreditToken("token is not a JWT", reason="malformed")


def decode_token(
    token: str, keys: dict[str, VerificationKey], *, audience: Audience, issuer: str | None,
    leeway: int = 30, verify_exp: bool = True, now: datetime | None = None,
) -> Claims:
    """Verify signature, algorithm, kid, time and audience; the claims or InvalidCreditToken.

    The algorithm is pinned by the key the ``kid`` names, never taken from the token; a key
    the header carries (``jwk``, ``jku``, ``x5c``...) is never used. Total: any other value
    than a valid token's is InvalidCreditToken, never another exception.
    """
    header = peek_header(token)
    kid = header.get("kid")
    key = keys.get(kid) if isinstance(kid, str) else None
    if key is None:
        raise InvalidCreditToken("token is signed by a key this server does not know",
                                 reason="unknown_key")
    alg = header.get("alg")
    if alg != key.alg:
        named = repr(alg[:40]) if isinstance(alg, str) else f"of type {type(alg).__name__}"
        raise InvalidCreditToken(f"algorithm {named} is not allowed for this key",
                                 reason="algorithm_not_allowed")
    if header.get("b64", True) is not True:  # RFC 7797 unencoded payload: never a credit token
        raise InvalidCreditToken("token payload is not base64url-encoded", reason="malformed")
    payload = _verified_payload(token, key, audience=audience, issuer=issuer, leeway=leeway,
                                verify_exp=verify_exp, now=now)
    return _claims(payload, kid=key.kid)


_REASONS: list[tuple[type[Exception], str, str]] = [
    (jwt.ExpiredSignatureError, "expired", "token has expired"),
    (jwt.ImmatureSignatureError, "not_yet_valid", "token is not valid yet"),
    (jwt.InvalidAudienceError, "wrong_audience", "token is for another audience"),
    (jwt.InvalidIssuerError, "wrong_issuer", "token is from another issuer"),
    (jwt.InvalidSignatureError, "bad_signature", "token signature does not verify"),
    (jwt.InvalidAlgorithmError, "algorithm_not_allowed", "token algorithm is not allowed"),
    (jwt.MissingRequiredClaimError, "malformed", "token lacks a required claim"),
]


def _verified_payload(token: str, key: VerificationKey, *, audience: Audience,
                      issuer: str | None, leeway: int, verify_exp: bool,
                      now: datetime | None) -> dict[str, Any]:
    options: Any = {"require": REQUIRED_CLAIMS, "verify_exp": verify_exp,
                    "verify_aud": audience is not None, "verify_iss": issuer is not None}
    try:
        if now is not None:
            return _decode_at(token, key, audience, issuer, leeway, options, now)
        payload: dict[str, Any] = jwt.decode(token, key.key, algorithms=[key.alg],
                                             audience=audience, issuer=issuer, leeway=leeway,
                                             options=options)
        return payload
    except jwt.PyJWTError as exc:
        for kind, reason, message in _REASONS:
            if isinstance(exc, kind):
                raise InvalidCreditToken(message, reason=reason) from None
        raise InvalidCreditToken("token is not a valid JWT", reason="malformed") from None
    except (ValueError, TypeError, OverflowError, RecursionError):  # PyJWT 2.x maps these
        # to DecodeError itself; this holds the line should a release let one through.
        raise InvalidCreditToken("token is not a valid JWT", reason="malformed") from None


def _decode_at(token: str, key: VerificationKey, audience: Audience, issuer: str | None,
               leeway: int, options: Any, now: datetime) -> dict[str, Any]:
    """Decode as of ``now`` (tests and reconcile): verify the signature, then check time here."""
    untimed: Any = {**options, "verify_exp": False, "verify_nbf": False, "verify_iat": False}
    payload: dict[str, Any] = jwt.decode(
        token, key.key, algorithms=[key.alg], audience=audience, issuer=issuer, options=untimed)
    stamp = now.timestamp()
    if options["verify_exp"] and _seconds(payload, "exp") <= stamp - leeway:
        raise jwt.ExpiredSignatureError()
    if _seconds(payload, "nbf") > stamp + leeway:
        raise jwt.ImmatureSignatureError()
    return payload


# What datetime can hold: 0001-01-01 to 9999-12-31, in seconds since the epoch.
_FIRST_SECOND, _LAST_SECOND = -62135596800, 253402300799


def _seconds(payload: dict[str, Any], name: str) -> int:
    """A time claim: whole seconds (no float, bool or string) that datetime can hold."""
    value = payload[name]
    if type(value) is not int or not _FIRST_SECOND <= value <= _LAST_SECOND:
        raise InvalidCreditToken(f"token claim {name!r} is not a time in whole seconds",
                                 reason="malformed")
    return value


def _claims(payload: dict[str, Any], *, kid: str) -> Claims:
    try:
        return Claims(
            jti=_text(payload, "jti"), tenant=_text(payload, "tenant"),
            agent=_text(payload, "sub"), scope=_scope(payload["scope"]),
            audience=_text(payload, "aud"), issuer=_text(payload, "iss"),
            issued_at=datetime.fromtimestamp(_seconds(payload, "iat"), UTC),
            not_before=datetime.fromtimestamp(_seconds(payload, "nbf"), UTC),
            expires_at=datetime.fromtimestamp(_seconds(payload, "exp"), UTC),
            limit=parse_usd(_text(payload, "spendLimitUsd")), kid=kid,
            parent=None if payload.get("parent") is None else _text(payload, "parent"),
            rates=rates_from_claim(payload[RATES_CLAIM]) if RATES_CLAIM in payload else (),
            terms=TokenTerms.from_claim(payload.get("budget")),
        )
    except (KeyError, TypeError, ValueError, InvalidInput):
        raise InvalidCreditToken("token claims are malformed", reason="malformed") from None


# The longest the ledger keeps of each (ledger/models.py): a longer one was never issued here.
_MAX_LENGTH = {"jti": 64, "parent": 64, "tenant": 100}
_MAX_TEXT = 200


def _text(payload: dict[str, Any], name: str) -> str:
    """A text claim the ledger can store: printable (no NUL, control character or lone
    surrogate from a JSON escape), not empty, not longer than its column."""
    value = payload[name]
    if not isinstance(value, str) or not value.isprintable() or not (
            0 < len(value) <= _MAX_LENGTH.get(name, _MAX_TEXT)):
        raise ValueError(f"claim {name!r} is not printable text of the right length")
    return value


def _scope(value: Any) -> tuple[str, ...]:
    """The scope's patterns, each one ``mcpbill token issue`` could have written."""
    if not isinstance(value, list) or not all(
            isinstance(pattern, str) and pattern_problem(pattern) is None for pattern in value):
        raise ValueError("scope is not a list of tool patterns")
    return tuple(value)


# --- scope ---------------------------------------------------------------------------------------


def validate_scope(scope: list[str]) -> list[str]:
    """The scope as given (``["*"]`` when empty), or INVALID_INPUT naming the bad pattern."""
    for pattern in scope:
        problem = pattern_problem(pattern)
        if problem:
            raise InvalidInput(f"scope {problem}", field="scope")
    return scope or ["*"]


def expires(now: datetime, ttl: int) -> datetime:
    return (now + timedelta(seconds=ttl)).replace(microsecond=0)

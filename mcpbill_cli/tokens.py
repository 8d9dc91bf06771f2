"""Credit tokens: signed, short-lived, scoped JWTs whose spend limit is allotted in the ledger.

The claims are read-only facts; what a token has left lives in its ledger account only.
"""

from __future__ import annotations

import base64
import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt

from mcpbill_cli.errors import InvalidCreditToken, InvalidInput
from mcpbill_cli.keys import VerificationKey
from mcpbill_cli.money import format_usd, parse_usd
from mcpbill_cli.scope import pattern_problem

# A credit token is a few hundred bytes; anything this large is refused before parsing.
MAX_TOKEN_BYTES = 8192
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
        return payload


def new_jti() -> str:
    return f"tok_{secrets.token_hex(12)}"


def encode_token(claims: Claims, alg: str, private_key: Any) -> str:
    headers = {"kid": claims.kid, "typ": "JWT"}
    return jwt.encode(claims.to_jwt_payload(), private_key, algorithm=alg, headers=headers)


def peek_header(token: str) -> dict[str, Any]:
    """The token's JOSE header, parsed without trusting it (cheaper than PyJWT's own)."""
    if len(token) > MAX_TOKEN_BYTES:
        raise InvalidCreditToken(f"token is longer than {MAX_TOKEN_BYTES} bytes",
                                 reason="malformed")
    head, dot, _ = token.partition(".")
    try:
        header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, UnicodeDecodeError):
        raise InvalidCreditToken("token is not a JWT", reason="malformed") from None
    if not dot or not isinstance(header, dict):
        raise InvalidCreditToken("token is not a JWT", reason="malformed")
    return header


def decode_token(
    token: str, keys: dict[str, VerificationKey], *, audience: str | None, issuer: str | None,
    leeway: int = 30, verify_exp: bool = True, now: datetime | None = None,
) -> Claims:
    """Verify signature, algorithm, kid, time and audience; the claims or InvalidCreditToken.

    The algorithm is pinned by the key the ``kid`` names, never taken from the token.
    """
    header = peek_header(token)
    kid = header.get("kid")
    key = keys.get(kid) if isinstance(kid, str) else None
    if key is None:
        raise InvalidCreditToken("token is signed by a key this server does not know",
                                 reason="unknown_key")
    if header.get("alg") != key.alg:
        raise InvalidCreditToken(f"algorithm {header.get('alg')!r} is not allowed for this key",
                                 reason="algorithm_not_allowed")
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


def _verified_payload(token: str, key: VerificationKey, *, audience: str | None,
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


def _decode_at(token: str, key: VerificationKey, audience: str | None, issuer: str | None,
               leeway: int, options: Any, now: datetime) -> dict[str, Any]:
    """Decode as of ``now`` (tests and reconcile): verify the signature, then check time here."""
    untimed: Any = {**options, "verify_exp": False, "verify_nbf": False, "verify_iat": False}
    payload: dict[str, Any] = jwt.decode(
        token, key.key, algorithms=[key.alg], audience=audience, issuer=issuer, options=untimed)
    stamp = now.timestamp()
    if options["verify_exp"] and payload["exp"] <= stamp - leeway:
        raise jwt.ExpiredSignatureError()
    if payload["nbf"] > stamp + leeway:
        raise jwt.ImmatureSignatureError()
    return payload


def _claims(payload: dict[str, Any], *, kid: str) -> Claims:
    try:
        scope = payload["scope"]
        if not isinstance(scope, list) or not all(isinstance(s, str) for s in scope):
            raise ValueError("scope")
        return Claims(
            jti=str(payload["jti"]), tenant=str(payload["tenant"]), agent=str(payload["sub"]),
            scope=tuple(scope), audience=str(payload["aud"]), issuer=str(payload["iss"]),
            issued_at=datetime.fromtimestamp(payload["iat"], UTC),
            not_before=datetime.fromtimestamp(payload["nbf"], UTC),
            expires_at=datetime.fromtimestamp(payload["exp"], UTC),
            limit=parse_usd(str(payload["spendLimitUsd"])), kid=kid,
            parent=payload.get("parent"),
        )
    except (KeyError, TypeError, ValueError, InvalidInput):
        raise InvalidCreditToken("token claims are malformed", reason="malformed") from None


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

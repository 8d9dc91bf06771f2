"""Signed receipts: a JWS over x402-style settlement fields, verifiable offline with the JWKS."""

from __future__ import annotations

import base64
import functools
import json
import warnings
from dataclasses import dataclass, field
from typing import Any

import jwt
from jwt.algorithms import Algorithm, get_default_algorithms

from mcpbill_cli.errors import BillingError
from mcpbill_cli.keys import VerificationKey
from mcpbill_cli.money import parse_usd

RECEIPT_TYPE = "mcpbill-receipt+jwt"
REFUND_TYPE = "mcpbill-refund+jwt"
RECEIPT_FIELDS = ("success", "transaction", "network", "payer", "amount", "receiptId", "tool",
                  "amountUsd", "asset", "jti", "idempotencyKey", "remainingUsd",
                  "pricingVersion", "timestamp")
REFUND_FIELDS = ("success", "kind", "refundId", "receiptId", "transaction", "network", "payer",
                 "amount", "amountUsd", "asset", "chargedUsd", "refundedUsd", "refundableUsd",
                 "creditedTo", "reason", "jti", "tenant", "tool", "idempotencyKey", "timestamp")


class InvalidReceipt(BillingError):
    code = "INVALID_RECEIPT"


@dataclass(frozen=True)
class Receipt:
    """A signed receipt. ``jws`` is what to hand out; ``claims`` are the signed fields."""

    jws: str = field(repr=False)
    claims: dict[str, Any]

    @property
    def receipt_id(self) -> str:
        return str(self.claims["receiptId"])

    @property
    def amount(self) -> int:
        """Micro-USDC charged."""
        return int(self.claims["amount"])

    @property
    def remaining(self) -> int:
        return parse_usd(self.claims["remainingUsd"], allow_zero=True)

    def to_dict(self) -> dict[str, Any]:
        """The signed fields plus the JWS itself (``_meta["dev.mcpbill/receipt"]``)."""
        return {**self.claims, "jws": self.jws}


@dataclass(frozen=True)
class RefundReceipt:
    """A signed refund receipt: ``jws`` to hand out, ``claims`` its signed fields.
    ``replayed``: an idempotency key's earlier refund, returned again (nothing moved)."""

    jws: str = field(repr=False)
    claims: dict[str, Any]
    replayed: bool = False

    @property
    def refund_id(self) -> str:
        return str(self.claims["refundId"])

    @property
    def receipt_id(self) -> str:
        """The refunded call's receipt id."""
        return str(self.claims["receiptId"])

    @property
    def amount(self) -> int:
        """Micro-USDC refunded by this refund."""
        return int(self.claims["amount"])

    @property
    def refundable(self) -> int:
        """Micro-USDC of the charge still refundable after this refund."""
        return parse_usd(self.claims["refundableUsd"], allow_zero=True)

    def to_dict(self) -> dict[str, Any]:
        return {**self.claims, "jws": self.jws}


def sign_receipt(claims: dict[str, Any], *, kid: str, alg: str, key: Any) -> Receipt:
    return Receipt(compact_jws(claims, kid=kid, alg=alg, typ=RECEIPT_TYPE, key=key), claims)


def sign_refund_receipt(claims: dict[str, Any], *, kid: str, alg: str, key: Any
                        ) -> RefundReceipt:
    return RefundReceipt(compact_jws(claims, kid=kid, alg=alg, typ=REFUND_TYPE, key=key),
                         claims)


def compact_jws(claims: dict[str, Any], *, kid: str, alg: str, typ: str, key: Any) -> str:
    """The compact JWS ``jwt.encode(claims, key, algorithm=alg, headers={"kid": kid, "typ":
    typ})`` writes, byte for byte, without its per-call work.

    Every paid call signs a receipt. ``jwt.encode`` checks and merges the headers, copies the
    claims, looks the algorithm up and JSON-encodes the same header again on each call: about
    as long as the Ed25519 signature itself (measured with ``bench/mcp_overhead.py``'s
    profile). Here the header is encoded once per key and the algorithm object is reused; the
    claims are encoded as PyJWT encodes them (compact separators, keys in the given order).
    """
    algorithm = _algorithm(alg)
    signing_input = (_header(alg, kid, typ) + b"."
                     + _b64(_COMPACT.encode(claims).encode()))
    prepared, short = _prepared(algorithm, key)
    if short:  # as jwt.encode does (its default is to warn)
        warnings.warn(short, jwt.InsecureKeyLengthWarning, stacklevel=3)
    return (signing_input + b"." + _b64(algorithm.sign(signing_input, prepared))).decode()


# The last key signed with, as (algorithm, key, prepared key, key length warning): a process
# signs with one key until it rotates, and preparing it again (type checks, PyJWT's key length
# check) took a few microseconds of every receipt. One tuple, so a thread reads a whole entry.
_LAST_KEY: tuple[Algorithm | None, Any, Any, str | None] = (None, None, None, None)


def _prepared(algorithm: Algorithm, key: Any) -> tuple[Any, str | None]:
    """``algorithm.prepare_key(key)`` and its ``check_key_length``, remembered for the last
    key (by identity: key objects are not compared)."""
    global _LAST_KEY
    last = _LAST_KEY
    if last[0] is algorithm and last[1] is key:
        return last[2], last[3]
    prepared = algorithm.prepare_key(key)
    short = algorithm.check_key_length(prepared)
    _LAST_KEY = (algorithm, key, prepared, short)
    return prepared, short


# What PyJWT encodes claims with (json.dumps(claims, separators=(",", ":"))), made once.
_COMPACT = json.JSONEncoder(separators=(",", ":"))


@functools.cache
def _algorithm(alg: str) -> Algorithm:
    algorithms = get_default_algorithms()
    if alg not in algorithms:
        raise NotImplementedError(f"algorithm {alg!r} is not supported")
    return algorithms[alg]


@functools.cache
def _header(alg: str, kid: str, typ: str) -> bytes:
    """The header segment as PyJWT writes it: keys sorted, compact separators."""
    return _b64(json.dumps({"alg": alg, "kid": kid, "typ": typ}, separators=(",", ":"),
                           sort_keys=True).encode())


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def read_refund_receipt(jws: str, *, replayed: bool = False) -> RefundReceipt:
    """A refund receipt from this ledger's own store, read without checking it again."""
    return RefundReceipt(jws, jwt.decode(jws, options={"verify_signature": False}), replayed)


def receipt_type(jws: str) -> str | None:
    """The ``typ`` of a receipt's header (a call's or a refund's), None if it has none."""
    try:
        typ = jwt.get_unverified_header(jws).get("typ")
    except jwt.PyJWTError:
        raise InvalidReceipt("not a receipt: the JWS cannot be parsed") from None
    return typ if isinstance(typ, str) else None


def read_receipt(jws: str) -> Receipt:
    """A receipt from this ledger's own store, read without checking the signature again."""
    return Receipt(jws, jwt.decode(jws, options={"verify_signature": False}))


def verify_receipt(jws: str, keys: dict[str, VerificationKey]) -> Receipt:
    """Check a call's receipt against ``keys`` (e.g. from a JWKS); the receipt or an error.
    A refund receipt is not a call's receipt (:func:`verify_refund_receipt`)."""
    if receipt_type(jws) == REFUND_TYPE:
        raise InvalidReceipt("this is a refund receipt, not a call's receipt")
    return Receipt(jws, _verified_claims(jws, keys, RECEIPT_FIELDS))


def verify_refund_receipt(jws: str, keys: dict[str, VerificationKey]) -> RefundReceipt:
    """Check a refund receipt against ``keys``; the refund receipt or an error."""
    if receipt_type(jws) != REFUND_TYPE:
        raise InvalidReceipt(f"not a refund receipt (its typ is not {REFUND_TYPE})")
    return RefundReceipt(jws, _verified_claims(jws, keys, REFUND_FIELDS))


def _verified_claims(jws: str, keys: dict[str, VerificationKey],
                     fields: tuple[str, ...]) -> dict[str, Any]:
    try:
        header = jwt.get_unverified_header(jws)
    except jwt.PyJWTError:
        raise InvalidReceipt("not a receipt: the JWS cannot be parsed") from None
    key = keys.get(header.get("kid", ""))
    if key is None or header.get("alg") != key.alg:
        raise InvalidReceipt("receipt is signed by a key these keys do not include")
    try:
        claims = jwt.decode(jws, key.key, algorithms=[key.alg],
                            options={"verify_aud": False, "verify_exp": False})
    except jwt.PyJWTError:
        raise InvalidReceipt("receipt signature does not verify") from None
    missing = [f for f in fields if f not in claims]
    if missing:
        raise InvalidReceipt(f"receipt lacks {', '.join(missing)}")
    return dict(claims)

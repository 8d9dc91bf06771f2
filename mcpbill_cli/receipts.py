"""Signed receipts: a JWS over x402-style settlement fields, verifiable offline with the JWKS."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jwt

from mcpbill_cli.errors import BillingError
from mcpbill_cli.keys import VerificationKey
from mcpbill_cli.money import parse_usd

RECEIPT_TYPE = "mcpbill-receipt+jwt"
RECEIPT_FIELDS = ("success", "transaction", "network", "payer", "amount", "receiptId", "tool",
                  "amountUsd", "asset", "jti", "idempotencyKey", "remainingUsd",
                  "pricingVersion", "timestamp")


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


def sign_receipt(claims: dict[str, Any], *, kid: str, alg: str, key: Any) -> Receipt:
    jws = jwt.encode(claims, key, algorithm=alg, headers={"kid": kid, "typ": RECEIPT_TYPE})
    return Receipt(jws, claims)


def read_receipt(jws: str) -> Receipt:
    """A receipt from this ledger's own store, read without checking the signature again."""
    return Receipt(jws, jwt.decode(jws, options={"verify_signature": False}))


def verify_receipt(jws: str, keys: dict[str, VerificationKey]) -> Receipt:
    """Check a receipt's signature against ``keys`` (e.g. from a JWKS); the receipt or an error."""
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
    missing = [f for f in RECEIPT_FIELDS if f not in claims]
    if missing:
        raise InvalidReceipt(f"receipt lacks {', '.join(missing)}")
    return Receipt(jws, claims)

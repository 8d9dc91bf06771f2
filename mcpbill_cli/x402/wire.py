"""x402 on the wire: reading a 402 challenge, writing a payment header, reading a settlement.

- v2: the challenge is the ``PAYMENT-REQUIRED`` header (base64 JSON ``PaymentRequired``); the
  payment goes in ``PAYMENT-SIGNATURE``; the settlement comes back in ``PAYMENT-RESPONSE``.
- v1: the challenge is the JSON body (``{"x402Version": 1, "accepts": [...]}``, amounts in
  ``maxAmountRequired``, legacy network names); ``X-PAYMENT`` and ``X-PAYMENT-RESPONSE``.

Networks are normalized to CAIP-2 (v1 names through :data:`V1_NETWORKS`); an option that cannot
be read (another chain family, a missing field) is kept as an :class:`Offer` with a ``problem``,
so a decision can say why it was passed over. Nothing here signs or moves money.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mcpbill_cli.x402.errors import X402BadChallenge

PAYMENT_REQUIRED = "PAYMENT-REQUIRED"
PAYMENT_SIGNATURE = "PAYMENT-SIGNATURE"
PAYMENT_RESPONSE = "PAYMENT-RESPONSE"
X_PAYMENT = "X-PAYMENT"
X_PAYMENT_RESPONSE = "X-PAYMENT-RESPONSE"

# x402 v1 names the networks; v2 uses CAIP-2. Only EVM chains with an EIP-3009 USDC are listed.
V1_NETWORKS: dict[str, str] = {
    "base": "eip155:8453",
    "base-sepolia": "eip155:84532",
    "ethereum": "eip155:1",
    "sepolia": "eip155:11155111",
    "avalanche": "eip155:43114",
    "avalanche-fuji": "eip155:43113",
    "polygon": "eip155:137",
    "polygon-amoy": "eip155:80002",
}

MAX_HEADER_BYTES = 64 * 1024  # a challenge is a few hundred bytes; refuse anything absurd
_CAIP2_EVM = re.compile(r"eip155:[1-9][0-9]{0,18}")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_TX_HASH = re.compile(r"0x[0-9a-fA-F]{64}")
_UINT = re.compile(r"[0-9]{1,78}")


@dataclass(frozen=True)
class Requirement:
    """One payment option, read and normalized. ``amount`` is in the asset's smallest unit."""

    scheme: str
    network: str  # CAIP-2, e.g. eip155:8453
    amount: int
    asset: str  # lowercase 0x address
    pay_to: str  # lowercase 0x address
    max_timeout: int  # seconds
    extra: Mapping[str, Any]

    @property
    def chain_id(self) -> int:
        return int(self.network.split(":", 1)[1])


@dataclass(frozen=True)
class Offer:
    """An option exactly as the server sent it, and what it means (or why it cannot be read)."""

    index: int
    raw: Mapping[str, Any]
    requirement: Requirement | None
    problem: str | None = None


@dataclass(frozen=True)
class Challenge:
    """A parsed 402: the protocol version, the options, and the v2 resource and extensions."""

    version: int
    offers: tuple[Offer, ...]
    error: str | None = None
    resource: Mapping[str, Any] | None = None
    extensions: Mapping[str, Any] | None = None

    @property
    def payment_header(self) -> str:
        """The request header a payment for this challenge goes in."""
        return PAYMENT_SIGNATURE if self.version >= 2 else X_PAYMENT

    @property
    def response_header(self) -> str:
        """The response header the settlement comes back in."""
        return PAYMENT_RESPONSE if self.version >= 2 else X_PAYMENT_RESPONSE

    def to_dict(self) -> dict[str, Any]:
        return {"x402Version": self.version, "error": self.error,
                "resource": dict(self.resource) if self.resource else None,
                "accepts": [dict(offer.raw) for offer in self.offers]}


@dataclass(frozen=True)
class Settlement:
    """A decoded ``PAYMENT-RESPONSE`` (v1: ``X-PAYMENT-RESPONSE``)."""

    success: bool
    transaction: str
    network: str
    payer: str | None = None
    error_reason: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"success": self.success, "transaction": self.transaction,
                "network": self.network, "payer": self.payer, "errorReason": self.error_reason}


# --- reading a challenge -------------------------------------------------------------------------


def parse_challenge(headers: Mapping[str, str], body: bytes) -> Challenge:
    """The x402 challenge of a 402 response: the v2 header, else a v1 (or v2) JSON body.

    Raises X402_BAD_CHALLENGE when the response carries no x402 payment requirements.
    """
    header = _header(headers, PAYMENT_REQUIRED)
    if header is not None:
        return _challenge(decode_json_header(header, PAYMENT_REQUIRED),
                          source=f"the {PAYMENT_REQUIRED} header")
    document = _json_body(body)
    if document is None:
        raise X402BadChallenge(
            "the server answered 402 without x402 payment requirements: no PAYMENT-REQUIRED "
            "header and no JSON body with x402Version and accepts; it cannot be paid "
            "automatically", reason="no_requirements")
    return _challenge(document, source="the response body")


def _challenge(document: Mapping[str, Any], *, source: str) -> Challenge:
    version = document.get("x402Version")
    if version not in (1, 2) or isinstance(version, bool):
        raise X402BadChallenge(f"{source} has x402Version {version!r}; mcpbill speaks 1 and 2",
                               reason="unsupported_version")
    accepts = document.get("accepts")
    if not isinstance(accepts, list) or not accepts:
        raise X402BadChallenge(f"{source} lists no payment options (accepts)",
                               reason="no_options")
    offers = tuple(_offer(index, raw, version) for index, raw in enumerate(accepts))
    return Challenge(version=version, offers=offers, error=_text(document.get("error")),
                     resource=_mapping(document.get("resource")),
                     extensions=_mapping(document.get("extensions")))


def _offer(index: int, raw: Any, version: int) -> Offer:
    if not isinstance(raw, Mapping):
        return Offer(index, {"value": raw}, None, "not an object")
    try:
        return Offer(index, raw, _requirement(raw, version))
    except ValueError as exc:
        return Offer(index, raw, None, str(exc))


def _requirement(raw: Mapping[str, Any], version: int) -> Requirement:
    amount_key = "amount" if version >= 2 else "maxAmountRequired"
    return Requirement(
        scheme=_field(raw, "scheme"),
        network=caip2_network(_field(raw, "network")),
        amount=_uint(raw.get(amount_key), amount_key),
        asset=_address(raw.get("asset"), "asset"),
        pay_to=_address(raw.get("payTo"), "payTo"),
        max_timeout=_uint(raw.get("maxTimeoutSeconds", 60), "maxTimeoutSeconds"),
        extra=_extra(raw.get("extra")),
    )


def caip2_network(network: str) -> str:
    """A network as CAIP-2: ``eip155:<id>`` as is, a v1 name through :data:`V1_NETWORKS`."""
    if _CAIP2_EVM.fullmatch(network):
        return network
    if network in V1_NETWORKS:
        return V1_NETWORKS[network]
    raise ValueError(f"network {network!r} is not an EVM chain mcpbill knows")


def _field(raw: Mapping[str, Any], name: str) -> str:
    value = raw.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} is missing")
    return value


def _uint(value: Any, name: str) -> int:
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str) or not _UINT.fullmatch(text):
        raise ValueError(f"{name} {value!r} is not a whole number of units")
    return int(text)


def _address(value: Any, name: str) -> str:
    if not isinstance(value, str) or not _ADDRESS.fullmatch(value):
        raise ValueError(f"{name} {value!r} is not an EVM address")
    return value.lower()


def _extra(value: Any) -> Mapping[str, Any]:
    """``extra`` is an object in v2 and may be a JSON-encoded string in v1."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError("extra is not JSON") from None
    if not isinstance(value, Mapping):
        raise ValueError("extra is not an object")
    return value


# --- writing a payment ---------------------------------------------------------------------------


def payment_header(challenge: Challenge, offer: Offer, payload: Mapping[str, Any]) -> str:
    """The base64 ``PaymentPayload`` for ``offer`` carrying the scheme's signed ``payload``.

    v2 echoes the chosen option as ``accepted`` (byte for byte as the server sent it), the
    resource and the server's extensions; v1 names scheme and network at the top level.
    """
    document: dict[str, Any]
    if challenge.version >= 2:
        document = {"x402Version": 2, "accepted": dict(offer.raw), "payload": dict(payload)}
        if challenge.resource is not None:
            document["resource"] = dict(challenge.resource)
        if challenge.extensions:
            document["extensions"] = dict(challenge.extensions)
    else:
        document = {"x402Version": 1, "scheme": offer.raw["scheme"],
                    "network": offer.raw["network"], "payload": dict(payload)}
    return base64.b64encode(json.dumps(document, separators=(",", ":")).encode()).decode()


# --- reading a settlement ------------------------------------------------------------------------


def parse_settlement(headers: Mapping[str, str], challenge: Challenge) -> Settlement | None:
    """The settlement a paid response reports, or ``None`` when it reports none readable."""
    header = _header(headers, challenge.response_header)
    if header is None:
        return None
    try:
        document = decode_json_header(header, challenge.response_header)
    except X402BadChallenge:
        return None
    transaction = document.get("transaction")
    return Settlement(
        success=document.get("success") is True,
        transaction=transaction if isinstance(transaction, str) else "",
        network=str(document.get("network", "")),
        payer=_text(document.get("payer")),
        error_reason=_text(document.get("errorReason")),
        raw=document,
    )


def is_tx_hash(value: str) -> bool:
    return bool(_TX_HASH.fullmatch(value))


# --- helpers -------------------------------------------------------------------------------------


def decode_json_header(value: str, name: str) -> dict[str, Any]:
    """A base64 (standard or URL-safe, padded or not) JSON object from header ``name``."""
    if len(value) > MAX_HEADER_BYTES:
        raise X402BadChallenge(f"the {name} header is larger than {MAX_HEADER_BYTES} bytes",
                    reason="too_large")
    text = value.strip()
    padded = text + "=" * (-len(text) % 4)
    try:
        decoded = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
        document = json.loads(decoded)
    except (binascii.Error, ValueError):
        raise X402BadChallenge(f"the {name} header is not base64-encoded JSON",
                    reason="malformed") from None
    if not isinstance(document, dict):
        raise X402BadChallenge(f"the {name} header is not a JSON object", reason="malformed")
    return document


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        value = headers.get(name.lower())
    return value


def _json_body(body: bytes) -> dict[str, Any] | None:
    try:
        document: Any = json.loads(body) if body else None
    except ValueError:
        return None
    if isinstance(document, dict) and "x402Version" in document and "accepts" in document:
        return document
    return None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _mapping(value: Any) -> Mapping[str, Any] | None:
    return value if isinstance(value, Mapping) else None

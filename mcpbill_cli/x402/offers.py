"""What a server accepts, in x402's words: payment requirements, ``PaymentRequired`` documents
(v2 and v1) and the payment payloads that answer them, read and checked. Pure: no chain, no
ledger, no clock of its own.

- v2 (``x402Version: 2``): ``resource`` is an object with the ``url`` (``mcp://tool/<name>``
  for MCP tools); each option has ``amount`` and a CAIP-2 ``network``; the payload echoes the
  option it pays as ``accepted``.
- v1: options have ``maxAmountRequired``, a network name (:data:`~.wire.V1_NETWORKS`) and
  their own ``resource``; the payload names ``scheme`` and ``network`` at the top level.

Only the ``exact`` scheme on EVM (an EIP-3009 ``transferWithAuthorization`` of USDC) is offered.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mcpbill_cli.wallet.addresses import checksum_address
from mcpbill_cli.x402.errors import X402BadChallenge, X402PaymentInvalid
from mcpbill_cli.x402.wire import V1_NETWORKS, caip2_network, decode_json_header

SCHEME = "exact"
MCP_RESOURCE = "mcp://tool/{tool}"
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_NONCE = re.compile(r"0x[0-9a-fA-F]{64}")
_SIGNATURE = re.compile(r"0x[0-9a-fA-F]{130}")
_UINT = re.compile(r"[0-9]{1,78}")


@dataclass(frozen=True)
class Terms:
    """Where x402 payments go: one USDC on one chain, to the operator's deposit address.

    ``network`` is CAIP-2; ``asset`` and ``pay_to`` are lowercase 0x addresses; ``name`` and
    ``version`` are the token's EIP-712 domain; ``max_timeout`` is in seconds.
    """

    network: str
    asset: str
    pay_to: str
    name: str
    version: str
    max_timeout: int

    @property
    def chain_id(self) -> int:
        return int(self.network.split(":", 1)[1])

    @property
    def v1_network(self) -> str | None:
        """The network's x402 v1 name, ``None`` when v1 has no name for it."""
        return next((name for name, caip2 in V1_NETWORKS.items() if caip2 == self.network), None)


@dataclass(frozen=True)
class Signed:
    """An ``exact`` EVM payment as read from a payload: the EIP-3009 authorization fields
    (addresses lowercase, ``nonce`` 0x + 64 hex, ``signature`` 0x + 130 hex), the protocol
    version, and the payload as it came (sent on to a facilitator unchanged)."""

    version: int
    scheme: str
    network: str  # CAIP-2
    asset: str | None  # v2's accepted.asset; v1 names none
    payer: str
    to: str
    value: int
    valid_after: int
    valid_before: int
    nonce: str
    signature: str
    payload: Mapping[str, Any]


# --- the challenge ------------------------------------------------------------------------------


def requirement(terms: Terms, amount: int, *, version: int = 2,
                resource: str | None = None, description: str = "") -> dict[str, Any]:
    """One ``exact`` option for ``amount`` (micro-USDC), v2 or v1 (v1 names its resource).
    Addresses go out in their EIP-55 form, which facilitators require."""
    extra = {"name": terms.name, "version": terms.version}
    asset, pay_to = checksum_address(terms.asset), checksum_address(terms.pay_to)
    if version >= 2:
        return {"scheme": SCHEME, "network": terms.network, "amount": str(amount),
                "asset": asset, "payTo": pay_to,
                "maxTimeoutSeconds": terms.max_timeout, "extra": extra}
    return {"scheme": SCHEME, "network": terms.v1_network or terms.network,
            "maxAmountRequired": str(amount), "resource": resource or "",
            "description": description, "mimeType": "application/json",
            "payTo": pay_to, "maxTimeoutSeconds": terms.max_timeout,
            "asset": asset, "extra": extra}


def payment_required(terms: Terms, amount: int, resource: str, *, version: int = 2,
                     error: str | None = None, description: str = "") -> dict[str, Any]:
    """The ``PaymentRequired`` document for ``resource`` (a URL, or ``mcp://tool/<name>``):
    exactly one ``exact`` option for ``amount``."""
    option = requirement(terms, amount, version=version, resource=resource,
                         description=description)
    document: dict[str, Any] = {"x402Version": 2 if version >= 2 else 1}
    if error is not None:
        document["error"] = error
    if version >= 2:
        info = {"url": resource, "mimeType": "application/json"}
        document["resource"] = {**info, "description": description} if description else info
    document["accepts"] = [option]
    return document


def tool_resource(tool: str) -> str:
    return MCP_RESOURCE.format(tool=tool)


# --- reading a payment --------------------------------------------------------------------------


def read_payment(payment: Mapping[str, Any] | str) -> Signed:
    """A payment payload (a mapping, or the base64 JSON of a payment header) as :class:`Signed`;
    X402_PAYMENT_INVALID (reason ``malformed``, ``version`` or ``scheme``) when it is not an
    ``exact`` EVM payment mcpbill can read."""
    document = _document(payment)
    version = document.get("x402Version")
    if version not in (1, 2) or isinstance(version, bool):
        raise _invalid("version", f"x402Version {version!r} is not 1 or 2")
    accepted = document.get("accepted") if version == 2 else document
    if not isinstance(accepted, Mapping):
        raise _invalid("malformed", "a v2 payment names the option it pays in `accepted`")
    scheme = accepted.get("scheme")
    if scheme != SCHEME:
        raise _invalid("scheme", f"scheme {scheme!r} is not accepted; pay with {SCHEME!r}")
    inner = document.get("payload")
    authorization = inner.get("authorization") if isinstance(inner, Mapping) else None
    if not isinstance(authorization, Mapping):
        raise _invalid("malformed", "the payload has no EIP-3009 authorization")
    try:
        return _signed(version, accepted, inner, authorization, document)  # type: ignore[arg-type]
    except ValueError as exc:
        raise _invalid("malformed", str(exc)) from None


def check_terms(signed: Signed, terms: Terms, amount: int) -> None:
    """Refuse a payment that does not pay ``amount`` to ``terms`` (reasons network, asset,
    amount, recipient), before anything is looked up."""
    if signed.network != terms.network:
        raise _invalid("network", f"the payment is on {signed.network}; pay on {terms.network}")
    if signed.asset is not None and signed.asset != terms.asset:
        raise _invalid("asset", f"the payment is in {signed.asset}; pay in {terms.asset}")
    if signed.value != amount:
        raise _invalid("amount", f"the payment authorizes {signed.value} units; this call "
                                 f"costs exactly {amount}")
    if signed.to != terms.pay_to:
        raise _invalid("recipient", f"the payment goes to {signed.to}; pay {terms.pay_to}")


def check_window(signed: Signed, now: int, margin: int) -> None:
    """Refuse an authorization not valid yet at ``now`` (epoch seconds), or one that lapses
    within ``margin`` seconds (too soon to run the tool and settle)."""
    if signed.valid_after > now:
        raise _invalid("not_yet_valid", f"the authorization is valid after {signed.valid_after}"
                                        f" (now {now})")
    if signed.valid_before <= now + margin:
        raise _invalid("expired", f"the authorization lapses at {signed.valid_before}: it "
                                  f"must stay valid at least {margin} s to be settled")


def _document(payment: Mapping[str, Any] | str) -> Mapping[str, Any]:
    if isinstance(payment, str):
        try:
            return decode_json_header(payment, "payment")
        except X402BadChallenge as exc:
            raise _invalid("malformed", exc.message) from None
    if not isinstance(payment, Mapping):
        raise _invalid("malformed", "the payment is not a JSON object")
    return payment


def _signed(version: int, accepted: Mapping[str, Any], inner: Mapping[str, Any],
            authorization: Mapping[str, Any], document: Mapping[str, Any]) -> Signed:
    network = accepted.get("network")
    if not isinstance(network, str):
        raise ValueError("the payment names no network")
    asset = accepted.get("asset") if version == 2 else None
    return Signed(
        version=version, scheme=SCHEME, network=caip2_network(network),
        asset=_address(asset, "asset") if asset is not None else None,
        payer=_address(authorization.get("from"), "from"),
        to=_address(authorization.get("to"), "to"),
        value=_uint(authorization.get("value"), "value"),
        valid_after=_uint(authorization.get("validAfter"), "validAfter"),
        valid_before=_uint(authorization.get("validBefore"), "validBefore"),
        nonce=_hex(authorization.get("nonce"), _NONCE, "nonce"),
        signature=_hex(inner.get("signature"), _SIGNATURE, "signature"),
        payload=document)


def _address(value: Any, name: str) -> str:
    if not isinstance(value, str) or not _ADDRESS.fullmatch(value):
        raise ValueError(f"{name} {value!r} is not an EVM address")
    return value.lower()


def _uint(value: Any, name: str) -> int:
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str) or not _UINT.fullmatch(text):
        raise ValueError(f"{name} {value!r} is not a whole number")
    return int(text)


def _hex(value: Any, pattern: re.Pattern[str], name: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ValueError(f"{name} is not 0x-prefixed hex of the right length")
    return value.lower()


def _invalid(reason: str, message: str) -> X402PaymentInvalid:
    return X402PaymentInvalid(f"x402 payment refused ({reason}): {message}", reason=reason)

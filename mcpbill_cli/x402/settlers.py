"""Who puts an accepted x402 payment on chain: a facilitator over HTTP, or mcpbill itself.

Both answer one question, :meth:`Settler.settle`: the transaction hash of the settled
authorization, or a refusal that says whether anything may have been sent:

- X402_FACILITATOR_UNAVAILABLE: the facilitator was not reached (nothing was sent);
- X402_SETTLEMENT_FAILED: the settlement was refused or reverted (nothing moved), or its outcome
  is unknown (``outcome: "unknown"``: the caller reads the chain before it decides).

The facilitator API (x402 "facilitator" spec): ``POST <url>/verify`` and ``POST <url>/settle``
with ``{"x402Version", "paymentPayload", "paymentRequirements"}``; ``/settle`` answers a
``SettleResponse`` (``success``, ``transaction``, ``network``, ``payer``, ``errorReason``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from mcpbill_cli.errors import BillingError
from mcpbill_cli.wallet import eip3009
from mcpbill_cli.wallet.rpc import Rpc
from mcpbill_cli.x402.errors import (
    X402FacilitatorUnavailable,
    X402PaymentInvalid,
    X402SettlementFailed,
)
from mcpbill_cli.x402.offers import Signed, Terms
from mcpbill_cli.x402.wire import is_tx_hash

logger = logging.getLogger("mcpbill")

FACILITATOR_TIMEOUT = 30.0  # seconds: a settlement waits for a block


class Settler(Protocol):
    """Settles one verified authorization; the transaction hash (0x hex)."""

    name: str

    def verify(self, signed: Signed, requirement: Mapping[str, Any]) -> None:
        """A last check before the tool runs (a facilitator's /verify); refuses or returns."""

    def settle(self, signed: Signed, requirement: Mapping[str, Any]) -> str: ...


@dataclass
class FacilitatorSettler:
    """Settlement through an x402 facilitator at ``url`` (``[x402] facilitator_url``)."""

    url: str
    timeout: float = FACILITATOR_TIMEOUT
    name: str = "facilitator"

    def verify(self, signed: Signed, requirement: Mapping[str, Any]) -> None:
        answer = self._post("verify", signed, requirement, sent=False)
        if answer.get("isValid") is not True:
            reason = str(answer.get("invalidReason") or "invalid")
            raise X402PaymentInvalid(f"the facilitator refused the payment: {reason}",
                                     reason="signature" if "signature" in reason else "facilitator",
                                     facilitatorReason=reason)

    def settle(self, signed: Signed, requirement: Mapping[str, Any]) -> str:
        answer = self._post("settle", signed, requirement, sent=True)
        transaction = answer.get("transaction")
        if answer.get("success") is not True or not isinstance(transaction, str):
            reason = str(answer.get("errorReason") or "not settled")
            raise X402SettlementFailed(f"the facilitator did not settle the payment: {reason}",
                                       reason=reason, outcome="refused")
        if not is_tx_hash(transaction):
            raise X402SettlementFailed("the facilitator reported a settlement without a "
                                       "transaction hash", outcome="unknown")
        return transaction.lower()

    def _post(self, path: str, signed: Signed, requirement: Mapping[str, Any], *,
              sent: bool) -> dict[str, Any]:
        import httpx

        body = {"x402Version": signed.version, "paymentPayload": dict(signed.payload),
                "paymentRequirements": dict(requirement)}
        url = f"{self.url.rstrip('/')}/{path}"
        try:
            response = httpx.post(url, json=body, timeout=self.timeout)
        except httpx.ConnectError:
            logger.warning("the x402 facilitator at %s cannot be reached (/%s)", self.url, path)
            raise X402FacilitatorUnavailable(
                f"the x402 facilitator at {self.url} cannot be reached; nothing was settled or "
                "charged", url=self.url) from None
        except httpx.HTTPError as exc:
            raise X402SettlementFailed(
                f"the x402 facilitator did not answer /{path} ({type(exc).__name__})",
                outcome="unknown" if sent else "refused") from None
        return _answer(response, path, self.url, sent=sent)


def _answer(response: Any, path: str, url: str, *, sent: bool) -> dict[str, Any]:
    try:
        document = response.json()
    except ValueError:
        document = None
    if isinstance(document, dict) and (response.status_code == 200 or "success" in document
                                       or "isValid" in document):
        return document
    if response.status_code >= 500 and not sent:
        logger.warning("the x402 facilitator at %s failed /%s (HTTP %d)", url, path,
                       response.status_code)
        raise X402FacilitatorUnavailable(f"the x402 facilitator at {url} failed /{path} "
                                         f"(HTTP {response.status_code})", url=url)
    raise X402SettlementFailed(f"the x402 facilitator answered /{path} with HTTP "
                               f"{response.status_code}", status=response.status_code,
                               outcome="unknown" if sent and response.status_code >= 500
                               else "refused")


@dataclass
class SelfSettler:
    """Settlement by mcpbill: ``transferWithAuthorization`` sent from the operator's account
    (``mcpbill wallet create``), which pays the gas. ``account`` is loaded on first use."""

    rpc: Rpc
    terms: Terms
    account: Callable[[], Any]  # the keystore's eth-account LocalAccount
    name: str = "self"

    def verify(self, signed: Signed, requirement: Mapping[str, Any]) -> None:
        return None  # the acceptor's own checks are this settler's

    def settle(self, signed: Signed, requirement: Mapping[str, Any]) -> str:
        domain = domain_of(self.terms)
        authorization = authorization_of(signed)
        try:
            return eip3009.transfer_with_authorization(self.rpc, self.account(), domain,
                                                       authorization)
        except eip3009.SettlementRefused as refused:
            raise X402SettlementFailed(f"the settlement was refused before it was sent "
                                       f"({refused.reason}); nothing moved",
                                       outcome="refused") from None
        except eip3009.SettlementReverted as reverted:
            raise X402SettlementFailed(f"the settlement did not go through ({reverted}); "
                                       "nothing moved", transaction=reverted.tx_hash,
                                       outcome="refused") from None
        except BillingError as error:  # RPC_UNAVAILABLE: sent or not, the chain will say
            logger.warning("x402 settlement could not be confirmed: %s", error.message)
            raise X402SettlementFailed(f"the settlement could not be confirmed: "
                                       f"{error.agent_message}", outcome="unknown") from None


def domain_of(terms: Terms) -> eip3009.Domain:
    return eip3009.Domain(terms.name, terms.version, terms.chain_id, terms.asset)


def authorization_of(signed: Signed) -> eip3009.Authorization:
    return eip3009.Authorization(payer=signed.payer, to=signed.to, value=signed.value,
                                 valid_after=signed.valid_after,
                                 valid_before=signed.valid_before, nonce=signed.nonce,
                                 signature=signed.signature)

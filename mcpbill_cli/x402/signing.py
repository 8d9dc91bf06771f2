"""The ``exact`` EVM payment: an EIP-3009 ``TransferWithAuthorization`` signed with EIP-712.

The domain is the token's (name and version from the option's ``extra``, checked against the
allowed asset; chain id from the CAIP-2 network; ``verifyingContract`` = the asset), so the
authorization is good for that one token on that one chain, to ``payTo``, for the exact amount,
once (a random 32-byte nonce), until ``valid_before``. The key never leaves the signer.
"""

from __future__ import annotations

import secrets
from typing import Any, Protocol

from mcpbill_cli.wallet.addresses import checksum_address
from mcpbill_cli.wallet.eip3009 import AUTHORIZATION_TYPES  # one definition, both sides
from mcpbill_cli.x402.policy import Choice


class TypedDataSigner(Protocol):
    """What signs a payment: an eth-account ``LocalAccount`` (``wallet.keystore.load_account``)."""

    @property
    def address(self) -> str: ...

    def sign_typed_data(self, domain_data: dict[str, Any] | None = None,
                        message_types: dict[str, Any] | None = None,
                        message_data: dict[str, Any] | None = None,
                        full_message: dict[str, Any] | None = None) -> Any: ...


def sign_authorization(signer: TypedDataSigner, choice: Choice, *, valid_after: int,
                       valid_before: int, nonce: bytes | None = None) -> dict[str, Any]:
    """The ``exact`` scheme's payload: ``{"signature", "authorization"}``, wire-ready strings."""
    req = choice.requirement
    nonce = nonce if nonce is not None else secrets.token_bytes(32)
    message = {"from": checksum_address(signer.address.lower()),
               "to": checksum_address(req.pay_to), "value": req.amount,
               "validAfter": valid_after, "validBefore": valid_before, "nonce": nonce}
    domain = {"name": choice.domain_name, "version": choice.domain_version,
              "chainId": req.chain_id, "verifyingContract": checksum_address(req.asset)}
    signed = signer.sign_typed_data(domain_data=domain, message_types=AUTHORIZATION_TYPES,
                                    message_data=message)
    authorization = {**message, "value": str(req.amount), "validAfter": str(valid_after),
                     "validBefore": str(valid_before), "nonce": "0x" + nonce.hex()}
    return {"signature": "0x" + bytes(signed.signature).hex(), "authorization": authorization}

"""EIP-3009 on the accepting side: who signed an authorization, whether its nonce is used, and
``transferWithAuthorization`` sent from the operator's account (self-settlement).

The authorization is the ``exact`` scheme's payload: ``TransferWithAuthorization(from, to,
value, validAfter, validBefore, nonce)`` signed with EIP-712 under the token's domain (name and
version, chain id, the token as verifying contract). Only plain 65-byte ECDSA signatures of
externally owned accounts are read. web3 and eth-account load inside the functions that use them.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mcpbill_cli.wallet.addresses import address_topic, checksum_address
from mcpbill_cli.wallet.rpc import TRANSFER_TOPIC, Rpc

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

AUTHORIZATION_TYPES: dict[str, list[dict[str, str]]] = {
    "TransferWithAuthorization": [
        {"name": "from", "type": "address"},
        {"name": "to", "type": "address"},
        {"name": "value", "type": "uint256"},
        {"name": "validAfter", "type": "uint256"},
        {"name": "validBefore", "type": "uint256"},
        {"name": "nonce", "type": "bytes32"},
    ],
}
_AUTHORIZATION_STATE = "authorizationState(address,bytes32)"
_AUTHORIZATION_USED = "AuthorizationUsed(address,bytes32)"
RECOVERY_BLOCKS = 10_000  # how far back a recovery looks for the settlement of a payment
_TRANSFER_WITH_AUTHORIZATION_ABI: list[dict[str, Any]] = [{
    "type": "function", "name": "transferWithAuthorization", "stateMutability": "nonpayable",
    "inputs": [{"name": n, "type": t} for n, t in (
        ("from", "address"), ("to", "address"), ("value", "uint256"),
        ("validAfter", "uint256"), ("validBefore", "uint256"), ("nonce", "bytes32"),
        ("v", "uint8"), ("r", "bytes32"), ("s", "bytes32"))],
    "outputs": [],
}]

logger = logging.getLogger("mcpbill")
_SEND_LOCK = threading.Lock()  # one account, one transaction nonce at a time in this process
RECEIPT_TIMEOUT = 120.0  # seconds to wait for the settlement to be mined
NONCE_ATTEMPTS = 5  # sends of one settlement whose nonce another sender took first
NONCE_PAUSE = 0.05  # seconds, grown with each attempt, before reading the nonce again
# How nodes (geth, anvil, reth, erigon) refuse a transaction whose nonce is no longer free.
NONCE_TAKEN = ("nonce too low", "replacement transaction underpriced",
               "nonce has already been used")


@dataclass(frozen=True)
class Authorization:
    """A signed ``TransferWithAuthorization``; addresses lowercase 0x, ``nonce`` 0x + 64 hex."""

    payer: str
    to: str
    value: int
    valid_after: int
    valid_before: int
    nonce: str
    signature: str  # 0x + 130 hex


@dataclass(frozen=True)
class Domain:
    """The token's EIP-712 domain."""

    name: str
    version: str
    chain_id: int
    token: str  # lowercase 0x


@dataclass(frozen=True)
class SettledTransfer:
    """The USDC ``Transfer`` log a settlement transaction wrote (what ``wallet sync`` reads)."""

    tx_hash: str
    log_index: int
    position: int  # among the receipt's logs: the deposit's key, stable across re-mining
    block_number: int
    sender: str
    recipient: str
    amount: int


def signer_of(authorization: Authorization, domain: Domain) -> str | None:
    """The address that signed ``authorization`` (lowercase), ``None`` for an unreadable
    signature."""
    from eth_account import Account
    from eth_account.messages import encode_typed_data

    message = {"from": checksum_address(authorization.payer),
               "to": checksum_address(authorization.to), "value": authorization.value,
               "validAfter": authorization.valid_after,
               "validBefore": authorization.valid_before,
               "nonce": bytes.fromhex(authorization.nonce[2:])}
    domain_data = {"name": domain.name, "version": domain.version, "chainId": domain.chain_id,
                   "verifyingContract": checksum_address(domain.token)}
    signable = encode_typed_data(domain_data=domain_data, message_types=AUTHORIZATION_TYPES,
                                 message_data=message)
    try:
        signer = Account.recover_message(signable, signature=bytes.fromhex(
            authorization.signature[2:]))
    except (ValueError, TypeError):
        return None
    return str(signer).lower()


def authorization_used(rpc: Rpc, token: str, payer: str, nonce: str) -> bool:
    """``authorizationState(payer, nonce)`` of the token: True once used (or canceled)."""
    from web3 import Web3

    selector = Web3.keccak(text=_AUTHORIZATION_STATE)[:4].hex()
    data = "0x" + selector.removeprefix("0x") + address_topic(payer)[2:] + nonce[2:]
    return int.from_bytes(rpc.eth_call(token, data), "big") != 0


def transfer_with_authorization(rpc: Rpc, account: LocalAccount, domain: Domain,
                                authorization: Authorization) -> str:
    """Send ``transferWithAuthorization`` from ``account`` (which pays the gas) and wait for
    it to be mined; the transaction hash (0x hex). Raises :class:`SettlementRefused` when the
    node refused it unsent, :class:`SettlementReverted` when it reverted, ``RPC_UNAVAILABLE``
    when the node cannot be reached."""
    signature = bytes.fromhex(authorization.signature[2:])
    r, s, v = signature[:32], signature[32:64], signature[64]
    w3 = rpc.w3
    token = w3.eth.contract(address=checksum_address(domain.token),  # type: ignore[call-overload]
                            abi=_TRANSFER_WITH_AUTHORIZATION_ABI)
    call = token.functions.transferWithAuthorization(
        checksum_address(authorization.payer), checksum_address(authorization.to),
        authorization.value, authorization.valid_after, authorization.valid_before,
        bytes.fromhex(authorization.nonce[2:]), v if v >= 27 else v + 27, r, s)
    from web3.exceptions import ContractLogicError

    with _SEND_LOCK:
        try:
            tx = rpc.call_once("eth_sendRawTransaction", lambda: _send(w3, account, call))
        except ContractLogicError as refused:  # the gas estimate reverted: nothing was sent
            raise SettlementRefused(str(refused.message or "execution reverted")) from None
    receipt = rpc.call_once("eth_getTransactionReceipt",
                            lambda: w3.eth.wait_for_transaction_receipt(
                                tx, timeout=RECEIPT_TIMEOUT))
    tx_hash = "0x" + bytes(tx).hex()
    if receipt["status"] != 1:
        raise SettlementReverted(tx_hash)
    return tx_hash


class SettlementRefused(Exception):
    """The node refused the settlement before it was sent (its gas estimate reverted: the payer
    no longer holds the funds, the nonce was used meanwhile...): nothing moved."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"the settlement would revert: {reason}")
        self.reason = reason


class SettlementReverted(Exception):
    """The settlement transaction was mined and reverted (nothing moved)."""

    def __init__(self, tx_hash: str) -> None:
        super().__init__(f"transaction {tx_hash} reverted")
        self.tx_hash = tx_hash


def settled_transfer(rpc: Rpc, tx_hash: str, token: str, recipient: str, *,
                     sender: str | None = None, amount: int | None = None
                     ) -> SettledTransfer | None:
    """The ``Transfer`` of ``token`` to ``recipient`` (from ``sender``, of ``amount``, when
    given) in a mined ``tx_hash``, or ``None``."""
    receipt = rpc.receipt(tx_hash)
    if receipt is None:
        return None
    return transfer_in(receipt, tx_hash, token, recipient, sender=sender, amount=amount)


def transfer_in(receipt: Any, tx_hash: str, token: str, recipient: str, *,
                sender: str | None = None, amount: int | None = None) -> SettledTransfer | None:
    """:func:`settled_transfer` in a transaction's ``receipt`` (None when it reverted)."""
    if receipt["status"] != 1:
        return None
    wanted = address_topic(recipient)
    for position, log in enumerate(receipt["logs"]):
        topics = ["0x" + bytes(topic).hex() for topic in log["topics"]]
        if (str(log["address"]).lower() == token.lower() and len(topics) == 3
                and topics[0] == TRANSFER_TOPIC and topics[2] == wanted):
            found = SettledTransfer(
                tx_hash=tx_hash.lower(), log_index=int(log["logIndex"]), position=position,
                block_number=int(log["blockNumber"]), sender="0x" + topics[1][-40:],
                recipient=recipient.lower(), amount=int.from_bytes(bytes(log["data"]), "big"))
            if (sender is None or found.sender == sender.lower()) and (
                    amount is None or found.amount == amount):
                return found
    return None


def authorization_tx(rpc: Rpc, token: str, payer: str, nonce: str, *,
                     blocks: int = RECOVERY_BLOCKS) -> str | None:
    """The transaction that used ``(payer, nonce)`` (its ``AuthorizationUsed`` log) within the
    last ``blocks`` blocks, or ``None``."""
    from web3 import Web3

    topic = "0x" + Web3.keccak(text=_AUTHORIZATION_USED).hex().removeprefix("0x")
    last = rpc.block_number()
    params: Any = {"fromBlock": max(last - blocks, 0), "toBlock": last,
                   "address": checksum_address(token),
                   "topics": [topic, address_topic(payer), nonce.lower()]}
    logs = rpc.call_once("eth_getLogs", lambda: list(rpc.w3.eth.get_logs(params)))
    if not logs:
        return None
    return "0x" + bytes(logs[-1]["transactionHash"]).hex()


def _send(w3: Any, account: LocalAccount, call: Any) -> Any:
    """Sign and send ``call`` from ``account`` at its next transaction nonce.

    Replicas sharing one keystore send from one account: two of them can read the same
    pending nonce and send at once. The node refuses the second transaction ("nonce too low",
    or "replacement transaction underpriced" while the first is still pending), so nothing of
    it was sent: read the nonce again and resend, a few times, with a short random pause so
    colliding senders drift apart. ``_SEND_LOCK`` keeps one process's threads from colliding
    at all.
    """
    from web3.exceptions import Web3RPCError

    for attempt in range(1, NONCE_ATTEMPTS + 1):
        transaction = call.build_transaction({
            "from": account.address,
            "nonce": w3.eth.get_transaction_count(account.address, "pending"),
        })
        signed = account.sign_transaction(transaction)
        try:
            return w3.eth.send_raw_transaction(signed.raw_transaction)
        except Web3RPCError as error:
            if attempt == NONCE_ATTEMPTS or not _nonce_taken(error):
                raise
            logger.info("settlement nonce %s was taken by another sender; retrying",
                        transaction["nonce"])
            time.sleep(NONCE_PAUSE * attempt * (1 + secrets.randbelow(100) / 100))
    raise AssertionError("unreachable")  # the last attempt returned or raised


def _nonce_taken(error: Exception) -> bool:
    """Whether the node refused a transaction because its nonce was used by another one."""
    message = str(error).lower()
    return any(sign in message for sign in NONCE_TAKEN)

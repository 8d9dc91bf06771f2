"""Verifying one deposit transaction on chain and crediting it: ``mcpbill wallet fund --tx``.

A transaction is a deposit when it succeeded, has enough confirmations to be final, and holds a
``Transfer`` log emitted by the chain's USDC contract to the deposit address. Each such log is
credited once, keyed by its position among the receipt's logs. A lookalike token (same event,
another contract) is never credited.

Final means final as seen consistently: after the head says the receipt has its confirmations,
:func:`require_consistent` re-reads the chain at the confirmed height (that block exists, the
receipt reads the same, its block is still the canonical one at its height). An RPC whose
answers disagree (a head that went back, a block that vanished, a receipt that changed) is
refused with CHAIN_INCONSISTENT and nothing is credited from it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine

from mcpbill_cli.clock import utcnow
from mcpbill_cli.ledger.engine import writing
from mcpbill_cli.names import require_name
from mcpbill_cli.wallet.addresses import normalize_address, normalize_tx_hash
from mcpbill_cli.wallet.chains import Chain
from mcpbill_cli.wallet.crediting import Deposit, credit_deposit
from mcpbill_cli.wallet.errors import (
    ChainInconsistent,
    NotUsdc,
    TxNotFound,
    TxPending,
    TxReverted,
    WrongRecipient,
)
from mcpbill_cli.wallet.rpc import TRANSFER_TOPIC, Rpc

if TYPE_CHECKING:
    from web3 import Web3

_INT64_MAX = 2**63 - 1  # the ledger's BIGINT; no real USDC transfer comes near it


@dataclass(frozen=True)
class FundResult:
    """What ``fund_from_tx`` did: deposits credited now, and those credited before (a no-op)."""

    tenant: str
    chain: str
    tx_hash: str
    credited: list[Deposit] = field(default_factory=list)
    already: list[Deposit] = field(default_factory=list)

    @property
    def amount(self) -> int:
        """Micro-USDC credited by this call."""
        return sum(deposit.amount for deposit in self.credited)


def as_rpc(w3: Web3 | Rpc) -> Rpc:
    """Accept a Web3 (default retries) or an :class:`Rpc` (a chosen retry policy)."""
    return w3 if isinstance(w3, Rpc) else Rpc(w3)


def verify_deposit(w3: Web3 | Rpc, chain: Chain, tx_hash: str,
                   deposit_address: str) -> list[Deposit]:
    """The final USDC transfers to ``deposit_address`` in ``tx_hash``, or a refusal saying why.

    Refusals: TX_NOT_FOUND, TX_PENDING (with ``more_needed``), TX_REVERTED, NOT_USDC,
    WRONG_RECIPIENT, and WRONG_CHAIN before anything is read.
    """
    rpc = as_rpc(w3)
    tx_hash = normalize_tx_hash(tx_hash)
    recipient = normalize_address(deposit_address, field="deposit address")
    rpc.check_chain(chain)
    receipt = _mined_receipt(rpc, chain, tx_hash)
    if receipt["status"] != 1:
        raise TxReverted(f"transaction {tx_hash} reverted on {chain.name}: no USDC moved",
                         tx=tx_hash, chain=chain.caip2)
    found = _usdc_deposits(chain, tx_hash, receipt["logs"], recipient)
    _require_final(rpc, chain, tx_hash, int(receipt["blockNumber"]))
    require_consistent(rpc, chain, tx_hash, receipt)
    return found


def fund_from_tx(engine: Engine, w3: Web3 | Rpc, chain: Chain, tenant: str, tx_hash: str,
                 deposit_address: str, *, at: datetime | None = None) -> FundResult:
    """Verify ``tx_hash`` and credit its deposits to ``tenant``, all in one transaction.

    Funding the same transaction again credits nothing and lists the deposits in ``already``.
    """
    require_name(tenant, "tenant")
    found = verify_deposit(w3, chain, tx_hash, deposit_address)
    at = at or utcnow()
    credited: list[Deposit] = []
    already: list[Deposit] = []
    with writing(engine) as conn:
        for deposit in found:
            (credited if credit_deposit(conn, deposit, tenant, at) else already).append(deposit)
    return FundResult(tenant=tenant, chain=chain.caip2, tx_hash=found[0].tx_hash,
                      credited=credited, already=already)


def decode_transfer(chain: Chain, log: Any, position: int) -> Deposit | None:
    """An ERC-20 ``Transfer`` log as a :class:`Deposit` (of any token), else ``None``;
    ``position`` is the log's index among its transaction's receipt logs.

    ERC-721 transfers share the event signature but index a fourth topic: they are skipped.
    """
    topics = [hex_str(topic) for topic in log["topics"]]
    data = bytes(log["data"])
    if len(topics) != 3 or topics[0] != TRANSFER_TOPIC or len(data) != 32:
        return None
    return Deposit(chain=chain.caip2, tx_hash=hex_str(log["transactionHash"]),
                   log_index=int(log["logIndex"]), position=position,
                   block_number=int(log["blockNumber"]),
                   sender="0x" + topics[1][-40:], recipient="0x" + topics[2][-40:],
                   token=str(log["address"]).lower(), amount=int.from_bytes(data, "big"))


def _mined_receipt(rpc: Rpc, chain: Chain, tx_hash: str) -> Any:
    receipt = rpc.receipt(tx_hash)
    if receipt is not None:
        return receipt
    if rpc.is_pending(tx_hash):
        raise TxPending.waiting(
            f"transaction {tx_hash} is not mined yet on {chain.name}: wait "
            f"{chain.confirmations} confirmations and retry", confirmations=0,
            required=chain.confirmations, tx=tx_hash, chain=chain.caip2,
        )
    raise TxNotFound(
        f"no transaction {tx_hash} on {chain.name}: check the hash and the --chain",
        tx=tx_hash, chain=chain.caip2,
    )


def _usdc_deposits(chain: Chain, tx_hash: str, logs: Iterable[Any],
                   recipient: str) -> list[Deposit]:
    transfers = [t for t in (decode_transfer(chain, log, position)
                             for position, log in enumerate(logs)) if t is not None]
    usdc = [t for t in transfers if t.token == chain.usdc and 0 < t.amount <= _INT64_MAX]
    found = [t for t in usdc if t.recipient == recipient]
    if found:
        return found
    lookalikes = [t for t in transfers if t.token != chain.usdc and t.recipient == recipient]
    if lookalikes:
        raise NotUsdc(
            f"transaction {tx_hash} sent token {lookalikes[0].token} to the deposit address, "
            f"which is not {chain.name}'s USDC ({chain.usdc}); it is not credited",
            tx=tx_hash, token=lookalikes[0].token, usdc=chain.usdc, reason="other_token",
        )
    if usdc:
        raise WrongRecipient(
            f"transaction {tx_hash} sent USDC to {usdc[0].recipient}, not to the deposit "
            f"address {recipient}", tx=tx_hash, recipient=usdc[0].recipient,
            deposit_address=recipient,
        )
    raise NotUsdc(f"transaction {tx_hash} moved no USDC on {chain.name}", tx=tx_hash,
                  usdc=chain.usdc, reason="no_usdc_transfer")


def _require_final(rpc: Rpc, chain: Chain, tx_hash: str, block: int) -> None:
    confirmations = rpc.block_number() - block + 1
    if confirmations < chain.confirmations:
        raise TxPending.waiting(
            f"transaction {tx_hash} has {confirmations} of {chain.confirmations} confirmations "
            f"on {chain.name}: retry after {chain.confirmations - confirmations} more block(s)",
            confirmations=confirmations, required=chain.confirmations, tx=tx_hash,
            chain=chain.caip2,
        )


def require_consistent(rpc: Rpc, chain: Chain, tx_hash: str, receipt: Any) -> None:
    """Re-read the chain at the receipt's confirmed height before anything is credited.

    The head must still cover the confirmations, the block at the confirmed height must exist,
    a second read of the receipt must equal the first, and the receipt's block must still be the
    node's block at that height. Otherwise CHAIN_INCONSISTENT: the RPC contradicts itself.
    """
    block = int(receipt["blockNumber"])
    confirmed_at = block + chain.confirmations - 1
    head = rpc.block_number()
    if head < confirmed_at:
        raise _inconsistent(rpc, chain, tx_hash, f"its head went back to {head}, below block "
                            f"{confirmed_at} where {tx_hash} has {chain.confirmations} "
                            "confirmations")
    if rpc.block_hash(confirmed_at) is None:
        raise _inconsistent(rpc, chain, tx_hash, f"its head is {head} but it has no block "
                            f"{confirmed_at}, where {tx_hash} has {chain.confirmations} "
                            "confirmations")
    again = rpc.receipt(tx_hash)
    if again is None or receipt_fingerprint(again) != receipt_fingerprint(receipt):
        raise _inconsistent(rpc, chain, tx_hash, f"the receipt of {tx_hash} changed between "
                            "two reads")
    if rpc.block_hash(block) != hex_str(receipt["blockHash"]):
        raise _inconsistent(rpc, chain, tx_hash, f"block {block} of {tx_hash} is no longer "
                            "the chain's block at that height")


def receipt_fingerprint(receipt: Any) -> tuple[Any, ...]:
    """What of a receipt must not change between two reads: its place and its logs."""
    return (hex_str(receipt["blockHash"]), int(receipt["blockNumber"]), int(receipt["status"]),
            tuple(_log_fingerprint(log) for log in receipt["logs"]))


def _log_fingerprint(log: Any) -> tuple[Any, ...]:
    return (str(log["address"]).lower(), tuple(hex_str(t) for t in log["topics"]),
            bytes(log["data"]).hex(), int(log["logIndex"]))


def deposit_in_receipt(rpc: Rpc, chain: Chain, receipt: Any, log: Any) -> Deposit | None:
    """The :class:`Deposit` of ``log`` (from ``eth_getLogs``) at its place in ``receipt``.

    The receipt must hold the same log in the same block; if not, the node contradicts itself
    (CHAIN_INCONSISTENT). ``None`` for a log that is not an ERC-20 transfer.
    """
    tx_hash = hex_str(log["transactionHash"])
    if (receipt is None or int(receipt["status"]) != 1
            or hex_str(receipt["blockHash"]) != hex_str(log["blockHash"])):
        raise _inconsistent(rpc, chain, tx_hash, f"the log of {tx_hash} in block "
                            f"{int(log['blockNumber'])} has no receipt in that block")
    wanted = _log_fingerprint(log)
    for position, candidate in enumerate(receipt["logs"]):
        if _log_fingerprint(candidate) == wanted:
            return decode_transfer(chain, candidate, position)
    raise _inconsistent(rpc, chain, tx_hash, f"the receipt of {tx_hash} does not hold the log "
                        f"{int(log['logIndex'])} that eth_getLogs returned")


def _inconsistent(rpc: Rpc, chain: Chain, tx_hash: str, what: str) -> ChainInconsistent:
    return ChainInconsistent(
        f"the RPC at {rpc.url} contradicts itself on {chain.name}: {what}; nothing was "
        "credited: retry later (a reorganisation may be under way)", url=rpc.url,
        chain=chain.caip2, tx=tx_hash)


def hex_str(value: Any) -> str:
    """A topic or hash as lowercase ``0x`` hex, whether HexBytes, bytes or str."""
    if isinstance(value, str):
        return value.lower() if value.startswith("0x") else "0x" + value.lower()
    return "0x" + bytes(value).hex()

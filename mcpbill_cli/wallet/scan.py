"""Scanning a chain for deposits: ``mcpbill wallet sync``.

The scan reads USDC ``Transfer`` logs to the deposit address, from the stored checkpoint, in
bounded block ranges, and only up to the last *final* block (``latest - confirmations + 1``):
a block that a reorganisation could still replace is never read, so a vanished transfer is never
credited and none is credited twice. Each log found is checked against its transaction's receipt
(the same log, in the same block; its position in the receipt is the deposit's key), and the
receipt is re-read at its confirmed height before anything is credited; the block at the last
final height of a range must exist before the checkpoint moves past it. An RPC that contradicts
itself (a head that went back, a block that vanished, a receipt that changed) stops the sync with
CHAIN_INCONSISTENT; nothing of that range is credited and its checkpoint does not move. Each
range's credits and the checkpoint move in one transaction, so an interrupted scan resumes
exactly where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, select, update

from mcpbill_cli.clock import utcnow
from mcpbill_cli.errors import InvalidInput
from mcpbill_cli.ledger import ops
from mcpbill_cli.ledger.engine import reading, writing
from mcpbill_cli.ledger.models import scan_checkpoints
from mcpbill_cli.wallet.addresses import normalize_address
from mcpbill_cli.wallet.chains import Chain
from mcpbill_cli.wallet.crediting import (
    Credit,
    Deposit,
    claim_unlinked,
    credit_deposit,
    find_recorded,
    linked_tenants,
    record_unlinked,
    unlinked_deposits,
)
from mcpbill_cli.wallet.deposits import as_rpc, deposit_in_receipt, hex_str, require_consistent
from mcpbill_cli.wallet.errors import ChainInconsistent, NoCheckpoint, RpcUnavailable
from mcpbill_cli.wallet.rpc import LogQueryRefused, Rpc

if TYPE_CHECKING:
    from web3 import Web3

DEFAULT_BATCH = 2_000
Progress = Callable[[int, int], None]  # (blocks scanned so far, blocks to scan)
cp = scan_checkpoints.c


@dataclass(frozen=True)
class SyncResult:
    """What a sync scanned and credited; ``unlinked`` lists every deposit still waiting."""

    chain: str
    from_block: int
    to_block: int  # the checkpoint now: the last block scanned (from_block - 1 if none)
    latest_block: int
    credited: list[Credit] = field(default_factory=list)
    new_unlinked: list[Deposit] = field(default_factory=list)
    unlinked: list[Deposit] = field(default_factory=list)
    queries: int = 0

    @property
    def blocks(self) -> int:
        return max(self.to_block - self.from_block + 1, 0)


def sync(engine: Engine, w3: Web3 | Rpc, chain: Chain, deposit_address: str, *,
         from_block: int | None = None, batch: int = DEFAULT_BATCH,
         progress: Progress | None = None, at: datetime | None = None) -> SyncResult:
    """Credit final deposits from linked senders and keep the others as unlinked.

    Starts after the stored checkpoint, or at ``from_block`` when given (a rescan is harmless:
    every deposit is keyed by chain, tx hash and log index). Idempotent on re-run.
    """
    if batch < 1:
        raise InvalidInput("batch must be at least 1 block")
    rpc = as_rpc(w3)
    recipient = normalize_address(deposit_address, field="deposit address")
    rpc.check_chain(chain)
    at = at or utcnow()
    start = _start_block(engine, chain, from_block, at)
    latest = rpc.block_number()
    final = latest - chain.confirmations + 1
    with writing(engine) as conn:
        credited = claim_unlinked(conn, at, chain=chain.caip2)
    scan = _Scan(engine, rpc, chain, recipient, at)
    total = max(final - start + 1, 0)
    if progress:
        progress(0, total)
    for first, last in block_ranges(start, final, batch):
        scan.range(first, last)
        if progress:
            progress(last - start + 1, total)
    with reading(engine) as conn:
        waiting = unlinked_deposits(conn, chain.caip2)
    return SyncResult(chain=chain.caip2, from_block=start, to_block=max(final, start - 1),
                      latest_block=latest, credited=credited + scan.credited,
                      new_unlinked=scan.unlinked, unlinked=waiting, queries=scan.queries)


def block_ranges(first: int, last: int, size: int) -> Iterator[tuple[int, int]]:
    """``first..last`` cut into inclusive ranges of at most ``size`` blocks."""
    for start in range(first, last + 1, size):
        yield start, min(start + size - 1, last)


def checkpoint(engine: Engine, chain: Chain) -> int | None:
    """The last block scanned on ``chain``, or ``None`` before its first sync."""
    with reading(engine) as conn:
        return _checkpoint(conn, chain.caip2)


class _Scan:
    """One sync's pass over its ranges; collects what it credited and what it kept unlinked."""

    def __init__(self, engine: Engine, rpc: Rpc, chain: Chain, recipient: str,
                 at: datetime) -> None:
        self.engine, self.rpc, self.chain, self.recipient, self.at = (
            engine, rpc, chain, recipient, at)
        self.credited: list[Credit] = []
        self.unlinked: list[Deposit] = []
        self.queries = 0

    def range(self, first: int, last: int) -> None:
        found = self._final_deposits(self._logs(first, last))
        self._require_final_block(first, last)
        with writing(self.engine) as conn:
            tenants = linked_tenants(conn, (deposit.sender for deposit in found))
            for deposit in found:
                self._record(conn, deposit, tenants.get(deposit.sender))
            advance_checkpoint(conn, self.chain.caip2, last, self.at)

    def _final_deposits(self, logs: list[Any]) -> list[Deposit]:
        """The logs as deposits keyed by their place in their receipts, each receipt re-read
        at its confirmed height (CHAIN_INCONSISTENT when the node contradicts itself)."""
        receipts: dict[str, Any] = {}
        found = []
        for log in logs:
            tx_hash = hex_str(log["transactionHash"])
            if tx_hash not in receipts:
                receipts[tx_hash] = self.rpc.receipt(tx_hash)
            deposit = deposit_in_receipt(self.rpc, self.chain, receipts[tx_hash], log)
            if deposit is not None and deposit.amount > 0:
                found.append(deposit)
        for tx_hash, receipt in receipts.items():
            require_consistent(self.rpc, self.chain, tx_hash, receipt)
        return found

    def _require_final_block(self, first: int, last: int) -> None:
        """The head that made ``last`` final must still be there: a node whose head went back
        (or lied ahead) would move the checkpoint past blocks that are not final yet."""
        confirmed_at = last + self.chain.confirmations - 1
        if self.rpc.block_hash(confirmed_at) is None:
            raise ChainInconsistent(
                f"the RPC at {self.rpc.url} contradicts itself on {self.chain.name}: it has no "
                f"block {confirmed_at}, which its head made final; nothing in blocks "
                f"{first}..{last} was credited: retry later", url=self.rpc.url,
                chain=self.chain.caip2, block=confirmed_at)

    def _record(self, conn: Connection, deposit: Deposit, tenant: str | None) -> None:
        recorded = find_recorded(conn, deposit)
        if recorded is not None and (recorded.status == "credited" or tenant is None):
            return  # credited before (maybe by `wallet fund --tx`), or already kept unlinked
        if tenant is None:
            if record_unlinked(conn, deposit, self.at):
                self.unlinked.append(deposit)
        elif credit_deposit(conn, deposit, tenant, self.at):
            self.credited.append(Credit(deposit, tenant))

    def _logs(self, first: int, last: int) -> list[Any]:
        """The range's logs; a node that refuses the range (too large) gets two halves."""
        self.queries += 1
        try:
            return self.rpc.transfer_logs(self.chain.usdc, self.recipient, first, last)
        except LogQueryRefused as exc:
            if first == last:
                raise RpcUnavailable(
                    f"the RPC at {self.rpc.url} refused eth_getLogs for block {first}: {exc}",
                    url=self.rpc.url, method="eth_getLogs",
                ) from None
        middle = (first + last) // 2
        return self._logs(first, middle) + self._logs(middle + 1, last)


def _start_block(engine: Engine, chain: Chain, from_block: int | None, at: datetime) -> int:
    if from_block is not None:
        if from_block < 0:
            raise InvalidInput("--from-block must be 0 or more", field="from_block")
        with writing(engine) as conn:
            if _checkpoint(conn, chain.caip2) is None:
                # The operator chose where this chain's history starts: remember it.
                advance_checkpoint(conn, chain.caip2, from_block - 1, at)
        return from_block
    last = checkpoint(engine, chain)
    if last is None:
        raise NoCheckpoint(
            f"{chain.name} has never been synced: pass --from-block N, the block where the "
            "deposit address first received USDC (scanning from block 0 is never implicit)",
            chain=chain.caip2,
        )
    return last + 1


def _checkpoint(conn: Connection, caip2: str) -> int | None:
    value = conn.execute(select(cp.block_number).where(cp.chain == caip2)).scalar_one_or_none()
    return None if value is None else int(value)


def advance_checkpoint(conn: Connection, caip2: str, block: int, at: datetime) -> None:
    """Move the checkpoint forward to ``block``; never backward (a rescan keeps the furthest)."""
    if ops.insert_ignore(conn, scan_checkpoints,
                         {"chain": caip2, "block_number": block, "updated_at": at}):
        return
    conn.execute(update(scan_checkpoints).where(cp.chain == caip2, cp.block_number < block)
                 .values(block_number=block, updated_at=at))

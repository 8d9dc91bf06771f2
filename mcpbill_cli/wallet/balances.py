"""The deposit address's USDC on chain, beside what the ledger recorded from that chain."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import Engine, func, select

from mcpbill_cli.ledger.engine import reading
from mcpbill_cli.ledger.models import deposits
from mcpbill_cli.wallet.addresses import normalize_address
from mcpbill_cli.wallet.chains import Chain
from mcpbill_cli.wallet.deposits import as_rpc
from mcpbill_cli.wallet.rpc import Rpc

if TYPE_CHECKING:
    from web3 import Web3

d = deposits.c


@dataclass(frozen=True)
class ChainBalance:
    """Micro-USDC: held at ``address`` on chain, credited to tenants, and kept unlinked."""

    chain: str
    address: str
    onchain: int
    credited: int
    unlinked: int

    @property
    def unaccounted(self) -> int:
        """On chain but in no deposit row: not yet synced, not yet final, or not a deposit."""
        return self.onchain - self.credited - self.unlinked


def onchain_balance(w3: Web3 | Rpc, chain: Chain, address: str) -> int:
    """The USDC balance of ``address`` on ``chain``, in micro-USDC (after the chain check)."""
    rpc = as_rpc(w3)
    rpc.check_chain(chain)
    return rpc.token_balance(chain.usdc, normalize_address(address))


def chain_balance(engine: Engine, w3: Web3 | Rpc, chain: Chain, address: str) -> ChainBalance:
    """The on-chain balance of the deposit address and the ledger's deposit totals for it."""
    recipient = normalize_address(address)
    onchain = onchain_balance(w3, chain, recipient)
    query = (select(d.status, func.coalesce(func.sum(d.amount), 0))
             .where(d.chain == chain.caip2, d.recipient == recipient).group_by(d.status))
    with reading(engine) as conn:
        totals = {status: int(total) for status, total in conn.execute(query)}
    return ChainBalance(chain=chain.caip2, address=recipient, onchain=onchain,
                        credited=totals.get("credited", 0), unlinked=totals.get("unlinked", 0))

"""Refusals of the on-chain wallet: each a :class:`~mcpbill_cli.errors.BillingError`, stable code.

The CLI maps each ``code`` to an exit status in ``mcpbill_cli/cli/output.py``. Messages say what
to do next; ``details`` carry the numbers a script needs (e.g. ``more_needed`` for a pending tx).
"""

from __future__ import annotations

from typing import Any

from mcpbill_cli.errors import BillingError


class TxNotFound(BillingError):
    """The RPC knows no transaction with this hash on this chain."""

    code = "TX_NOT_FOUND"


class TxPending(BillingError):
    """Not final yet: in the mempool, or mined with fewer confirmations than required.

    Details: ``confirmations`` (0 in the mempool), ``required``, ``more_needed``.
    """

    code = "TX_PENDING"

    @classmethod
    def waiting(cls, message: str, *, confirmations: int, required: int,
                **details: Any) -> TxPending:
        return cls(message, confirmations=confirmations, required=required,
                   more_needed=max(required - confirmations, 0), **details)

    @property
    def confirmations(self) -> int:
        return int(self.details.get("confirmations", 0))

    @property
    def more_needed(self) -> int:
        return int(self.details.get("more_needed", 0))


class TxReverted(BillingError):
    """The transaction was mined but failed (receipt status 0): nothing moved."""

    code = "TX_REVERTED"


class NotUsdc(BillingError):
    """No USDC reached the deposit address: another token (a lookalike), or no token at all."""

    code = "NOT_USDC"


class WrongRecipient(BillingError):
    """USDC moved in this transaction, but to an address that is not the deposit address."""

    code = "WRONG_RECIPIENT"


class DepositClaimed(BillingError):
    """This on-chain transfer was already credited to another tenant."""

    code = "DEPOSIT_CLAIMED"


class RpcUnavailable(BillingError):
    """The RPC endpoint is unreachable, rate-limiting or failing, after bounded retries."""

    code = "RPC_UNAVAILABLE"
    told = "the server cannot reach its chain's RPC endpoint just now; retry shortly"


class ChainInconsistent(BillingError):
    """The RPC's answers disagree with each other: a head that went back, a block that vanished,
    a receipt that changed between two reads (a reorganisation under way, or a load-balanced
    endpoint whose nodes lag). Nothing was credited from what it said; retry later."""

    code = "CHAIN_INCONSISTENT"


class WrongChain(BillingError):
    """The RPC serves another chain than the one configured: nothing is read from it."""

    code = "WRONG_CHAIN"


class UnknownChain(BillingError):
    code = "UNKNOWN_CHAIN"


class NoRpcUrl(BillingError):
    code = "NO_RPC_URL"


class NoDepositAddress(BillingError):
    code = "NO_DEPOSIT_ADDRESS"


class NoCheckpoint(BillingError):
    """A first sync of a chain needs a starting block: scanning from block 0 is never implicit."""

    code = "NO_CHECKPOINT"


class WrongPassword(BillingError):
    """The keystore did not decrypt with this password."""

    code = "WRONG_PASSWORD"

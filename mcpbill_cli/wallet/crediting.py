"""Recording deposits in the ledger: each step runs inside the caller's write transaction.

A deposit is credited at most once, keyed by (chain, tx hash, position of its log among the logs
of that transaction's receipt): the ``deposits`` row's unique key and the transfer id
``deposit:<deposit id>`` both say so, and the transfer and the row are written in the same
transaction, so nothing is ever half-credited. The position, unlike the block-wide ``logIndex``,
stays the same when a reorganisation re-mines the transaction elsewhere: one transfer is one
deposit however it is mined.

Rows recorded before schema 0010 have no position (the ledger cannot compute it, see the
migration): :func:`find_recorded` adopts such a row when it meets the same transfer again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, case, select, update

from mcpbill_cli.errors import IdempotencyConflict
from mcpbill_cli.ledger import audit, ops
from mcpbill_cli.ledger.models import deposits, wallet_links
from mcpbill_cli.wallet.errors import DepositClaimed

d = deposits.c


@dataclass(frozen=True)
class Deposit:
    """One USDC ``Transfer`` log to the deposit address; ``amount`` is micro-USDC."""

    chain: str  # CAIP-2
    tx_hash: str  # lowercase 0x
    log_index: int  # block-wide: changes when a reorg re-mines the transaction elsewhere
    position: int | None  # index among the transaction's receipt logs; None on pre-0010 rows
    block_number: int
    sender: str  # lowercase 0x
    recipient: str
    token: str
    amount: int

    @property
    def id(self) -> str:
        """``<caip2>:<tx hash>:p<position>``; a pre-0010 row keeps its ``...:<log index>`` id."""
        if self.position is None:
            return f"{self.chain}:{self.tx_hash}:{self.log_index}"
        return f"{self.chain}:{self.tx_hash}:p{self.position}"

    @property
    def transfer_id(self) -> str:
        return f"deposit:{self.id}"


@dataclass(frozen=True)
class Credit:
    """A deposit credited to a tenant by this call."""

    deposit: Deposit
    tenant: str


def credited_tenant(conn: Connection, deposit_id: str) -> str | None:
    """The tenant a deposit was credited to, or ``None`` if it is unknown or unlinked."""
    return conn.execute(select(d.tenant).where(d.id == deposit_id, d.status == "credited")
                        ).scalar_one_or_none()


def find_recorded(conn: Connection, deposit: Deposit) -> Row[Any] | None:
    """The ``deposits`` row of this transfer, or ``None`` if the ledger never saw it.

    Looked up by (chain, tx hash, position); failing that, a row from before schema 0010 (no
    position) with the same sender, recipient, token and amount is the same transfer: it is
    adopted (its position stamped, preferring the one at the same log index) so that it is never
    credited again under the new key.
    """
    if deposit.position is None:
        return conn.execute(select(deposits).where(d.id == deposit.id)).first()
    keyed = select(deposits).where(d.chain == deposit.chain, d.tx_hash == deposit.tx_hash)
    row = conn.execute(keyed.where(d.tx_log_position == deposit.position)).first()
    return row if row is not None else _adopt_unpositioned(conn, deposit)


def _adopt_unpositioned(conn: Connection, deposit: Deposit) -> Row[Any] | None:
    same_transfer = (select(d.id).where(
        d.chain == deposit.chain, d.tx_hash == deposit.tx_hash, d.tx_log_position.is_(None),
        d.sender == deposit.sender, d.recipient == deposit.recipient,
        d.token_address == deposit.token, d.amount == deposit.amount)
        .order_by(case((d.log_index == deposit.log_index, 0), else_=1), d.log_index).limit(1))
    legacy_id = conn.execute(same_transfer).scalar_one_or_none()
    if legacy_id is None:
        return None
    conn.execute(update(deposits).where(d.id == legacy_id, d.tx_log_position.is_(None))
                 .values(tx_log_position=deposit.position))
    return conn.execute(select(deposits).where(d.id == legacy_id)).first()


def credit_deposit(conn: Connection, deposit: Deposit, tenant: str, at: datetime) -> bool:
    """Credit ``deposit`` to ``tenant``; False if it already was. Refuses another tenant's."""
    recorded = find_recorded(conn, deposit)
    if recorded is not None and recorded.status == "credited":
        _refuse_other_owner(deposit, recorded.tenant, tenant)
        return False
    deposit_id = deposit.id if recorded is None else str(recorded.id)
    ops.ensure_account(conn, ops.chain_account(deposit.chain), kind="chain", guarded=False, at=at)
    ops.ensure_account(conn, ops.tenant_account(tenant), kind="tenant", guarded=True, at=at)
    try:
        posted = ops.transfer(conn, id=f"deposit:{deposit_id}",
                              debit=ops.chain_account(deposit.chain),
                              credit=ops.tenant_account(tenant), amount=deposit.amount,
                              code="deposit", at=at, ref=deposit_id)
    except IdempotencyConflict:
        # A concurrent credit to another tenant committed between our read and our write.
        _refuse_other_owner(deposit, credited_tenant(conn, deposit_id) or "?", tenant)
        raise
    if posted:
        _write_credited_row(conn, deposit, deposit_id, tenant, at)
        audit.record(conn, "deposit", at=at, tenant=tenant, amount=deposit.amount,
                     ref=deposit_id)
    return posted


def record_unlinked(conn: Connection, deposit: Deposit, at: datetime) -> bool:
    """Keep a deposit whose sender belongs to no tenant yet; False if it was already recorded."""
    return ops.insert_ignore(conn, deposits, _row(deposit, at, status="unlinked"))


def linked_tenants(conn: Connection, senders: Iterable[str]) -> dict[str, str]:
    """``{sender: tenant}`` for the senders that are linked to a tenant."""
    wanted = sorted(set(senders))
    if not wanted:
        return {}
    query = select(wallet_links.c.address, wallet_links.c.tenant).where(
        wallet_links.c.address.in_(wanted))
    return {address: tenant for address, tenant in conn.execute(query)}


def claim_unlinked(conn: Connection, at: datetime, *, chain: str | None = None,
                   sender: str | None = None) -> list[Credit]:
    """Credit kept unlinked deposits whose sender has been linked since (optionally filtered)."""
    query = (select(deposits, wallet_links.c.tenant.label("linked_tenant"))
             .join(wallet_links, wallet_links.c.address == d.sender)
             .where(d.status == "unlinked").order_by(d.block_number, d.log_index))
    if chain is not None:
        query = query.where(d.chain == chain)
    if sender is not None:
        query = query.where(d.sender == sender)
    credits = []
    for row in conn.execute(query).all():
        deposit = deposit_from_row(row)
        if credit_deposit(conn, deposit, row.linked_tenant, at):
            credits.append(Credit(deposit, row.linked_tenant))
    return credits


def unlinked_deposits(conn: Connection, chain: str | None = None) -> list[Deposit]:
    """Deposits kept while their sender is linked to no tenant, oldest first."""
    query = select(deposits).where(d.status == "unlinked").order_by(d.block_number, d.log_index)
    if chain is not None:
        query = query.where(d.chain == chain)
    return [deposit_from_row(row) for row in conn.execute(query)]


def deposit_from_row(row: Row[Any]) -> Deposit:
    return Deposit(chain=row.chain, tx_hash=row.tx_hash, log_index=row.log_index,
                   position=row.tx_log_position, block_number=row.block_number,
                   sender=row.sender, recipient=row.recipient,
                   token=row.token_address, amount=row.amount)


def _write_credited_row(conn: Connection, deposit: Deposit, deposit_id: str, tenant: str,
                        at: datetime) -> None:
    credited = {"status": "credited", "tenant": tenant, "transfer_id": f"deposit:{deposit_id}",
                "credited_at": at}
    if ops.insert_ignore(conn, deposits, _row(deposit, at, **credited)):
        return
    # Kept as unlinked earlier (sync saw it before the sender was linked): claim it now.
    conn.execute(update(deposits).where(d.id == deposit_id, d.status == "unlinked")
                 .values(**credited))


def _row(deposit: Deposit, at: datetime, **values: Any) -> dict[str, Any]:
    return {"id": deposit.id, "chain": deposit.chain, "tx_hash": deposit.tx_hash,
            "log_index": deposit.log_index, "tx_log_position": deposit.position,
            "block_number": deposit.block_number,
            "sender": deposit.sender, "recipient": deposit.recipient,
            "token_address": deposit.token, "amount": deposit.amount, "tenant": None,
            "transfer_id": None, "seen_at": at, "credited_at": None, **values}


def _refuse_other_owner(deposit: Deposit, owner: str, tenant: str) -> None:
    if owner != tenant:
        raise DepositClaimed(
            f"deposit {deposit.id} was already credited to tenant {owner}, not {tenant}; "
            "a transfer is credited once", deposit=deposit.id, tenant=owner,
        )

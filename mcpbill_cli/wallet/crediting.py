"""Recording deposits in the ledger: each step runs inside the caller's write transaction.

A deposit is credited at most once, keyed by (chain, tx hash, log index): the ``deposits`` row's
unique key and the transfer id ``deposit:<deposit id>`` both say so, and the transfer and the row
are written in the same transaction, so nothing is ever half-credited.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, select, update

from mcpbill_cli.errors import IdempotencyConflict, InvalidInput
from mcpbill_cli.ledger import audit, ops
from mcpbill_cli.ledger.models import deposits, wallet_links
from mcpbill_cli.wallet.errors import DepositClaimed

d = deposits.c
_TENANT = re.compile(r"[^\s/]{1,100}")


@dataclass(frozen=True)
class Deposit:
    """One USDC ``Transfer`` log to the deposit address; ``amount`` is micro-USDC."""

    chain: str  # CAIP-2
    tx_hash: str  # lowercase 0x
    log_index: int
    block_number: int
    sender: str  # lowercase 0x
    recipient: str
    token: str
    amount: int

    @property
    def id(self) -> str:
        return f"{self.chain}:{self.tx_hash}:{self.log_index}"

    @property
    def transfer_id(self) -> str:
        return f"deposit:{self.id}"


@dataclass(frozen=True)
class Credit:
    """A deposit credited to a tenant by this call."""

    deposit: Deposit
    tenant: str


def check_tenant(tenant: str) -> str:
    """A tenant name as the ledger keys it: 1 to 100 characters, no spaces or slashes."""
    if not _TENANT.fullmatch(tenant):
        raise InvalidInput(f"tenant {tenant!r} is not a valid name: use 1 to 100 characters "
                           "without spaces or slashes", field="tenant")
    return tenant


def credited_tenant(conn: Connection, deposit_id: str) -> str | None:
    """The tenant a deposit was credited to, or ``None`` if it is unknown or unlinked."""
    return conn.execute(select(d.tenant).where(d.id == deposit_id, d.status == "credited")
                        ).scalar_one_or_none()


def credit_deposit(conn: Connection, deposit: Deposit, tenant: str, at: datetime) -> bool:
    """Credit ``deposit`` to ``tenant``; False if it already was. Refuses another tenant's."""
    owner = credited_tenant(conn, deposit.id)
    if owner is not None:
        _refuse_other_owner(deposit, owner, tenant)
        return False
    ops.ensure_account(conn, ops.chain_account(deposit.chain), kind="chain", guarded=False, at=at)
    ops.ensure_account(conn, ops.tenant_account(tenant), kind="tenant", guarded=True, at=at)
    try:
        posted = ops.transfer(conn, id=deposit.transfer_id, debit=ops.chain_account(deposit.chain),
                              credit=ops.tenant_account(tenant), amount=deposit.amount,
                              code="deposit", at=at, ref=deposit.id)
    except IdempotencyConflict:
        # A concurrent credit to another tenant committed between our read and our write.
        _refuse_other_owner(deposit, credited_tenant(conn, deposit.id) or "?", tenant)
        raise
    if posted:
        _write_credited_row(conn, deposit, tenant, at)
        audit.record(conn, "deposit", at=at, tenant=tenant, amount=deposit.amount,
                     ref=deposit.id)
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
                   block_number=row.block_number, sender=row.sender, recipient=row.recipient,
                   token=row.token_address, amount=row.amount)


def _write_credited_row(conn: Connection, deposit: Deposit, tenant: str, at: datetime) -> None:
    credited = {"status": "credited", "tenant": tenant, "transfer_id": deposit.transfer_id,
                "credited_at": at}
    if ops.insert_ignore(conn, deposits, _row(deposit, at, **credited)):
        return
    # Kept as unlinked earlier (sync saw it before the sender was linked): claim it now.
    conn.execute(update(deposits).where(d.id == deposit.id, d.status == "unlinked")
                 .values(**credited))


def _row(deposit: Deposit, at: datetime, **values: Any) -> dict[str, Any]:
    return {"id": deposit.id, "chain": deposit.chain, "tx_hash": deposit.tx_hash,
            "log_index": deposit.log_index, "block_number": deposit.block_number,
            "sender": deposit.sender, "recipient": deposit.recipient,
            "token_address": deposit.token, "amount": deposit.amount, "tenant": None,
            "transfer_id": None, "seen_at": at, "credited_at": None, **values}


def _refuse_other_owner(deposit: Deposit, owner: str, tenant: str) -> None:
    if owner != tenant:
        raise DepositClaimed(
            f"deposit {deposit.id} was already credited to tenant {owner}, not {tenant}; "
            "a transfer is credited once", deposit=deposit.id, tenant=owner,
        )

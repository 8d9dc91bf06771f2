"""The x402 payments a server accepted, one row per EIP-3009 authorization.

The row's key is the authorization (``network:asset:payer:nonce``), so the database, not
Python, decides which replica gets to settle it: :func:`reserve` is one INSERT (or one
conditional UPDATE of a row released earlier) in the caller's transaction, and every later
step is a conditional UPDATE from ``reserved``. Statuses:

- ``reserved``: verified and taken by one server; the tool may run;
- ``settled``: the transfer is on chain and the call is in the ledger (``call_id``, ``tx_hash``);
- ``failed``: settlement was refused or failed; nothing was charged; the row stays failed;
- ``released``: the tool failed before settlement: nothing moved, the authorization is free.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select, update

from mcpbill_cli.ledger import ops
from mcpbill_cli.ledger.models import x402_payments

p = x402_payments.c
MAX_ERROR_LENGTH = 500


@dataclass(frozen=True)
class Payment:
    """One accepted authorization and what became of it. ``amount`` is micro-USDC."""

    id: str
    status: str
    network: str
    asset: str
    payer: str
    nonce: str
    tenant: str
    agent: str
    tool: str
    amount: int
    valid_before: int
    request_hash: str
    call_id: str | None = None
    tx_hash: str | None = None
    error: str | None = None
    reserved_at: datetime | None = None


def payment_id(network: str, asset: str, payer: str, nonce: str) -> str:
    """The authorization's key: one nonce of one payer on one token of one chain."""
    return f"{network}:{asset.lower()}:{payer.lower()}:{nonce.lower()}"


def reserve(conn: Connection, payment: Payment, *, at: datetime) -> Payment | None:
    """Take ``payment`` for this call: ``None`` when it is taken, else the row that holds its
    key (reserved, settled or failed: the caller decides what that means)."""
    values = _values(payment, at)
    if ops.insert_ignore(conn, x402_payments, values):
        return None
    retaken = conn.execute(update(x402_payments).where(p.id == payment.id,
                                                        p.status == "released")
                           .values(**{k: v for k, v in values.items() if k != "id"})
                           .returning(p.id)).first()
    if retaken is not None:
        return None
    return find(conn, payment.id)


def find(conn: Connection, payment_id: str) -> Payment | None:
    row = conn.execute(select(x402_payments).where(p.id == payment_id)).first()
    return None if row is None else _payment(row)


def settled(conn: Connection, payment_id: str, *, call_id: str, tx_hash: str,
            at: datetime) -> bool:
    """``reserved`` -> ``settled`` with the ledger call and the transaction; False if the row
    was not reserved (another replica resolved it)."""
    return _resolve(conn, payment_id, "settled", at, call_id=call_id, tx_hash=tx_hash)


def failed(conn: Connection, payment_id: str, *, error: str, at: datetime,
           tx_hash: str | None = None) -> bool:
    """``reserved`` -> ``failed``: settlement did not happen; nothing is charged."""
    return _resolve(conn, payment_id, "failed", at, error=error[:MAX_ERROR_LENGTH],
                    tx_hash=tx_hash)


def released(conn: Connection, payment_id: str, *, at: datetime) -> bool:
    """``reserved`` -> ``released``: the tool failed, the authorization was never used."""
    return _resolve(conn, payment_id, "released", at)


def stale(conn: Connection, *, before: datetime) -> list[Payment]:
    """Payments still ``reserved`` since before ``before``: a server died while holding them."""
    query = (select(x402_payments).where(p.status == "reserved", p.reserved_at < before)
             .order_by(p.reserved_at))
    return [_payment(row) for row in conn.execute(query)]


def _resolve(conn: Connection, payment_id: str, status: str, at: datetime,
             **values: Any) -> bool:
    row = conn.execute(update(x402_payments)
                       .where(p.id == payment_id, p.status == "reserved")
                       .values(status=status, resolved_at=at, **values)
                       .returning(p.id)).first()
    return row is not None


def _values(payment: Payment, at: datetime) -> dict[str, Any]:
    return {"id": payment.id, "status": "reserved", "network": payment.network,
            "asset": payment.asset, "payer": payment.payer, "nonce": payment.nonce,
            "tenant": payment.tenant, "agent": payment.agent, "tool": payment.tool,
            "amount": payment.amount, "valid_before": payment.valid_before,
            "request_hash": payment.request_hash, "call_id": None, "tx_hash": None,
            "error": None, "reserved_at": at, "resolved_at": None}


def _payment(row: Any) -> Payment:
    return Payment(id=row.id, status=row.status, network=row.network, asset=row.asset,
                   payer=row.payer, nonce=row.nonce, tenant=row.tenant, agent=row.agent,
                   tool=row.tool, amount=row.amount, valid_before=row.valid_before,
                   request_hash=row.request_hash, call_id=row.call_id, tx_hash=row.tx_hash,
                   error=row.error, reserved_at=row.reserved_at)

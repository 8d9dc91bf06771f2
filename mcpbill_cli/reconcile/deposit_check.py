"""Deposits: the ``deposits`` rows against their ledger transfers, and with ``--onchain``
against the chain itself (each transaction re-read, each deposit address's balance).

Chain access comes from ``mcpbill_cli.wallet`` (web3, imported only when ``--onchain`` runs).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, Engine, and_, or_, select

from mcpbill_cli.errors import BillingError
from mcpbill_cli.ledger.models import deposits, transfers
from mcpbill_cli.money import format_usd
from mcpbill_cli.reconcile.collect import Findings
from mcpbill_cli.reconcile.model import ChainReader, Filters, Row, Window

d = deposits.c
t = transfers.c
MISMATCH = "deposit_mismatch"
DEMO_CHAIN = "chain:demo"


def check_deposits(conn: Connection, window: Window, chain_accounts: Iterable[str],
                   filters: Filters, found: Findings) -> None:
    """Credited deposit rows match their transfers; chain deposit transfers have a row."""
    for row in conn.execute(_credited_with_transfers(window, filters)):
        problem = _credit_problem(row)
        if problem:
            found.add(MISMATCH, Row("deposits", row.id, problem))
    for account in sorted(set(chain_accounts) - {DEMO_CHAIN}):
        for row in conn.execute(_transfers_without_rows(window, account)):
            if filters.admits(row.credit_account_id.removeprefix("tenant:"), None):
                found.add(MISMATCH, Row("transfers", row.id, f"deposit of "
                                        f"{format_usd(row.amount)} to {row.credit_account_id} "
                                        "has no deposit row"))
    for row in conn.execute(_unlinked(window)):
        found.add("deposit_unlinked", Row("deposits", row.id, f"{format_usd(row.amount)} USDC "
                                          f"from {row.sender}: `mcpbill wallet link` it"))


def _credited_with_transfers(window: Window, filters: Filters) -> Any:
    query = (select(d.id, d.chain, d.tenant, d.amount, d.transfer_id, t.id.label("moved"),
                    t.amount.label("moved_amount"), t.debit_account_id, t.credit_account_id,
                    t.code)
             .select_from(deposits.outerjoin(transfers, t.id == d.transfer_id))
             .where(d.status == "credited", d.credited_at >= window.start,
                    d.credited_at < window.end).order_by(d.credited_at, d.id))
    return query if filters.tenant is None else query.where(d.tenant == filters.tenant)


def _credit_problem(row: Any) -> str | None:
    if row.moved is None:
        return f"credited to {row.tenant} but transfer {row.transfer_id} does not exist"
    expected = (f"chain:{row.chain}", f"tenant:{row.tenant}", row.amount, "deposit")
    actual = (row.debit_account_id, row.credit_account_id, row.moved_amount, row.code)
    if actual != expected:
        return (f"deposit of {format_usd(row.amount)} to {row.tenant}, but {row.moved} moved "
                f"{format_usd(row.moved_amount)} from {row.debit_account_id} to "
                f"{row.credit_account_id}")
    return None


def _transfers_without_rows(window: Window, account: str) -> Any:
    return (select(t.id, t.amount, t.credit_account_id)
            .select_from(transfers.outerjoin(deposits, d.transfer_id == t.id))
            .where(t.debit_account_id == account, t.code == "deposit", d.id.is_(None),
                   t.created_at >= window.start, t.created_at < window.end)
            .order_by(t.created_at, t.id))


def _unlinked(window: Window) -> Any:
    return select(d.id, d.amount, d.sender).where(
        d.status == "unlinked", d.seen_at >= window.start, d.seen_at < window.end
    ).order_by(d.seen_at, d.id)


def check_onchain(engine: Engine, conn: Connection, window: Window, filters: Filters,
                  reader: ChainReader, found: Findings) -> None:
    """Re-read each deposit of the window on its chain; compare each deposit address's USDC."""
    from mcpbill_cli.wallet.balances import chain_balance

    rows = conn.execute(_window_deposits(window, filters)).all()
    connections: dict[str, tuple[Any, Any]] = {}
    for row in rows:
        if row.chain not in connections:
            connections[row.chain] = reader(row.chain)
        _check_transaction(row, *connections[row.chain], found)
    for chain_id, recipient in sorted({(row.chain, row.recipient) for row in rows}):
        chain, rpc = connections[chain_id]
        balance = chain_balance(engine, rpc, chain, recipient)
        if balance.unaccounted:
            found.add("deposit_address_balance_differs", Row(
                "deposits", f"{chain_id}:{recipient}",
                f"{format_usd(balance.onchain)} USDC on chain, "
                f"{format_usd(balance.credited + balance.unlinked)} recorded"))


def _window_deposits(window: Window, filters: Filters) -> Any:
    in_window = or_(and_(d.credited_at >= window.start, d.credited_at < window.end),
                    and_(d.credited_at.is_(None), d.seen_at >= window.start,
                         d.seen_at < window.end))
    query = select(deposits).where(in_window).order_by(d.chain, d.block_number, d.log_index)
    return query if filters.tenant is None else query.where(d.tenant == filters.tenant)


def _check_transaction(row: Any, chain: Any, rpc: Any, found: Findings) -> None:
    from mcpbill_cli.wallet.deposits import verify_deposit
    from mcpbill_cli.wallet.errors import ChainInconsistent, TxPending

    try:
        onchain = verify_deposit(rpc, chain, row.tx_hash, row.recipient)
    except (TxPending, ChainInconsistent) as exc:
        found.add("deposit_unconfirmed", Row("deposits", row.id, exc.message))
        return
    except BillingError as exc:
        if exc.code in ("RPC_UNAVAILABLE", "WRONG_CHAIN"):
            raise
        found.add("deposit_not_on_chain", Row("deposits", row.id, exc.message))
        return
    _compare(row, onchain, found)


def _compare(row: Any, onchain: list[Any], found: Findings) -> None:
    """The chain's transfer at the row's place in the transaction, against the row: gone,
    changed (amount or sender), or moved (another block or log index, as a reorg re-mines)."""
    now = _same_place(row, onchain)
    if now is None:
        found.add("deposit_not_on_chain", Row("deposits", row.id, (
            f"the ledger has {format_usd(row.amount)} from {row.sender} at "
            f"{_place(row.log_index, row.tx_log_position)}; the "
            "transaction moved " + ", ".join(f"{format_usd(dep.amount)} from {dep.sender} at "
                                             f"{_place(dep.log_index, dep.position)}"
                                             for dep in onchain))))
    elif (now.amount, now.sender) != (row.amount, row.sender):
        found.add("deposit_changed", Row("deposits", row.id, (
            f"the ledger has {format_usd(row.amount)} from {row.sender}; on chain that "
            f"transfer is {format_usd(now.amount)} from {now.sender}")))
    elif (now.block_number, now.log_index) != (row.block_number, row.log_index):
        found.add("deposit_moved", Row("deposits", row.id, (
            f"credited from block {row.block_number} log {row.log_index}; the transaction is "
            f"now in block {now.block_number} log {now.log_index} (re-mined by a reorg): "
            "still one deposit")))


def _same_place(row: Any, onchain: list[Any]) -> Any:
    """The on-chain transfer at the row's position in the transaction. A row from before
    schema 0010 has no position: the transfer at its log index, else one of the same sender
    and amount (as ``wallet/crediting.py`` adopts such rows)."""
    if row.tx_log_position is not None:
        return next((dep for dep in onchain if dep.position == row.tx_log_position), None)
    same = [dep for dep in onchain if (dep.sender, dep.amount) == (row.sender, row.amount)]
    at_index = [dep for dep in onchain if dep.log_index == row.log_index]
    return next(iter(at_index or same), None)


def _place(log_index: int, position: int | None) -> str:
    return f"log {log_index}" + ("" if position is None else f" (#{position} in the tx)")

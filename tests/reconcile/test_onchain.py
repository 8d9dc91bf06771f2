"""`--onchain`: each deposit re-read on a real EVM (eth-tester), and the deposit address's
balance compared with what the ledger recorded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from mcpbill_cli.wallet.deposits import fund_from_tx
from tests.wallet.devnet import Devnet

from .support import USDC, Ledger, rows_of, small_ledger


def deposit(engine: Engine, net: Devnet, ledger: Ledger, amount: int) -> str:
    tx = net.pay(net.alice, amount)
    net.mine(3)
    result = fund_from_tx(engine, net.w3, net.chain, "acme", tx, net.deposit_address,
                          at=ledger.clock())
    return result.credited[0].id


def reader(net: Devnet) -> Any:
    return lambda caip2: (net.chain, net.w3)


def test_deposits_that_match_the_chain_are_clean(engine: Engine, tmp_path: Path,
                                                 devnet: Devnet) -> None:
    ledger = small_ledger(engine, tmp_path / "keys")
    deposit(engine, devnet, ledger, 12 * USDC)
    report = ledger.reconcile(onchain=reader(devnet))
    assert rows_of(report) == []
    assert report.checks[-1] == "onchain"
    assert report.totals["tenant"]["acme"].deposited == 112 * USDC


def test_a_deposit_inflated_in_the_ledger_is_reported_changed(engine: Engine, tmp_path: Path,
                                                          devnet: Devnet) -> None:
    ledger = small_ledger(engine, tmp_path / "keys")
    credited = deposit(engine, devnet, ledger, 12 * USDC)
    chain_account = f"chain:{devnet.chain.caip2}"
    ledger.sql("UPDATE deposits SET amount = amount + 1000000 WHERE id = :d", d=credited)
    ledger.sql("UPDATE transfers SET amount = amount + 1000000 WHERE id = :t",
               t=f"deposit:{credited}")
    ledger.sql("UPDATE accounts SET debits_posted = debits_posted + 1000000 WHERE id = :a",
               a=chain_account)
    ledger.sql("UPDATE accounts SET credits_posted = credits_posted + 1000000 "
               "WHERE id = 'tenant:acme'")
    # The books balance; the deposit's sealed event still says what came in.
    event = ("event_transfer_mismatch", "error", [f"transfers/deposit:{credited}"])
    assert rows_of(ledger.reconcile()) == [event]
    report = ledger.reconcile(onchain=reader(devnet))
    assert rows_of(report) == [
        ("deposit_changed", "error", [f"deposits/{credited}"]),
        ("deposit_address_balance_differs", "warning",
         [f"deposits/{devnet.chain.caip2}:{devnet.deposit_address}"]), event]
    assert report.findings[1].rows[0].detail == "12.00 USDC on chain, 13.00 recorded"


def test_a_deposit_row_edited_apart_from_its_transfer(engine: Engine, tmp_path: Path,
                                                      devnet: Devnet) -> None:
    ledger = small_ledger(engine, tmp_path / "keys")
    credited = deposit(engine, devnet, ledger, 5 * USDC)
    ledger.sql("UPDATE deposits SET tenant = 'globex' WHERE id = :d", d=credited)
    assert rows_of(ledger.reconcile()) == [("deposit_mismatch", "error",
                                            [f"deposits/{credited}"])]
    ledger.sql("DELETE FROM deposits WHERE id = :d", d=credited)
    assert rows_of(ledger.reconcile()) == [("deposit_mismatch", "error",
                                            [f"transfers/deposit:{credited}"])]

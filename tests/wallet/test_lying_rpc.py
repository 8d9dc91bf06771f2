"""An RPC that lies, in front of a real anvil: heads that go back, blocks that vanish, receipts
that change between reads, and a reorg deeper than the confirmations that re-mines a credited
transfer elsewhere. Driven through the real `mcpbill wallet sync`, `wallet fund --tx` and
`reconcile --onchain`: a deposit is never credited twice or before its confirmations, and
reconcile says what changed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from typer.testing import CliRunner, Result
from web3 import Web3

from mcpbill_cli.cli import app
from mcpbill_cli.ledger.engine import make_engine, reading
from mcpbill_cli.ledger.models import deposits

from . import lying_rpc
from .devnet import USDC, Devnet, posted
from .lying_rpc import LyingRpc
from .test_cli import Invoke, add_chain, data, refusal

pytestmark = pytest.mark.slow


@pytest.fixture
def cli(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Invoke:
    """mcpbill in process on an initialized home and a fresh ledger (SQLite or PostgreSQL)."""
    runner = CliRunner()

    def invoke(*args: str) -> Result:
        return runner.invoke(app, list(args), catch_exceptions=False)

    monkeypatch.setenv("MCPBILL_DB_URL", db_url)
    assert invoke("init").exit_code == 0
    return invoke


@pytest.fixture
def liar(anvil_url: str) -> Iterator[LyingRpc]:
    with LyingRpc(anvil_url).running() as proxy:
        yield proxy


@pytest.fixture
def net(cli: Invoke, anvil_devnet: Devnet, liar: LyingRpc, isolated_home: Path) -> Devnet:
    """mcpbill reads the chain through the liar; alice is acme's wallet."""
    add_chain(isolated_home, anvil_devnet, liar.url)
    data(cli("wallet", "address", "--set", anvil_devnet.deposit_address, "--json"))
    data(cli("wallet", "link", "-t", "acme", "--address", anvil_devnet.alice, "--json"))
    return anvil_devnet


def funded(db_url: str) -> int:
    engine = make_engine(db_url)
    try:
        return posted(engine, "tenant:acme")
    finally:
        engine.dispose()


def deposit_rows(db_url: str) -> list[dict[str, Any]]:
    engine = make_engine(db_url)
    d = deposits.c
    try:
        with reading(engine) as conn:
            query = select(d.id, d.status, d.amount, d.block_number, d.log_index,
                           d.tx_log_position)
            return [dict(row._mapping) for row in conn.execute(query)]
    finally:
        engine.dispose()


def start_block(net: Devnet) -> str:
    return str(net.w3.eth.block_number + 1)


def test_a_head_that_lies_ahead_then_goes_back_credits_nothing_early(
        cli: Invoke, net: Devnet, liar: LyingRpc, db_url: str) -> None:
    start = start_block(net)
    tx = net.pay(net.alice, 5 * USDC)  # one confirmation of the two needed
    liar.lie("eth_blockNumber", lying_rpc.head_ahead(5))
    refusal(cli("wallet", "sync", "--from-block", start, "--json"), "CHAIN_INCONSISTENT")
    ahead = refusal(cli("wallet", "fund", "-t", "acme", "--tx", tx, "--json"),
                    "CHAIN_INCONSISTENT")
    assert "but it has no block" in ahead["message"]
    liar.lie("eth_blockNumber", lying_rpc.head_ahead(5, times=1))  # once ahead, then back
    said = refusal(cli("wallet", "sync", "--json"), "CHAIN_INCONSISTENT")
    assert "head went back" in said["message"]
    assert funded(db_url) == 0 and deposit_rows(db_url) == []

    liar.honest()
    assert data(cli("wallet", "sync", "--json"))["credited"] == []  # still one confirmation
    net.mine(1)
    synced = data(cli("wallet", "sync", "--json"))
    assert [c["amount_usd"] for c in synced["credited"]] == ["5.00"]
    assert data(cli("wallet", "sync", "--from-block", start, "--json"))["credited"] == []
    assert funded(db_url) == 5 * USDC


def test_a_block_that_vanishes_is_not_credited(cli: Invoke, net: Devnet, liar: LyingRpc,
                                               db_url: str) -> None:
    start = start_block(net)
    tx = net.pay(net.alice, 3 * USDC)
    net.mine(2)
    liar.lie("eth_getTransactionReceipt", lying_rpc.vanished)
    refusal(cli("wallet", "sync", "--from-block", start, "--json"), "CHAIN_INCONSISTENT")
    refusal(cli("wallet", "fund", "-t", "acme", "--tx", tx, "--json"), "TX_NOT_FOUND")
    liar.honest()
    liar.lie("eth_getBlockByNumber", lying_rpc.other_block_hash)
    refusal(cli("wallet", "sync", "--json"), "CHAIN_INCONSISTENT")
    refusal(cli("wallet", "fund", "-t", "acme", "--tx", tx, "--json"), "CHAIN_INCONSISTENT")
    assert funded(db_url) == 0 and deposit_rows(db_url) == []

    liar.honest()
    assert [c["amount_usd"] for c in data(cli("wallet", "sync", "--json"))["credited"]] == [
        "3.00"]
    assert funded(db_url) == 3 * USDC


@pytest.mark.parametrize("field", ["blockNumber", "logIndex", "amount"])
def test_a_receipt_that_changes_between_reads_is_not_credited(
        cli: Invoke, net: Devnet, liar: LyingRpc, db_url: str, field: str) -> None:
    start = start_block(net)
    tx = net.pay(net.alice, 2 * USDC)
    net.mine(2)
    liar.lie("eth_getTransactionReceipt", lying_rpc.changed_receipt(field))
    refusal(cli("wallet", "sync", "--from-block", start, "--json"), "CHAIN_INCONSISTENT")
    liar.lie("eth_getTransactionReceipt", lying_rpc.changed_receipt(field))
    refusal(cli("wallet", "fund", "-t", "acme", "--tx", tx, "--json"), "CHAIN_INCONSISTENT")
    assert funded(db_url) == 0 and deposit_rows(db_url) == []

    liar.honest()
    assert data(cli("wallet", "fund", "-t", "acme", "--tx", tx, "--json"))["amount_usd"] == "2.00"
    assert data(cli("wallet", "sync", "--json"))["credited"] == []
    assert funded(db_url) == 2 * USDC


def test_a_transfer_re_mined_elsewhere_after_a_deep_reorg_is_credited_once(
        cli: Invoke, net: Devnet, liar: LyingRpc, db_url: str) -> None:
    """The bug this keying fixes: keyed by the block-wide log index, the re-mined transfer (now
    the second log of its block) was a new deposit and was credited again."""
    snapshot = net.rpc("evm_snapshot")
    start = start_block(net)
    tx = net.pay(net.alice, 7 * USDC)
    raw = net.rpc("eth_getRawTransactionByHash", tx)
    net.mine(2)
    synced = data(cli("wallet", "sync", "--from-block", start, "--json"))
    assert [(c["amount_usd"], c["position"]) for c in synced["credited"]] == [("7.00", 0)]
    [before] = deposit_rows(db_url)

    assert net.rpc("evm_revert", snapshot) is True  # a reorg three blocks deep (> 2)
    net.mine(5)
    net.rpc("evm_setAutomine", False)
    first = {"from": net.bob, "gas": 100_000, "maxFeePerGas": 10**12,
             "maxPriorityFeePerGas": 10**11}  # a higher tip: mined ahead of the replayed tx
    net.usdc.functions.transfer(Web3.to_checksum_address(net.deposit_address),
                                1 * USDC).transact(first)  # type: ignore[arg-type]
    assert net.rpc("eth_sendRawTransaction", raw) == tx
    net.rpc("evm_mine")
    net.rpc("evm_setAutomine", True)
    receipt = net.w3.eth.get_transaction_receipt(tx)  # type: ignore[arg-type]
    assert receipt["logs"][0]["logIndex"] == 1
    assert receipt["blockNumber"] > before["block_number"]
    net.mine(2)

    again = data(cli("wallet", "sync", "--json"))
    assert again["credited"] == [] and [d["amount_usd"] for d in again["unlinked"]] == ["1.00"]
    assert funded(db_url) == 7 * USDC
    rows = {row["amount"]: row for row in deposit_rows(db_url)}
    assert rows[7 * USDC] == before and before["tx_log_position"] == 0

    report = cli("reconcile", "--from", datetime.now(UTC).date().isoformat(), "--onchain",
                 "--json")
    findings = {f["name"]: f for f in json.loads(report.stdout)["data"]["findings"]}
    [moved] = findings["deposit_moved"]["rows"]
    assert moved["key"] == before["id"]
    assert f"now in block {receipt['blockNumber']} log 1" in moved["detail"]
    assert "deposit_changed" not in findings and "deposit_not_on_chain" not in findings


def test_reconcile_onchain_reports_a_changed_amount_and_a_vanished_transfer(
        cli: Invoke, net: Devnet, liar: LyingRpc, db_url: str) -> None:
    tx = net.pay(net.alice, 4 * USDC)
    net.mine(2)
    data(cli("wallet", "fund", "-t", "acme", "--tx", tx, "--json"))
    [row] = deposit_rows(db_url)
    today = datetime.now(UTC).date().isoformat()

    def findings() -> dict[str, Any]:
        result = cli("reconcile", "--from", today, "--onchain", "--json")
        return {f["name"]: f["rows"] for f in json.loads(result.stdout)["data"]["findings"]}

    assert "deposit_changed" not in findings()
    liar.lie("eth_getTransactionReceipt", lying_rpc.changed_receipt("amount", after=0))
    [changed] = findings()["deposit_changed"]
    assert changed["key"] == row["id"]
    assert "on chain that transfer is 8.00 from" in changed["detail"]
    liar.lie("eth_getTransactionReceipt", lying_rpc.vanished)
    [gone] = findings()["deposit_not_on_chain"]
    assert gone["key"] == row["id"]
    liar.lie("eth_getTransactionReceipt", lying_rpc.changed_receipt("logIndex", after=1))
    [unsure] = findings()["deposit_unconfirmed"]
    assert "changed between two reads" in unsure["detail"]
    assert funded(db_url) == 4 * USDC

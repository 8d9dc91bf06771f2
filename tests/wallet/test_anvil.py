"""The same flows over JSON-RPC against anvil, plus a chain mismatch and reorganisations."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine

from mcpbill_cli.ledger.ops import tenant_account
from mcpbill_cli.wallet.balances import chain_balance
from mcpbill_cli.wallet.chains import resolve_chain
from mcpbill_cli.wallet.deposits import fund_from_tx
from mcpbill_cli.wallet.errors import (
    NotUsdc,
    TxNotFound,
    TxPending,
    TxReverted,
    WrongChain,
    WrongRecipient,
)
from mcpbill_cli.wallet.links import link
from mcpbill_cli.wallet.rpc import connect
from mcpbill_cli.wallet.scan import checkpoint, sync

from .devnet import USDC, Devnet, deposit_rows, ledger_rows, posted

pytestmark = pytest.mark.slow


def fund(engine: Engine, net: Devnet, tx: str, tenant: str = "acme"):  # type: ignore[no-untyped-def]
    return fund_from_tx(engine, net.w3, net.chain, tenant, tx, net.deposit_address)


def test_deposit_over_http_is_credited_once_and_refusals_hold(
    engine: Engine, anvil_devnet: Devnet
) -> None:
    net = anvil_devnet
    good = net.pay(net.alice, 25 * USDC)
    lookalike = net.pay(net.alice, 25 * USDC, token=net.lookalike)
    reverted = net.pay(net.alice, 5_000 * USDC)
    elsewhere = net.pay(net.alice, 1 * USDC, to=net.stranger)
    net.mine(net.chain.confirmations)

    assert [d.amount for d in fund(engine, net, good).credited] == [25 * USDC]
    assert fund(engine, net, good).already != []
    for tx, refusal in [(lookalike, NotUsdc), (reverted, TxReverted),
                        (elsewhere, WrongRecipient)]:
        with pytest.raises(refusal):
            fund(engine, net, tx)
    with pytest.raises(TxNotFound):
        fund(engine, net, "0x" + "cd" * 32)
    assert posted(engine, tenant_account("acme")) == 25 * USDC
    assert ledger_rows(engine) == {"deposits": 1, "transfers": 1, "sum": 0}


def test_a_transaction_in_the_mempool_is_pending_then_final(
    engine: Engine, anvil_devnet: Devnet
) -> None:
    net = anvil_devnet
    net.rpc("evm_setAutomine", False)
    tx = net.usdc.functions.transfer(net.w3.to_checksum_address(net.deposit_address),
                                     2 * USDC).transact({"from": net.alice, "gas": 100_000})

    with pytest.raises(TxPending) as mempool:
        fund(engine, net, tx.to_0x_hex())
    assert (mempool.value.confirmations, mempool.value.more_needed) == (0, 2)

    net.rpc("evm_mine")
    with pytest.raises(TxPending) as one:
        fund(engine, net, tx.to_0x_hex())
    assert one.value.more_needed == 1

    net.rpc("evm_mine")
    assert fund(engine, net, tx.to_0x_hex()).amount == 2 * USDC


def test_sync_over_http_credits_linked_and_keeps_unlinked(
    engine: Engine, anvil_devnet: Devnet
) -> None:
    net = anvil_devnet
    link(engine, "acme", net.alice)
    start = net.w3.eth.block_number + 1
    net.pay(net.alice, 3 * USDC)
    net.pay(net.bob, 4 * USDC)
    net.mine(50)
    net.pay(net.alice, 5 * USDC)
    net.mine(net.chain.confirmations - 1)

    result = sync(engine, net.w3, net.chain, net.deposit_address, from_block=start, batch=20)
    again = sync(engine, net.w3, net.chain, net.deposit_address)

    assert [c.deposit.amount for c in result.credited] == [3 * USDC, 5 * USDC]
    assert [d.amount for d in result.unlinked] == [4 * USDC]
    assert result.queries == 3 and again.credited == []
    balance = chain_balance(engine, net.w3, net.chain, net.deposit_address)
    assert (balance.onchain, balance.credited, balance.unlinked, balance.unaccounted) == (
        12 * USDC, 8 * USDC, 4 * USDC, 0)


def test_an_rpc_on_another_chain_is_refused(engine: Engine, anvil_url: str) -> None:
    base = resolve_chain("base", {"chains": {"base": {"rpc_url": anvil_url}}})
    with pytest.raises(WrongChain) as wrong:
        fund_from_tx(engine, connect(anvil_url), base, "acme", "0x" + "ab" * 32,
                     "0x" + "11" * 20)
    assert (wrong.value.details["expected"], wrong.value.details["actual"]) == (8453, 31337)
    with pytest.raises(WrongChain):
        sync(engine, connect(anvil_url), base, "0x" + "11" * 20, from_block=1)
    assert checkpoint(engine, base) is None


def test_a_deposit_lost_in_a_reorg_is_never_credited(
    engine: Engine, anvil_devnet: Devnet
) -> None:
    net = anvil_devnet
    link(engine, "acme", net.alice)
    start = net.w3.eth.block_number + 1
    sync(engine, net.w3, net.chain, net.deposit_address, from_block=start)
    snapshot = net.rpc("evm_snapshot")
    vanishing = net.pay(net.alice, 30 * USDC)  # 1 confirmation of 2: not final

    before = sync(engine, net.w3, net.chain, net.deposit_address)
    with pytest.raises(TxPending):
        fund(engine, net, vanishing)
    assert before.credited == [] and deposit_rows(engine) == []

    assert net.rpc("evm_revert", snapshot) is True  # the block with the deposit is gone
    net.mine(5)
    after = sync(engine, net.w3, net.chain, net.deposit_address)
    with pytest.raises(TxNotFound):
        fund(engine, net, vanishing)
    assert after.credited == [] and ledger_rows(engine)["deposits"] == 0

    replacement = net.pay(net.alice, 7 * USDC)  # the rerun after the reorg stays correct
    net.mine(net.chain.confirmations)
    final = sync(engine, net.w3, net.chain, net.deposit_address)
    assert [(c.deposit.tx_hash, c.deposit.amount) for c in final.credited] == [
        (replacement, 7 * USDC)]
    assert posted(engine, tenant_account("acme")) == 7 * USDC


def test_a_reorg_that_replaces_a_deposit_below_the_final_line_credits_the_survivor(
    engine: Engine, anvil_devnet: Devnet
) -> None:
    # Two forks at the same height: whichever holds once the block is final is the one credited.
    net = anvil_devnet
    link(engine, "acme", net.alice)
    start = net.w3.eth.block_number + 1
    snapshot = net.rpc("evm_snapshot")
    net.pay(net.alice, 11 * USDC)
    sync(engine, net.w3, net.chain, net.deposit_address, from_block=start)
    net.rpc("evm_revert", snapshot)
    survivor = net.pay(net.alice, 12 * USDC)
    net.mine(net.chain.confirmations)

    result = sync(engine, net.w3, net.chain, net.deposit_address)

    assert [(c.deposit.tx_hash, c.deposit.amount) for c in result.credited] == [
        (survivor, 12 * USDC)]
    assert posted(engine, tenant_account("acme")) == 12 * USDC

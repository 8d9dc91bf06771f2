"""`wallet sync` and `wallet link` on an in-process EVM: checkpoints, finality, linked senders."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine

from mcpbill_cli.clock import utcnow
from mcpbill_cli.errors import AlreadyExists
from mcpbill_cli.ledger.engine import writing
from mcpbill_cli.ledger.models import wallet_links
from mcpbill_cli.ledger.ops import tenant_account
from mcpbill_cli.wallet.deposits import fund_from_tx
from mcpbill_cli.wallet.errors import NoCheckpoint
from mcpbill_cli.wallet.links import link
from mcpbill_cli.wallet.rpc import LogQueryRefused, Rpc
from mcpbill_cli.wallet.scan import block_ranges, checkpoint, sync

from .devnet import USDC, Devnet, deposit_rows, ledger_rows, posted


class RecordingRpc(Rpc):
    """The real RPC, remembering which block ranges were asked for (and refusing big ones)."""

    def __init__(self, w3: Any, *, max_range: int | None = None) -> None:
        super().__init__(w3)
        self.ranges: list[tuple[int, int]] = []
        self.max_range = max_range

    def transfer_logs(self, token: str, recipient: str, first: int, last: int) -> list[Any]:
        self.ranges.append((first, last))
        if self.max_range is not None and last - first + 1 > self.max_range:
            raise LogQueryRefused("query returned more than 10000 results")
        return super().transfer_logs(token, recipient, first, last)


def run_sync(engine: Engine, net: Devnet, rpc: Rpc | None = None, **options: Any) -> Any:
    return sync(engine, rpc or net.w3, net.chain, net.deposit_address, **options)


def test_block_ranges_are_bounded_and_contiguous() -> None:
    assert list(block_ranges(10, 25, 7)) == [(10, 16), (17, 23), (24, 25)]
    assert list(block_ranges(10, 9, 7)) == []


@pytest.mark.slow
def test_sync_over_hundreds_of_blocks_resumes_from_its_checkpoint(
    engine: Engine, devnet: Devnet
) -> None:
    link(engine, "acme", devnet.alice)
    start = devnet.w3.eth.block_number + 1
    for n in range(1, 5):  # deposits spread over ~400 blocks, with noise around them
        devnet.pay(devnet.alice, n * USDC)
        devnet.pay(devnet.bob, 10 * USDC)
        devnet.pay(devnet.alice, 99 * USDC, token=devnet.lookalike)
        devnet.pay(devnet.alice, 99 * USDC, to=devnet.stranger)
        devnet.mine(100)
    rpc = RecordingRpc(devnet.w3)
    progress: list[tuple[int, int]] = []

    first = run_sync(engine, devnet, rpc, from_block=start, batch=150,
                     progress=lambda done, total: progress.append((done, total)))

    final = devnet.w3.eth.block_number - devnet.chain.confirmations + 1
    assert [c.deposit.amount for c in first.credited] == [1 * USDC, 2 * USDC, 3 * USDC, 4 * USDC]
    assert {c.tenant for c in first.credited} == {"acme"}
    assert [d.amount for d in first.new_unlinked] == [10 * USDC] * 4
    assert first.unlinked == first.new_unlinked
    assert (first.from_block, first.to_block) == (start, final)
    assert checkpoint(engine, devnet.chain) == final
    assert rpc.ranges == list(block_ranges(start, final, 150))
    assert progress[0] == (0, final - start + 1) and progress[-1] == (final - start + 1,) * 2
    assert posted(engine, tenant_account("acme")) == 10 * USDC

    devnet.pay(devnet.alice, 5 * USDC)
    devnet.mine(devnet.chain.confirmations - 1)
    rpc.ranges.clear()
    second = run_sync(engine, devnet, rpc, batch=150)

    assert rpc.ranges[0][0] == final + 1  # resumed from the checkpoint, never from block 0
    assert [c.deposit.amount for c in second.credited] == [5 * USDC]
    assert second.new_unlinked == [] and len(second.unlinked) == 4

    third = run_sync(engine, devnet, rpc)
    rescan = run_sync(engine, devnet, rpc, from_block=start, batch=1000)
    assert third.credited == rescan.credited == [] and rescan.new_unlinked == []
    assert posted(engine, tenant_account("acme")) == 15 * USDC
    assert ledger_rows(engine) == {"deposits": 9, "transfers": 5, "sum": 0}
    assert checkpoint(engine, devnet.chain) == second.to_block


def test_first_sync_without_a_starting_block_is_refused(engine: Engine, devnet: Devnet) -> None:
    with pytest.raises(NoCheckpoint, match="--from-block"):
        run_sync(engine, devnet)
    assert checkpoint(engine, devnet.chain) is None


def test_blocks_without_enough_confirmations_are_not_scanned(
    engine: Engine, devnet: Devnet
) -> None:
    link(engine, "acme", devnet.alice)
    start = devnet.w3.eth.block_number + 1
    devnet.pay(devnet.alice, 4 * USDC)
    block = devnet.w3.eth.block_number

    early = run_sync(engine, devnet, from_block=start)
    assert early.credited == [] and early.to_block < block
    assert ledger_rows(engine)["deposits"] == 0

    devnet.mine(devnet.chain.confirmations - 1)
    late = run_sync(engine, devnet)
    assert [c.deposit.amount for c in late.credited] == [4 * USDC]
    assert late.to_block == block


def test_linking_a_sender_later_credits_its_kept_deposits_once(
    engine: Engine, devnet: Devnet
) -> None:
    start = devnet.w3.eth.block_number + 1
    devnet.pay(devnet.bob, 6 * USDC)
    devnet.mine(3)
    kept = run_sync(engine, devnet, from_block=start)
    assert [d.amount for d in kept.unlinked] == [6 * USDC]
    assert deposit_rows(engine)[0]["status"] == "unlinked"
    assert deposit_rows(engine)[0]["tenant"] is None

    linked = link(engine, "globex", devnet.bob)
    again = run_sync(engine, devnet)

    assert [c.deposit.amount for c in linked.credited] == [6 * USDC]
    assert again.credited == [] and again.unlinked == []
    assert posted(engine, tenant_account("globex")) == 6 * USDC
    assert deposit_rows(engine)[0]["status"] == "credited"
    assert ledger_rows(engine) == {"deposits": 1, "transfers": 1, "sum": 0}


def test_sync_credits_a_kept_deposit_once_its_sender_is_linked(
    engine: Engine, devnet: Devnet
) -> None:
    start = devnet.w3.eth.block_number + 1
    devnet.pay(devnet.bob, 6 * USDC)
    devnet.mine(3)
    run_sync(engine, devnet, from_block=start)
    with writing(engine) as conn:  # linked by another process, after that sync read its links
        conn.execute(wallet_links.insert().values(address=devnet.bob.lower(), tenant="globex",
                                                  created_at=utcnow()))
    result = run_sync(engine, devnet)
    assert [(c.tenant, c.deposit.amount) for c in result.credited] == [("globex", 6 * USDC)]


def test_kept_deposit_can_be_funded_by_tx_hash(engine: Engine, devnet: Devnet) -> None:
    start = devnet.w3.eth.block_number + 1
    tx = devnet.pay(devnet.bob, 8 * USDC)
    devnet.mine(3)
    run_sync(engine, devnet, from_block=start)

    result = fund_from_tx(engine, devnet.w3, devnet.chain, "initech", tx, devnet.deposit_address)

    assert [d.amount for d in result.credited] == [8 * USDC]
    assert deposit_rows(engine)[0]["status"] == "credited"
    assert run_sync(engine, devnet).unlinked == []


def test_sync_leaves_a_deposit_funded_to_another_tenant_alone(
    engine: Engine, devnet: Devnet
) -> None:
    start = devnet.w3.eth.block_number + 1
    tx = devnet.pay(devnet.alice, 8 * USDC)
    devnet.mine(3)
    fund_from_tx(engine, devnet.w3, devnet.chain, "acme", tx, devnet.deposit_address)
    link(engine, "globex", devnet.alice)

    result = run_sync(engine, devnet, from_block=start)

    assert result.credited == []
    assert posted(engine, tenant_account("acme")) == 8 * USDC
    assert posted(engine, tenant_account("globex")) == 0


def test_a_node_that_refuses_large_ranges_gets_smaller_ones(
    engine: Engine, devnet: Devnet
) -> None:
    link(engine, "acme", devnet.alice)
    start = devnet.w3.eth.block_number + 1
    for _ in range(3):
        devnet.pay(devnet.alice, 1 * USDC)
        devnet.mine(30)
    rpc = RecordingRpc(devnet.w3, max_range=25)

    result = run_sync(engine, devnet, rpc, from_block=start, batch=100)

    assert [c.deposit.amount for c in result.credited] == [1 * USDC] * 3
    assert max(last - first + 1 for first, last in rpc.ranges) == result.blocks
    assert result.queries == len(rpc.ranges) > 2


def test_an_address_linked_to_one_tenant_is_not_silently_moved(
    engine: Engine, devnet: Devnet
) -> None:
    first = link(engine, "acme", devnet.alice)
    same = link(engine, "acme", devnet.alice.upper().replace("0X", "0x"))
    with pytest.raises(AlreadyExists, match="--replace"):
        link(engine, "globex", devnet.alice)
    moved = link(engine, "globex", devnet.alice, replace=True)

    assert first.changed and not same.changed
    assert (moved.previous, moved.tenant) == ("acme", "globex")

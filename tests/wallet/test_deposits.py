"""`wallet fund --tx`: one transaction verified on an in-process EVM and credited once."""

from __future__ import annotations

import dataclasses

import pytest
from sqlalchemy import Engine
from web3 import Web3

from mcpbill_cli.errors import ConfigInvalid
from mcpbill_cli.ledger.ops import chain_account, tenant_account
from mcpbill_cli.wallet.deposits import fund_from_tx, verify_deposit
from mcpbill_cli.wallet.errors import (
    DepositClaimed,
    NotUsdc,
    TxNotFound,
    TxPending,
    TxReverted,
    WrongChain,
    WrongRecipient,
)

from .devnet import USDC, Devnet, deposit_rows, ledger_rows, posted


def fund(engine: Engine, net: Devnet, tx: str, tenant: str = "acme"):  # type: ignore[no-untyped-def]
    return fund_from_tx(engine, net.w3, net.chain, tenant, tx, net.deposit_address)


def test_good_deposit_is_credited_exactly_once_with_the_exact_amount(
    engine: Engine, devnet: Devnet
) -> None:
    tx = devnet.pay(devnet.alice, 12_345_678)
    devnet.mine(2)

    first = fund(engine, devnet, tx)
    again = fund(engine, devnet, tx)

    assert [d.amount for d in first.credited] == [12_345_678] and first.already == []
    assert again.credited == [] and again.already == first.credited
    assert posted(engine, tenant_account("acme")) == 12_345_678
    assert posted(engine, chain_account(devnet.chain.caip2)) == -12_345_678
    deposit = first.credited[0]
    assert deposit.sender == devnet.alice.lower()
    assert deposit.id == f"{devnet.chain.caip2}:{tx}:p0" and deposit.position == 0
    assert deposit_rows(engine) == [{
        "id": deposit.id, "status": "credited", "tenant": "acme", "amount": 12_345_678,
        "sender": devnet.alice.lower(), "transfer_id": f"deposit:{deposit.id}"}]
    assert ledger_rows(engine) == {"deposits": 1, "transfers": 1, "sum": 0}


def test_tx_hash_is_accepted_in_upper_case_and_credited_once(
    engine: Engine, devnet: Devnet
) -> None:
    tx = devnet.pay(devnet.alice, 5 * USDC)
    devnet.mine(2)
    fund(engine, devnet, tx)
    assert fund(engine, devnet, "0x" + tx[2:].upper()).credited == []
    assert posted(engine, tenant_account("acme")) == 5 * USDC


def test_lookalike_token_is_refused(engine: Engine, devnet: Devnet) -> None:
    tx = devnet.pay(devnet.alice, 100 * USDC, token=devnet.lookalike)
    devnet.mine(5)

    with pytest.raises(NotUsdc) as refused:
        fund(engine, devnet, tx)

    assert refused.value.details["token"] == devnet.lookalike.address.lower()
    assert refused.value.details["reason"] == "other_token"
    assert ledger_rows(engine) == {"deposits": 0, "transfers": 0, "sum": 0}


def test_reverted_transaction_is_refused(engine: Engine, devnet: Devnet) -> None:
    tx = devnet.pay(devnet.alice, 5_000 * USDC)  # more than alice holds; fixed gas, so it mines
    devnet.mine(5)

    with pytest.raises(TxReverted):
        fund(engine, devnet, tx)
    assert ledger_rows(engine)["deposits"] == 0


def test_usdc_to_another_address_is_refused(engine: Engine, devnet: Devnet) -> None:
    tx = devnet.pay(devnet.alice, 7 * USDC, to=devnet.stranger)
    devnet.mine(5)

    with pytest.raises(WrongRecipient) as refused:
        fund(engine, devnet, tx)
    assert refused.value.details["recipient"] == devnet.stranger.lower()
    assert ledger_rows(engine)["deposits"] == 0


def test_plain_ether_transfer_is_not_usdc(engine: Engine, devnet: Devnet) -> None:
    to = Web3.to_checksum_address(devnet.deposit_address)
    tx = devnet.w3.eth.send_transaction({"from": devnet.alice, "to": to, "value": 10**18})
    devnet.w3.eth.wait_for_transaction_receipt(tx)
    devnet.mine(5)
    with pytest.raises(NotUsdc) as refused:
        fund(engine, devnet, tx.to_0x_hex())
    assert refused.value.details["reason"] == "no_usdc_transfer"


def test_too_few_confirmations_then_enough(engine: Engine, devnet: Devnet) -> None:
    tx = devnet.pay(devnet.alice, 3 * USDC)  # mined in the latest block: 1 confirmation of 3

    with pytest.raises(TxPending) as pending:
        fund(engine, devnet, tx)
    assert pending.value.to_dict() | {"message": ""} == {
        "code": "TX_PENDING", "message": "", "confirmations": 1, "required": 3,
        "more_needed": 2, "tx": tx, "chain": devnet.chain.caip2}
    assert "2 more block" in pending.value.message
    assert ledger_rows(engine)["deposits"] == 0

    devnet.mine(1)
    with pytest.raises(TxPending) as still:
        fund(engine, devnet, tx)
    assert still.value.more_needed == 1

    devnet.mine(1)
    assert fund(engine, devnet, tx).amount == 3 * USDC


def test_unknown_transaction_is_not_found(engine: Engine, devnet: Devnet) -> None:
    with pytest.raises(TxNotFound):
        fund(engine, devnet, "0x" + "ab" * 32)


def test_same_transfer_for_another_tenant_is_refused(engine: Engine, devnet: Devnet) -> None:
    tx = devnet.pay(devnet.alice, 9 * USDC)
    devnet.mine(2)
    fund(engine, devnet, tx, tenant="acme")

    with pytest.raises(DepositClaimed) as claimed:
        fund(engine, devnet, tx, tenant="globex")

    assert claimed.value.details["tenant"] == "acme"
    assert posted(engine, tenant_account("globex")) == 0
    assert posted(engine, tenant_account("acme")) == 9 * USDC


def test_rpc_on_another_chain_is_refused_before_anything_is_read(
    engine: Engine, devnet: Devnet
) -> None:
    tx = devnet.pay(devnet.alice, 9 * USDC)
    devnet.mine(2)
    base_like = dataclasses.replace(devnet.chain, name="base", caip2="eip155:8453")

    with pytest.raises(WrongChain) as wrong:
        fund_from_tx(engine, devnet.w3, base_like, "acme", tx, devnet.deposit_address)

    assert wrong.value.details["expected"] == 8453
    assert wrong.value.details["actual"] == devnet.w3.eth.chain_id
    assert ledger_rows(engine)["deposits"] == 0


def test_configured_usdc_that_is_not_a_six_decimal_token_is_refused(devnet: Devnet) -> None:
    not_a_token = dataclasses.replace(devnet.chain, usdc=devnet.stranger.lower())
    tx = devnet.pay(devnet.alice, 1 * USDC)
    with pytest.raises(ConfigInvalid, match="not a 6-decimal token"):
        verify_deposit(devnet.w3, not_a_token, tx, devnet.deposit_address)


def test_lookalike_configured_as_usdc_does_not_credit_real_usdc(devnet: Devnet) -> None:
    # The check is the emitting contract, not the token's name or symbol (both are equal here).
    swapped = dataclasses.replace(devnet.chain, usdc=devnet.lookalike.address.lower())
    tx = devnet.pay(devnet.alice, 1 * USDC)
    devnet.mine(5)
    with pytest.raises(NotUsdc):
        verify_deposit(devnet.w3, swapped, tx, devnet.deposit_address)

"""The test USDC itself: six decimals, and EIP-3009 transfers that a deposit check accepts."""

from __future__ import annotations

import os
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from sqlalchemy import Engine
from web3 import Web3

from mcpbill_cli.wallet.deposits import fund_from_tx

from .devnet import USDC, Devnet

TRANSFER_WITH_AUTHORIZATION_TYPEHASH = (
    "0x7c7c6cdb67a18743f49ec6fa9b35f50d52ed05cbed4cc592e13b44501c1a2267")
AUTHORIZATION_FIELDS = [
    {"name": "from", "type": "address"}, {"name": "to", "type": "address"},
    {"name": "value", "type": "uint256"}, {"name": "validAfter", "type": "uint256"},
    {"name": "validBefore", "type": "uint256"}, {"name": "nonce", "type": "bytes32"},
]
DOMAIN_FIELDS = [
    {"name": "name", "type": "string"}, {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"}, {"name": "verifyingContract", "type": "address"},
]


def typed_data(net: Devnet, message: dict[str, Any], name: str = "USD Coin") -> dict[str, Any]:
    return {
        "types": {"EIP712Domain": DOMAIN_FIELDS, "TransferWithAuthorization": AUTHORIZATION_FIELDS},
        "primaryType": "TransferWithAuthorization",
        "domain": {"name": name, "version": "2", "chainId": net.w3.eth.chain_id,
                   "verifyingContract": net.usdc.address},
        "message": message,
    }


def authorization(net: Devnet, signer: Any, amount: int, *, name: str = "USD Coin",
                  nonce: bytes | None = None) -> tuple[Any, ...]:
    """An EIP-3009 TransferWithAuthorization to the deposit address, signed like x402 does."""
    now = net.w3.eth.get_block("latest")["timestamp"]
    message = {"from": signer.address, "to": Web3.to_checksum_address(net.deposit_address),
               "value": amount, "validAfter": 0, "validBefore": now + 3600,
               "nonce": nonce or os.urandom(32)}
    signed = Account.sign_typed_data(signer.key, full_message=typed_data(net, message, name))
    return (message["from"], message["to"], amount, 0, message["validBefore"],
            message["nonce"], signed.v, signed.r.to_bytes(32, "big"), signed.s.to_bytes(32, "big"))


def submit(net: Devnet, args: tuple[Any, ...]) -> Any:
    """A relayer (the deployer) submits the signed authorization; fixed gas so a revert mines."""
    tx = net.usdc.functions.transferWithAuthorization(*args).transact(
        {"from": net.deployer, "gas": 200_000})
    return net.w3.eth.wait_for_transaction_receipt(tx)


@pytest.fixture
def payer(devnet: Devnet) -> Any:
    """A fresh key holding 50 USDC and no ether: it signs, a relayer pays the gas."""
    account = Account.create()
    devnet.usdc.functions.mint(account.address, 50 * USDC).transact(
        {"from": devnet.deployer, "gas": 100_000})
    return account


def test_the_token_looks_like_usdc(devnet: Devnet) -> None:
    usdc = devnet.usdc.functions
    assert (usdc.name().call(), usdc.symbol().call(), usdc.version().call(),
            usdc.decimals().call()) == ("USD Coin", "USDC", "2", 6)


def test_the_eip712_domain_separator_is_the_one_wallets_sign(devnet: Devnet) -> None:
    message = {"from": devnet.alice, "to": devnet.bob, "value": 1, "validAfter": 0,
               "validBefore": 1, "nonce": bytes(32)}
    expected = encode_typed_data(full_message=typed_data(devnet, message)).header
    assert devnet.usdc.functions.DOMAIN_SEPARATOR().call() == expected


def test_a_transfer_with_authorization_is_a_deposit(
    engine: Engine, devnet: Devnet, payer: Any
) -> None:
    receipt = submit(devnet, authorization(devnet, payer, 20 * USDC))
    devnet.mine(3)

    result = fund_from_tx(engine, devnet.w3, devnet.chain, "acme",
                          receipt["transactionHash"].to_0x_hex(), devnet.deposit_address)

    assert receipt["status"] == 1
    assert [(d.sender, d.amount) for d in result.credited] == [(payer.address.lower(),
                                                                20 * USDC)]
    assert devnet.usdc.functions.balanceOf(payer.address).call() == 30 * USDC


def test_an_authorization_cannot_be_replayed(devnet: Devnet, payer: Any) -> None:
    args = authorization(devnet, payer, 5 * USDC)
    assert submit(devnet, args)["status"] == 1
    assert submit(devnet, args)["status"] == 0
    assert devnet.usdc.functions.authorizationState(payer.address, args[5]).call()


def test_a_signature_over_the_wrong_domain_name_fails_on_chain(
    devnet: Devnet, payer: Any
) -> None:
    # Base Sepolia's USDC is named "USDC": signing with that name for a "USD Coin" token fails.
    assert submit(devnet, authorization(devnet, payer, 5 * USDC, name="USDC"))["status"] == 0
    assert devnet.usdc.functions.balanceOf(payer.address).call() == 50 * USDC


def test_the_typehash_is_eip_3009s() -> None:
    encoded = ("TransferWithAuthorization(address from,address to,uint256 value,"
               "uint256 validAfter,uint256 validBefore,bytes32 nonce)")
    assert Web3.keccak(text=encoded).to_0x_hex() == TRANSFER_WITH_AUTHORIZATION_TYPEHASH

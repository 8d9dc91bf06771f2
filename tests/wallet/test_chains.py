"""The chain registry, deposit address and addresses: what config.toml may and may not say."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path
from typing import Any

import pytest

from mcpbill_cli.errors import ConfigInvalid, InvalidInput
from mcpbill_cli.wallet.addresses import checksum_address, normalize_address, normalize_tx_hash
from mcpbill_cli.wallet.chains import BUILTIN_CHAINS, resolve_chain, rpc_url
from mcpbill_cli.wallet.deposit_address import get_deposit_address, set_deposit_address
from mcpbill_cli.wallet.errors import NoDepositAddress, NoRpcUrl, UnknownChain

# DESIGN.md "USDC on chain", as printed there (EIP-55 checksummed).
DESIGN_TABLE = [
    ("base", "eip155:8453", "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913", "USD Coin"),
    ("base-sepolia", "eip155:84532", "0x036CbD53842c5426634e7929541eC2318f3dCF7e", "USDC"),
    ("ethereum", "eip155:1", "0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48", "USD Coin"),
    ("sepolia", "eip155:11155111", "0x1c7D4B196Cb0C7B01d743Fbc6116a902379C7238", "USDC"),
]
LOCAL = {"caip2": "eip155:31337", "usdc": "0x5fbdb2315678afecb367f032d93f642f64180aa3",
         "rpc_url": "http://127.0.0.1:8545", "confirmations": 2}


@pytest.mark.parametrize(("name", "caip2", "usdc", "eip712_name"), DESIGN_TABLE)
def test_builtin_chains_match_the_design(name: str, caip2: str, usdc: str,
                                         eip712_name: str) -> None:
    chain = BUILTIN_CHAINS[name]
    assert (chain.caip2, checksum_address(chain.usdc), chain.eip712_name) == (
        caip2, usdc, eip712_name)
    assert (chain.eip712_version, chain.confirmations, chain.rpc_url) == ("2", 12, None)
    assert resolve_chain(caip2, {}) == chain


def test_default_chain_is_base_unless_the_wallet_section_says_otherwise() -> None:
    assert resolve_chain(None, {}).name == "base"
    assert resolve_chain(None, {"wallet": {"chain": "sepolia"}}).name == "sepolia"


def test_a_builtin_chain_takes_an_rpc_url_and_confirmations_only() -> None:
    file = {"chains": {"base": {"rpc_url": "https://rpc.example/key", "confirmations": 20}}}
    chain = resolve_chain("base", file)
    assert (chain.rpc_url, chain.confirmations, chain.usdc) == (
        "https://rpc.example/key", 20, BUILTIN_CHAINS["base"].usdc)
    with pytest.raises(ConfigInvalid, match="usdc"):
        resolve_chain("base", {"chains": {"base": {"usdc": LOCAL["usdc"]}}})


def test_a_custom_chain_comes_from_config() -> None:
    chain = resolve_chain("local", {"chains": {"local": LOCAL}})
    assert (chain.chain_id, chain.usdc, chain.confirmations, rpc_url(chain)) == (
        31337, LOCAL["usdc"], 2, "http://127.0.0.1:8545")
    assert rpc_url(chain, "http://override:1") == "http://override:1"


@pytest.mark.parametrize(("entry", "complaint"), [
    ({"usdc": LOCAL["usdc"]}, "caip2"),
    ({"caip2": "eip155:31337"}, "usdc"),
    ({"caip2": "solana:mainnet", "usdc": LOCAL["usdc"]}, "caip2"),
    ({**LOCAL, "usdc": "0x123"}, "not an address"),
    ({**LOCAL, "confirmations": 0}, "confirmations"),
    ({**LOCAL, "rpc_url": "localhost"}, "rpc_url"),
    ({**LOCAL, "rpc": "typo"}, "unknown"),
    ({**LOCAL, "caip2": "eip155:8453"}, "both eip155:8453"),
])
def test_a_broken_chain_entry_is_a_config_error(entry: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ConfigInvalid, match=complaint):
        resolve_chain("local", {"chains": {"local": entry}})


def test_unknown_chain_and_missing_rpc_url_say_what_to_do() -> None:
    with pytest.raises(UnknownChain, match=r"\[chains.polygon\]"):
        resolve_chain("polygon", {})
    with pytest.raises(NoRpcUrl, match="rpc_url"):
        rpc_url(BUILTIN_CHAINS["base"])


def test_addresses_are_checked_and_stored_lowercase() -> None:
    good = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
    assert normalize_address(good) == good.lower()
    assert normalize_address(good.lower()) == good.lower()
    with pytest.raises(InvalidInput, match="checksum"):
        normalize_address(good.replace("fCD", "fcD"))
    with pytest.raises(InvalidInput, match="40 hex"):
        normalize_address("0x833589")
    with pytest.raises(InvalidInput, match="64 hex"):
        normalize_tx_hash("0x1234")


def test_deposit_address_is_written_atomically_keeping_other_keys(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('mode = "live"\n\n[chains.base]\nrpc_url = "https://rpc.example/k"\n')
    address = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"

    assert set_deposit_address(config, address) == address.lower()

    data = tomllib.loads(config.read_text())
    assert data == {"mode": "live", "chains": {"base": {"rpc_url": "https://rpc.example/k"}},
                    "wallet": {"deposit_address": address.lower()}}
    assert get_deposit_address(data) == address.lower()
    assert stat.S_IMODE(os.stat(config).st_mode) == 0o600
    assert os.listdir(tmp_path) == ["config.toml"]  # no temp file left behind


@pytest.mark.parametrize(("before", "after"), [
    pytest.param('# settings\nmode = "live"  # keep\n',
                 '# settings\nmode = "live"  # keep\n\n[wallet]\ndeposit_address = "{a}"\n',
                 id="no wallet table: appended"),
    pytest.param('# top\n[wallet]\n# the operator\'s address\nkeystore = "k.json"\n\n'
                 '[chains.base]\nrpc_url = "u"  # with an API key\n',
                 '# top\n[wallet]\ndeposit_address = "{a}"\n# the operator\'s address\n'
                 'keystore = "k.json"\n\n[chains.base]\nrpc_url = "u"  # with an API key\n',
                 id="wallet table without the key: inserted under its header"),
    pytest.param('[wallet] # mine\ndeposit_address = "0x0000000000000000000000000000000000000001"'
                 '\n# after\n[x]\ny = 1',
                 '[wallet] # mine\ndeposit_address = "{a}"\n# after\n[x]\ny = 1\n',
                 id="key replaced in place"),
])
def test_setting_the_deposit_address_keeps_comments_and_layout(
        tmp_path: Path, before: str, after: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(before)
    address = "0x833589fcd6edb6e08f4c7c32d4f71b54bda02913"
    set_deposit_address(config, address)
    assert config.read_text() == after.format(a=address)


@pytest.mark.parametrize("before", [
    'wallet.keystore = "k.json"\n', 'wallet = { keystore = "k.json" }\n'])
def test_a_wallet_table_written_inline_is_rewritten_whole(tmp_path: Path, before: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text("# gone with the rewrite\n" + before)
    address = "0x833589fcd6edb6e08f4c7c32d4f71b54bda02913"
    set_deposit_address(config, address)
    assert tomllib.loads(config.read_text()) == {
        "wallet": {"keystore": "k.json", "deposit_address": address}}


def test_a_bad_deposit_address_leaves_the_config_untouched(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('mode = "live"\n')
    with pytest.raises(InvalidInput):
        set_deposit_address(config, "0xnope")
    assert config.read_text() == 'mode = "live"\n'


def test_no_deposit_address_says_how_to_set_one() -> None:
    with pytest.raises(NoDepositAddress, match="wallet address --set"):
        get_deposit_address({})

"""The on-chain wallet commands through the Typer app: exit codes, JSON envelopes, secrets."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from typer.testing import CliRunner, Result

from mcpbill_cli.cli import app
from mcpbill_cli.cli.output import exit_code
from mcpbill_cli.wallet.keystore import load_account
from tests.cli.data_contract import assert_contract
from tests.cli.terminal import in_terminal

from .devnet import USDC, Devnet

Invoke = Callable[..., Result]


@pytest.fixture
def bare_cli() -> Invoke:
    """mcpbill in process on an empty home (commands that need no ledger)."""
    runner = CliRunner()

    def invoke(*args: str, input: str | None = None) -> Result:
        return runner.invoke(app, list(args), input=input, catch_exceptions=False)

    return invoke


@pytest.fixture
def cli(bare_cli: Invoke, db_url: str, monkeypatch: pytest.MonkeyPatch) -> Invoke:
    """mcpbill in process on an initialized home and a fresh ledger (SQLite or PostgreSQL)."""
    monkeypatch.setenv("MCPBILL_DB_URL", db_url)
    assert bare_cli("init").exit_code == 0
    return bare_cli


def said(result: Result) -> str:
    """What a command told the person on stderr, unwrapped."""
    return " ".join(result.stderr.split())


def data(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["status"] == "ok" and document["errors"] == []
    return document["data"]


def refusal(result: Result, code: str) -> dict[str, Any]:
    """The one error of a --json failure, after checking its code and exit status."""
    document = json.loads(result.stdout)
    assert [e["code"] for e in document["errors"]] == [code], document
    assert result.exit_code == exit_code(code), result.output
    return dict(document["errors"][0])


def add_chain(home: Path, net: Devnet, url: str) -> None:
    """Point config.toml at the devnet: [chains.local] and [wallet] chain = "local"."""
    config = home / "config.toml"
    document = tomllib.loads(config.read_text())
    document["chains"] = {"local": {"caip2": net.chain.caip2, "usdc": net.chain.usdc,
                                    "rpc_url": url, "confirmations": net.chain.confirmations}}
    document.setdefault("wallet", {})["chain"] = "local"
    config.write_text(tomli_w.dumps(document))


def test_address_and_link_without_a_chain(cli: Invoke) -> None:
    assert refusal(cli("wallet", "address", "--json"), "NO_DEPOSIT_ADDRESS")
    address = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
    assert data(cli("wallet", "address", "--set", address.lower(), "--json")) == {
        "address": address, "changed": True}
    assert cli("wallet", "address").stdout == address + "\n"
    refusal(cli("wallet", "address", "--set", "0x1234", "--json"), "INVALID_INPUT")
    refusal(cli("wallet", "fund", "--demo", "5", "--tx", "0x" + "ab" * 32, "--json"),
            "INVALID_INPUT")

    sender = "0x" + "ab" * 20
    linked = data(cli("wallet", "link", "--tenant", "acme", "--address", sender, "--json"))
    assert linked == {"address": sender, "tenant": "acme", "previous": None, "credited": []}
    refusal(cli("wallet", "link", "--tenant", "globex", "--address", sender, "--json"),
            "ALREADY_EXISTS")
    moved = cli("wallet", "link", "--tenant", "globex", "--address", sender, "--replace")
    assert moved.exit_code == 0 and "was acme" in said(moved)


def test_wallet_commands_do_not_import_web3_until_they_run() -> None:
    code = ("import sys; import mcpbill_cli, mcpbill_cli.cli, mcpbill_cli.cli.wallet_chain; "
            "print(sorted({'web3', 'eth_account', 'eth_tester'} & set(sys.modules)))")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True)
    assert shown.stdout.strip() == "[]"


@pytest.mark.slow
def test_keystore_password_comes_from_the_environment_or_a_prompt(
    bare_cli: Invoke, isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli = bare_cli
    path = isolated_home / "keys" / "wallet.json"
    monkeypatch.setenv("MCPBILL_KEYSTORE_PASSWORD", "env-secret-pw")
    made = cli("wallet", "create", "--json")
    address = data(made)["address"]
    key = load_account(path, "env-secret-pw").key
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    refusal(cli("wallet", "create", "--json"), "ALREADY_EXISTS")

    monkeypatch.delenv("MCPBILL_KEYSTORE_PASSWORD")
    prompted = in_terminal("wallet", "create", "--force",
                           answers=("typed-secret-pw", "typed-secret-pw"))
    assert prompted.returncode == 0, prompted.stderr
    prompted_address = load_account(path, "typed-secret-pw").address
    assert prompted_address in prompted.stderr and prompted_address != address
    for output in (made.output, prompted.stderr):
        for secret in ("env-secret-pw", "typed-secret-pw", key.hex(), key.to_0x_hex()):
            assert secret not in output
    assert cli("wallet", "create", "--password", "x").exit_code == 2  # never on argv


@pytest.mark.slow
def test_funding_syncing_and_balances_on_chain_through_the_cli(
    cli: Invoke, anvil_devnet: Devnet, anvil_url: str, isolated_home: Path
) -> None:
    net = anvil_devnet
    add_chain(isolated_home, net, anvil_url)
    data(cli("wallet", "address", "--set", net.deposit_address, "--json"))
    start = str(net.w3.eth.block_number + 1)
    good = net.pay(net.alice, 25 * USDC)
    lookalike = net.pay(net.alice, 25 * USDC, token=net.lookalike)
    net.pay(net.bob, 4 * USDC)
    net.pay(net.alice, 6 * USDC)
    pending = net.pay(net.alice, 1 * USDC)

    early = refusal(cli("wallet", "fund", "-t", "acme", "--tx", pending, "--json"), "TX_PENDING")
    assert (early["confirmations"], early["more_needed"]) == (1, 1)
    net.mine(1)
    funded = data(cli("wallet", "fund", "-t", "acme", "--tx", good, "--json"))
    assert funded["amount_usd"] == "25.00" and funded["already_credited"] == []
    assert_contract(("wallet", "fund"), funded)
    again = cli("wallet", "fund", "-t", "acme", "--tx", good)
    assert again.exit_code == 0 and "already credited to acme" in said(again)
    refusal(cli("wallet", "fund", "-t", "acme", "--tx", lookalike, "--json"), "NOT_USDC")
    assert data(cli("wallet", "balance", "-t", "acme", "--json"))["funded_usd"] == "25.00"

    refusal(cli("wallet", "sync", "--json"), "NO_CHECKPOINT")
    data(cli("wallet", "link", "-t", "globex", "--address", net.bob, "--json"))
    synced = data(cli("wallet", "sync", "--from-block", start, "--json"))
    assert [(c["tenant"], c["amount_usd"]) for c in synced["credited"]] == [("globex", "4.00")]
    assert [d["amount_usd"] for d in synced["unlinked"]] == ["6.00", "1.00"]
    assert_contract(("wallet", "sync"), synced)
    listed = cli("wallet", "sync")
    assert listed.exit_code == 0 and "6.00" in listed.stdout and "wallet link" in said(listed)

    onchain = data(cli("wallet", "balance", "--onchain", "--json"))
    assert (onchain["onchain_usd"], onchain["credited_usd"], onchain["unlinked_usd"],
            onchain["unaccounted_usd"]) == ("36.00", "29.00", "7.00", "0.00")
    assert_contract(("wallet", "balance"), onchain)
    wrong = refusal(cli("wallet", "sync", "--chain", "base", "--rpc-url", anvil_url, "--json"),
                    "WRONG_CHAIN")
    assert wrong["actual"] == 31337
    kept = data(cli("wallet", "link", "-t", "initech", "--address", net.alice, "--json"))
    assert [c["amount_usd"] for c in kept["credited"]] == ["6.00", "1.00"]
    assert_contract(("wallet", "link"), kept)

"""`mcpbill status` and `mcpbill pricing validate` say why x402 acceptance is off when the
pricing file turns it on, and the server's own acceptor agrees with them."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from mcpbill_cli import Verifier
from mcpbill_cli.config import load_settings
from mcpbill_cli.wallet.keystore import ENV_KEYSTORE_PASSWORD, keystore_path
from mcpbill_cli.x402.accept import Acceptor, Unavailable
from tests.cli.conftest import Invoke, ok_json
from tests.cli.data_contract import assert_contract

PAY_TO = "0x" + "ab" * 20
X402_PRICING: dict[str, Any] = {
    "version": 7,
    "x402": {"enabled": True, "chain": "fuji", "tenant": "x402"},
    "tools": {"search": {"price": "0.01"}, "status": {"price": "0"},
              "premium": {"price": "0.05", "x402": False},
              "summarize": {"price_per_unit": "0.00001", "max_price": "0.10"}},
}
# A chain only x402 uses: status's own chain check (the default chain) contacts no RPC.
FUJI = {"caip2": "eip155:43113", "usdc": "0x5425890298aed601595a70AB815c96711a31Bc65",
        "rpc_url": "http://127.0.0.1:9", "eip712_name": "USD Coin"}


def configure(home: Path, *, mode: str = "live", chain: dict[str, Any] | None = None,
              deposit_address: str | None = None, facilitator: str | None = None,
              pricing: dict[str, Any] | None = None) -> None:
    """Rewrite the home's config.toml and pricing.toml (keys and ledger are `init`'s)."""
    config: dict[str, Any] = tomllib.loads((home / "config.toml").read_text())
    config["mode"] = mode
    config["chains"] = {"fuji": chain} if chain is not None else {}
    config["wallet"] = {"deposit_address": deposit_address} if deposit_address else {}
    if facilitator is not None:
        config["x402"] = {"facilitator_url": facilitator}
    (home / "config.toml").write_text(tomli_w.dumps(config))
    (home / "pricing.toml").write_text(tomli_w.dumps(pricing or X402_PRICING))


def status_data(cli: Invoke) -> dict[str, Any]:
    data: dict[str, Any] = ok_json(cli("status", "--json"))
    assert_contract(("status",), data)
    return data


@pytest.fixture
def home(ledger_cli: Invoke, isolated_home: Path) -> Path:
    return isolated_home


def test_status_lists_every_reason_a_live_home_cannot_accept_x402(
        ledger_cli: Invoke, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_KEYSTORE_PASSWORD, raising=False)
    configure(home, chain={k: v for k, v in FUJI.items() if k != "rpc_url"})

    x402 = status_data(ledger_cli)["x402"]

    assert (x402["requested"], x402["accepting"]) == (True, False)
    assert (x402["chain"], x402["network"], x402["settlement"]) == ("fuji", "eip155:43113",
                                                                    "self")
    assert x402["tools"] == ["search"]  # not the free, opted-out or per-unit ones
    reasons = x402["reasons"]
    assert len(reasons) == 3, reasons
    assert "no RPC URL for fuji" in reasons[0]
    assert "no deposit address" in reasons[1]
    assert "no keystore" in reasons[2] and "facilitator_url" in reasons[2]


def test_status_says_it_in_words_on_stderr_and_still_exits_0(
        ledger_cli: Invoke, home: Path) -> None:
    configure(home, mode="demo", chain=FUJI, deposit_address=PAY_TO,
              facilitator="http://127.0.0.1:9/facilitator")
    result = ledger_cli("status")
    assert result.exit_code == 0, result.output
    assert "x402\toff: 1 thing(s) missing" in result.stdout
    assert "cannot accept x402 payments" in result.stderr
    assert "demo mode" in result.stderr


def test_a_keystore_without_its_password_is_a_reason(
        ledger_cli: Invoke, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_KEYSTORE_PASSWORD, raising=False)
    configure(home, chain=FUJI, deposit_address=PAY_TO)
    keystore_path(home / "keys").write_text("{}")
    [reason] = status_data(ledger_cli)["x402"]["reasons"]
    assert reason.startswith(f"{ENV_KEYSTORE_PASSWORD} is not set")
    monkeypatch.setenv(ENV_KEYSTORE_PASSWORD, "hunter2-hunter2")
    x402 = status_data(ledger_cli)["x402"]
    assert (x402["accepting"], x402["reasons"], x402["settlement"]) == (True, [], "self")


def test_a_complete_home_accepts_and_the_servers_acceptor_agrees(
        ledger_cli: Invoke, home: Path, db_url: str) -> None:
    configure(home, chain=FUJI, deposit_address=PAY_TO,
              facilitator="http://127.0.0.1:9/facilitator")
    x402 = status_data(ledger_cli)["x402"]
    assert x402 == {"requested": True, "accepting": True, "chain": "fuji",
                    "network": "eip155:43113", "pay_to": PAY_TO, "settlement": "facilitator",
                    "facilitator_url": "http://127.0.0.1:9/facilitator", "tools": ["search"],
                    "reasons": []}
    assert "x402\taccepting on fuji (eip155:43113)" in ledger_cli("status").stdout

    settings = load_settings(home=home, db_url=db_url)
    verifier = Verifier.from_settings(settings)
    try:
        acceptor = Acceptor.from_settings(verifier, settings)
        assert isinstance(acceptor, Acceptor) and acceptor.recovery is not None
        acceptor.close()
        assert not acceptor.recovery.running
        configure(home, mode="live", chain=FUJI, deposit_address=None,
                  facilitator="http://127.0.0.1:9/facilitator")
        unavailable = Acceptor.from_settings(verifier, load_settings(home=home, db_url=db_url))
        assert isinstance(unavailable, Unavailable)
        assert unavailable.reason == status_data(ledger_cli)["x402"]["reasons"][0]
    finally:
        verifier.close()


def test_a_table_without_x402_asks_for_nothing(ledger_cli: Invoke, home: Path) -> None:
    x402 = status_data(ledger_cli)["x402"]  # init's sample table has no [x402]
    assert (x402["requested"], x402["accepting"], x402["reasons"]) == (False, False, [])
    assert "x402\toff (pricing.toml has no [x402])" in ledger_cli("status").stdout


def test_pricing_validate_explains_a_file_that_turns_x402_on(
        ledger_cli: Invoke, home: Path, tmp_path: Path) -> None:
    configure(home, chain=FUJI, facilitator="http://127.0.0.1:9/facilitator",
              pricing={"version": 1, "tools": {"search": {"price": "0.01"}}})
    candidate = tmp_path / "next.toml"
    candidate.write_text(tomli_w.dumps({**X402_PRICING, "version": 8}))

    data = ok_json(ledger_cli("pricing", "validate", str(candidate), "--json"))
    assert_contract(("pricing", "validate"), data)
    assert (data["x402"]["requested"], data["x402"]["accepting"]) == (True, False)
    [reason] = data["x402"]["reasons"]
    assert "no deposit address" in reason

    human = ledger_cli("pricing", "validate", str(candidate))
    assert human.exit_code == 0, human.output
    assert "valid, version 8" in human.stdout
    assert "this home cannot accept x402 payments" in human.stderr
    assert "no deposit address" in human.stderr
    assert json.loads(ledger_cli("pricing", "validate", "--json").stdout)["data"]["x402"][
        "requested"] is False  # the home's own table has no [x402]

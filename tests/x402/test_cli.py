"""`mcpbill x402 fetch` against the real peer: the requirements, the decision and the settlement,
as one JSON document; refusals with their codes and exit statuses."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import typer
from eth_account import Account
from typer.testing import CliRunner, Result

from mcpbill_cli.cli import app as mcpbill
from mcpbill_cli.cli import x402 as x402_cli
from mcpbill_cli.cli.output import exit_code
from mcpbill_cli.cli.state import State
from tests.cli.data_contract import assert_contract

from .conftest import PRICE, Peer

pytestmark = pytest.mark.slow

PASSWORD = "correct horse battery staple"  # noqa: S105 - a test keystore's password
Invoke = Callable[..., Result]


@pytest.fixture
def cli(db_url: str, isolated_home: Path, peer: Peer,
        monkeypatch: pytest.MonkeyPatch) -> Invoke:
    """mcpbill on an initialized home whose chain registry and keystore are the peer's chain's.

    ``x402`` is mounted on a root app here as `cli/__init__.py` mounts its groups.
    """
    monkeypatch.setenv("MCPBILL_DB_URL", db_url)
    runner = CliRunner()
    root = typer.Typer()

    @root.callback()
    def open_state(ctx: typer.Context) -> None:  # what mcpbill's own root callback does
        ctx.obj = State(None, None)
        ctx.call_on_close(ctx.obj.close)

    root.add_typer(x402_cli.app, name="x402")

    def invoke(*args: str) -> Result:
        command = root if args[0] == "x402" else mcpbill
        return runner.invoke(command, list(args), catch_exceptions=False)

    assert invoke("init").exit_code == 0
    _use_peer_chain(isolated_home, peer)
    monkeypatch.setenv("MCPBILL_KEYSTORE_PASSWORD", PASSWORD)
    return invoke


def _use_peer_chain(home: Path, peer: Peer) -> None:
    config = home / "config.toml"
    document = tomllib.loads(config.read_text())
    document["chains"] = {"fuji": {"caip2": peer.devnet.chain.caip2,
                                   "usdc": peer.devnet.chain.usdc}}
    document["wallet"] = {"chain": "fuji"}
    config.write_text(tomli_w.dumps(document))
    keystore = Account.encrypt(peer.operator.key, PASSWORD, iterations=2**4)
    (home / "keys" / "wallet.json").write_text(json.dumps(keystore))


@pytest.fixture
def token(cli: Invoke) -> str:
    assert cli("wallet", "fund", "--demo", "10").exit_code == 0
    issued = cli("token", "issue", "--limit", "1")
    assert issued.exit_code == 0, issued.output
    return issued.stdout.strip()


def envelope(result: Result) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def test_fetch_pays_and_shows_requirements_decision_and_settlement(
        cli: Invoke, token: str, peer: Peer) -> None:
    before = peer.balances()

    result = cli("x402", "fetch", peer.url + "/v2/report", "--token", token, "--json")

    assert result.exit_code == 0, result.output
    data = envelope(result)["data"]
    assert data["paid"] is True and data["status"] == 200
    assert data["challenge"]["x402_version"] == 2
    assert data["decision"]["chosen"] == 0
    assert data["decision"]["options"][0]["acceptable"] is True
    assert data["settlement"]["success"] is True
    assert data["receipt"]["transaction"] == data["settlement"]["transaction"].lower()
    assert data["receipt"]["amount_usd"] == "0.01"
    assert data["remaining_usd"] == "0.99"
    assert json.loads(data["body"])["report"] == "paid content"
    assert_contract(("x402", "fetch"), data)
    operator, payee = peer.balances()
    assert (before[0] - operator, payee - before[1]) == (PRICE, PRICE)
    assert PASSWORD not in result.output and peer.operator.key.hex() not in result.output


def test_for_a_person_the_body_is_on_stdout_and_the_talk_on_stderr(
        cli: Invoke, token: str, peer: Peer) -> None:
    result = cli("x402", "fetch", peer.url + "/v1/report", "--token", token)

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"report": "paid content", "version": 1}
    said = " ".join(result.stderr.split())
    assert "HTTP 200" in said and "paid 0.01 USDC: transaction 0x" in said
    # Off a terminal the options are tab-separated lines, one per option, under a header.
    assert "0\texact\tavalanche-fuji\t0.01\tok" in result.stderr.splitlines()


def test_a_dry_run_judges_without_holding_or_signing(cli: Invoke, token: str,
                                                      peer: Peer) -> None:
    before = peer.balances()

    result = cli("x402", "fetch", peer.url + "/v1/report", "--token", token, "--dry-run",
                 "--json")

    data = envelope(result)["data"]
    assert result.exit_code == 0, result.output
    assert (data["dry_run"], data["paid"], data["status"]) == (True, False, 402)
    assert data["challenge"]["x402_version"] == 1
    assert data["decision"]["chosen"] == 0 and data["refusal"] is None
    assert data["remaining_usd"] == "1.00"
    assert_contract(("x402", "fetch"), data)
    assert peer.balances() == before


def test_a_dry_run_predicts_the_refusal_over_the_maximum(cli: Invoke, token: str,
                                                         peer: Peer) -> None:
    result = cli("x402", "fetch", peer.url + "/v2/report", "--token", token, "--dry-run",
                 "--max", "0.005")

    assert result.exit_code == 0, result.output
    said = " ".join(result.stderr.split())
    assert "X402_OVER_MAXIMUM" in said and "0.005" in said


def test_over_the_maximum_is_refused_with_its_code(cli: Invoke, token: str,
                                                   peer: Peer) -> None:
    before = peer.balances()

    result = cli("x402", "fetch", peer.url + "/v2/report", "--token", token, "--max", "0.005",
                 "--json")

    assert result.exit_code == exit_code("X402_OVER_MAXIMUM")
    [error] = envelope(result)["errors"]
    assert error["code"] == "X402_OVER_MAXIMUM"
    assert error["options"][0]["reason"] == "over_maximum"
    assert peer.balances() == before


def test_the_token_may_come_from_the_environment(cli: Invoke, token: str, peer: Peer,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_CREDIT_JWT", token)

    result = cli("x402", "fetch", peer.url + "/free", "--json")

    assert result.exit_code == 0, result.output
    assert envelope(result)["data"]["paid"] is False


def test_without_a_token_it_says_how_to_give_one(cli: Invoke, peer: Peer) -> None:
    result = cli("x402", "fetch", peer.url + "/free", "--json")

    assert result.exit_code == exit_code("INVALID_INPUT")
    assert "AGENT_CREDIT_JWT" in envelope(result)["errors"][0]["message"]

"""--dry-run shows what would change and changes nothing; edits that change nothing are
no-ops; `keys rotate` keeps the home's algorithm."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.cli.conftest import Invoke, error_json, ok_json, tree_snapshot
from tests.cli.test_bad_input import ledger_snapshot


@pytest.mark.parametrize("alg", ["ES256", "HS256"])
def test_keys_rotate_keeps_the_homes_algorithm(cli: Invoke, db_url: str, alg: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCPBILL_DB_URL", db_url)
    ok_json(cli("init", "--alg", alg, "--json"))
    rotated = ok_json(cli("keys", "rotate", "--json"))
    assert rotated["active"]["alg"] == rotated["previous"]["alg"] == alg
    assert ok_json(cli("keys", "rotate", "--alg", "EdDSA", "--json"))["active"]["alg"] == "EdDSA"


def test_keys_rotate_dry_run_writes_no_key(ledger_cli: Invoke, isolated_home: Path) -> None:
    before = tree_snapshot(isolated_home)
    plan = ok_json(ledger_cli("keys", "rotate", "--dry-run", "--json"))
    assert plan["dry_run"] is True and plan["active"]["kid"] is None
    assert plan["active"]["alg"] == "EdDSA" and plan["previous"]["status"] == "verifying"
    as_text = ledger_cli("keys", "rotate", "--dry-run")
    assert as_text.exit_code == 0 and "would make a new EdDSA key" in as_text.stderr
    assert as_text.stdout == ""  # no kid to capture: none was made
    assert tree_snapshot(isolated_home) == before
    assert ok_json(ledger_cli("keys", "rotate", "--json"))["dry_run"] is False


def test_token_sweep_dry_run_releases_nothing(ledger_cli: Invoke, isolated_home: Path,
                                              db_url: str) -> None:
    ok_json(ledger_cli("wallet", "fund", "--demo", "3", "--json"))
    jti = ok_json(ledger_cli("token", "issue", "--limit", "2", "--ttl", "1s", "--json"))["jti"]
    time.sleep(1.2)
    files, ledger = tree_snapshot(isolated_home), ledger_snapshot(db_url)
    plan = ok_json(ledger_cli("token", "sweep", "--dry-run", "--json"))
    assert plan == {"dry_run": True, "released": [{"jti": jti, "released_usd": "2.00"}]}
    assert "would release 2.00 USDC from 1 token(s)" in ledger_cli(
        "token", "sweep", "--dry-run").stderr
    assert tree_snapshot(isolated_home) == files and ledger_snapshot(db_url) == ledger
    assert ok_json(ledger_cli("wallet", "balance", "--json"))["available_usd"] == "1.00"
    done = ok_json(ledger_cli("token", "sweep", "--json"))
    assert done == {"dry_run": False, "released": plan["released"]}
    assert ok_json(ledger_cli("wallet", "balance", "--json"))["available_usd"] == "3.00"


def test_pricing_set_to_the_same_price_is_a_no_op(cli: Invoke, isolated_home: Path) -> None:
    ok_json(cli("init", "--json"))
    first = ok_json(cli("pricing", "set", "search", "0.003", "--json"))
    assert first["changed"] is True
    files = tree_snapshot(isolated_home)
    again = cli("pricing", "set", "search", "0.003")
    assert again.exit_code == 0, again.output
    assert "nothing to change" in again.stderr
    same = ok_json(cli("pricing", "set", "search", "0.003", "--json"))
    assert same["changed"] is False and same["changes"] == []
    assert same["pricing_version"] == same["previous_version"] == first["pricing_version"]
    assert tree_snapshot(isolated_home) == files


@pytest.mark.parametrize("price", ["-1", "-0.5", "--1"])
def test_pricing_set_a_negative_price_is_invalid_input(cli: Invoke, isolated_home: Path,
                                                       price: str) -> None:
    ok_json(cli("init", "--json"))
    files = tree_snapshot(isolated_home)
    as_json = cli("pricing", "set", "x", price, "--json")
    as_text = cli("pricing", "set", "x", price)
    assert as_json.exit_code == as_text.exit_code == 3, as_json.output
    assert error_json(as_json, "INVALID_INPUT")["field"] == "price"
    assert "INVALID_INPUT" in as_text.stderr
    assert tree_snapshot(isolated_home) == files


@pytest.mark.parametrize("args", [("set", "search", "0.009"), ("set", "new.tool", "0.1"),
                                  ("unset", "search")])
def test_pricing_dry_run_shows_the_change_and_writes_nothing(
        cli: Invoke, isolated_home: Path, args: tuple[str, ...]) -> None:
    ok_json(cli("init", "--json"))
    files = tree_snapshot(isolated_home)
    plan = ok_json(cli("pricing", *args, "--dry-run", "--json"))
    assert plan["dry_run"] is True and plan["changed"] is True
    assert plan["pricing_version"] == plan["previous_version"] + 1
    assert [c["tool"] for c in plan["changes"]] == [args[1]]
    assert "would write pricing version" in cli("pricing", *args, "--dry-run").stderr
    assert tree_snapshot(isolated_home) == files
    done = ok_json(cli("pricing", *args, "--json"))
    assert (done["changes"], done["dry_run"]) == (plan["changes"], False)
    assert tree_snapshot(isolated_home) != files

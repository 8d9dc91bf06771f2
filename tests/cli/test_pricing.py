"""`mcpbill pricing ...` through the Typer app, against a real pricing.toml in a temp home."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, insert
from typer.testing import CliRunner, Result

from mcpbill_cli import Verifier
from mcpbill_cli.cli.pricing import app
from mcpbill_cli.ledger.engine import writing
from mcpbill_cli.ledger.models import pricing_versions
from mcpbill_cli.pricing import (
    SAMPLE_PRICING,
    PricingTable,
    load_pricing,
    parse_pricing,
    render_pricing,
)
from tests.cli.conftest import Invoke, error_json, ok_json

SAMPLE = parse_pricing(SAMPLE_PRICING)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MCPBILL_HOME", str(tmp_path))
    (tmp_path / "pricing.toml").write_text(SAMPLE_PRICING)
    return tmp_path


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def run(runner: CliRunner, *args: str) -> Result:
    return runner.invoke(app, list(args), catch_exceptions=False)


def flat(text: str) -> str:
    """Output without Rich's line wrapping."""
    return " ".join(text.split())


def run_json(runner: CliRunner, *args: str) -> tuple[int, dict[str, Any]]:
    result = run(runner, *args, "--json")
    return result.exit_code, json.loads(result.stdout)


# --- show ------------------------------------------------------------------------------------


def test_show_lists_every_tool_with_its_rule(runner: CliRunner, home: Path) -> None:
    result = run(runner, "show", "--tenant", "acme")
    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert rows[0] == ["tool", "price (USDC)", "rule"]
    assert ["search", "0.001", "tenant.acme.tools.search"] in rows
    notes = result.stderr.splitlines()
    assert notes[0] == "pricing version 1 for tenant acme"
    assert "other tools: 0.008 (default_price-discount:20%)" in notes
    assert "free tiers: read.*" in notes
    assert "daily cap: 25.00 USDC per UTC day" in notes


def test_show_json_is_one_envelope(runner: CliRunner, home: Path) -> None:
    code, document = run_json(runner, "show")
    assert code == 0
    assert document["schema_version"] == 2 and document["status"] == "ok"
    assert document["errors"] == []
    data = document["data"]
    assert [row["tool"] for row in data["tools"]] == ["search", "status", "summarize"]
    assert data["tools"][2] == {
        "tool": "summarize", "amount_usd": "0.50", "asset": "USDC", "rule": "tools.summarize",
        "pricing_version": 1, "free": False, "discount_percent": 0, "per_unit_usd": "0.00001",
        "max_usd": "0.50",
    }
    assert data["default"]["amount_usd"] == "0.01"
    assert (data["free_tiers"], data["daily_cap_usd"]) == (["read.*"], None)
    assert (data["tenant"], data["tenant_has_terms"]) == (None, False)


def test_show_for_a_tenant_without_terms_says_so(runner: CliRunner, home: Path) -> None:
    result = run(runner, "show", "--tenant", "acne")
    assert result.exit_code == 0
    assert "tenant 'acne' has no terms of its own" in flat(result.stderr)
    assert run_json(runner, "show", "-t", "acme")[1]["data"]["tenant_has_terms"] is True


def test_show_for_a_tenant_names_every_cap_it_has(runner: CliRunner, home: Path) -> None:
    path = home / "pricing.toml"
    path.write_text(SAMPLE_PRICING.replace(
        'daily_cap = "25.00"', 'daily_cap = "25.00"\nmonthly_cap = "500.00"\n'
        'agent_daily_cap = "5.00"\nagent_monthly_cap = "50.00"'))
    code, document = run_json(runner, "show", "-t", "acme")
    assert code == 0
    caps = {key: value for key, value in document["data"].items() if key.endswith("cap_usd")}
    assert caps == {"daily_cap_usd": "25.00", "monthly_cap_usd": "500.00",
                    "agent_daily_cap_usd": "5.00", "agent_monthly_cap_usd": "50.00"}
    told = flat(run(runner, "show", "-t", "acme").stderr)
    for line in ("daily cap: 25.00 USDC per UTC day", "monthly cap: 500.00 USDC per UTC month",
                 "agent daily cap: 5.00 USDC per agent per UTC day",
                 "agent monthly cap: 50.00 USDC per agent per UTC month"):
        assert line in told, told


def test_show_prints_tool_names_with_brackets_verbatim(runner: CliRunner, home: Path) -> None:
    assert run(runner, "set", "[bold]x", "0.5").exit_code == 0
    assert "[bold]x" in run(runner, "show").stdout


def test_show_without_a_pricing_file_says_how_to_start(runner: CliRunner, home: Path) -> None:
    (home / "pricing.toml").unlink()
    result = run(runner, "show")
    assert result.exit_code == 10
    assert "mcpbill init" in result.stderr


# --- set / unset -----------------------------------------------------------------------------


def test_set_then_unset_round_trips_through_the_file(runner: CliRunner, home: Path) -> None:
    path = home / "pricing.toml"
    result = run(runner, "set", "db.write", "0.05")
    assert result.exit_code == 0, result.output
    assert result.stdout == "added    tools.\"db.write\": - -> 0.05\n"
    assert "wrote pricing version 2" in result.stderr
    assert path.read_text() == render_pricing(load_pricing(path))  # normal form
    assert run(runner, "quote", "db.write").stdout == "0.05\n"
    assert run(runner, "unset", "db.write").exit_code == 0
    table = load_pricing(path)
    assert table.version == 3
    assert table.to_document() == {**SAMPLE.to_document(), "version": 3}


def test_set_and_unset_a_tenant_price(runner: CliRunner, home: Path) -> None:
    code, document = run_json(runner, "set", "summarize", "0.00002", "--tenant", "globex",
                              "--per-unit", "--max", "0.10")
    assert code == 0
    assert document["data"] == {
        "path": str(home / "pricing.toml"), "previous_version": 1, "pricing_version": 2,
        "changes": [{"key": "tenants.globex.tools.summarize", "kind": "added", "before": None,
                     "after": "0.00002/unit, max 0.10", "tenant": "globex",
                     "tool": "summarize"}],
        "changed": True, "dry_run": False,
    }
    assert run(runner, "quote", "summarize", "-t", "globex", "--units", "1000").stdout == "0.02\n"
    assert run(runner, "unset", "summarize", "--tenant", "globex").exit_code == 0
    assert "globex" not in load_pricing(home / "pricing.toml").tenants


def test_set_creates_the_file_in_an_initialized_home(runner: CliRunner, home: Path) -> None:
    (home / "pricing.toml").unlink()
    assert run(runner, "set", "search", "0.002").exit_code == 0
    assert load_pricing(home / "pricing.toml").version == 1


def test_set_without_a_home_is_not_initialized(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MCPBILL_HOME", str(tmp_path / "missing"))
    code, document = run_json(runner, "set", "search", "1")
    assert code == 9
    assert document["errors"][0]["code"] == "NOT_INITIALIZED"


REFUSED_EDITS = [
    (("set", "search", "0.0000001"), 3, "INVALID_INPUT", "more than 6 decimals"),
    (("set", "search", "cheap"), 3, "INVALID_INPUT", "not an amount"),
    (("set", "search", "1e3"), 3, "INVALID_INPUT", "not an amount"),
    (("set", "search", "--", "-1"), 3, "INVALID_INPUT", "not an amount"),
    (("set", "x", "1", "--per-unit"), 3, "INVALID_INPUT", "needs a maximum"),
    (("set", "x", "1", "--max", "2"), 3, "INVALID_INPUT", "only applies to a per-unit"),
    (("set", "x", "1", "--per-unit", "--max", "-2"), 3, "INVALID_INPUT", "not an amount"),
    (("set", "db.*", "1"), 3, "INVALID_INPUT", "exact names"),
    (("set", "x", "1", "--tenant", " acme"), 3, "INVALID_INPUT", "tenant name"),
    (("unset", "translate"), 4, "NOT_FOUND", "'translate' has no price of its own"),
    (("unset", "search", "--tenant", "nobody"), 4, "NOT_FOUND", "tenant 'nobody'"),
]


@pytest.mark.parametrize(("args", "exit_code", "code", "message"), REFUSED_EDITS)
def test_a_refused_edit_leaves_the_file_byte_for_byte(
    runner: CliRunner, home: Path, args: tuple[str, ...], exit_code: int, code: str, message: str
) -> None:
    before = (home / "pricing.toml").read_bytes()
    result = run(runner, args[0], "--json", *args[1:])
    assert result.exit_code == exit_code, result.output
    document = json.loads(result.stdout)
    assert (document["status"], document["data"]) == ("error", None)
    assert document["errors"][0]["code"] == code
    assert message in document["errors"][0]["message"]
    assert (home / "pricing.toml").read_bytes() == before


BROKEN_FILES = [
    ('price = "0.002"', 'price = "-0.002"', "line 21: tools.search.price"),
    ('price = "0.002"', "price = 0.5", "line 21: tools.search.price"),
    ('max_price = "0.50"', "", "line 23: tools.summarize"),
    ("discount_percent = 20", "discount_percent = 200", "line 32: tenants.acme.discount_percent"),
    ('price = "0.001"', 'prize = "0.001"', "line 36: tenants.acme.tools.search.prize"),
    ('price = "0.002"', "price = ", "(at line 21, column 23)"),
]


@pytest.mark.parametrize(("old", "new", "where"), BROKEN_FILES)
def test_editing_a_broken_file_is_refused_and_leaves_it(
    runner: CliRunner, home: Path, old: str, new: str, where: str
) -> None:
    path = home / "pricing.toml"
    path.write_text(SAMPLE_PRICING.replace(old, new, 1))
    before = path.read_bytes()
    result = run(runner, "set", "search", "0.003")
    assert result.exit_code == 10, result.output
    assert where in flat(result.stderr)
    assert path.read_bytes() == before


@pytest.mark.parametrize(("old", "new", "where"), BROKEN_FILES)
def test_validate_names_the_key_path_and_line(
    runner: CliRunner, home: Path, old: str, new: str, where: str
) -> None:
    path = home / "pricing.toml"
    path.write_text(SAMPLE_PRICING.replace(old, new, 1))
    code, document = run_json(runner, "validate")
    assert code == 10
    assert document["errors"][0]["code"] == "PRICING_INVALID"
    assert where in document["errors"][0]["message"]


# --- validate / diff / quote -----------------------------------------------------------------


def test_validate_a_good_file(runner: CliRunner, home: Path) -> None:
    result = run(runner, "validate")
    assert result.exit_code == 0
    assert result.stdout == f"{home / 'pricing.toml'}: valid, version 1, 3 tool(s), 1 tenant(s)\n"


def test_validate_another_file(runner: CliRunner, home: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    other.write_text("version = 4\n")
    code, document = run_json(runner, "validate", str(other))
    assert (code, document["data"]) == (0, {
        "path": str(other), "pricing_version": 4, "tools": 0, "tenants": 0,
        "version_recorded": False, "x402": {
            "requested": False, "accepting": False, "chain": None, "network": None,
            "pay_to": None, "settlement": None, "facilitator_url": None, "tools": [],
            "reasons": []}})
    code, document = run_json(runner, "validate", str(tmp_path / "absent.toml"))
    assert code == 10 and "no pricing table" in document["errors"][0]["message"]


def test_set_keeps_a_tools_dedupe_window_and_diff_shows_window_changes(
    runner: CliRunner, home: Path, tmp_path: Path
) -> None:
    path = home / "pricing.toml"
    path.write_text(SAMPLE_PRICING.replace('price = "0"', 'price = "0"\ndedupe_window = "0s"'))
    assert run(runner, "set", "status", "0.001").exit_code == 0
    assert load_pricing(path).tools["status"].dedupe_window == 0
    assert 'dedupe_window = "0s"' in path.read_text()
    other = tmp_path / "other.toml"
    other.write_text(path.read_text().replace('"0s"', '"5s"'))
    result = run(runner, "diff", str(other))
    assert result.stdout == "changed  tools.status.dedupe_window: 0s -> 5s\n"


def test_diff_lists_changes_per_tool_and_tenant(
    runner: CliRunner, home: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other.toml"
    other.write_text(SAMPLE_PRICING.replace('price = "0.002"', 'price = "0.003"')
                     .replace("discount_percent = 20", "discount_percent = 25")
                     .replace("version = 1", "version = 2"))
    result = run(runner, "diff", str(other))
    assert result.exit_code == 0
    assert result.stdout.splitlines() == [
        "changed  tenants.acme.discount_percent: 20% -> 25%",
        "changed  tools.search: 0.002 -> 0.003",
    ]
    code, document = run_json(runner, "diff", str(other))
    assert document["data"]["from"]["pricing_version"] == 1
    assert document["data"]["to"] == {"path": str(other), "pricing_version": 2}
    assert len(document["data"]["changes"]) == 2


def test_diff_shows_rate_limits_and_x402_terms(runner: CliRunner, home: Path,
                                              tmp_path: Path) -> None:
    """Rate limits and x402 change what is refused and what is offered: a diff names them."""
    other = tmp_path / "other.toml"
    other.write_text(SAMPLE_PRICING.replace("version = 1", "version = 2")
                     .replace('[tools.search]\nprice = "0.002"              # per call',
                              '[tools.search]\nprice = "0.002"\nx402 = true')
                     + '\n[limits]\ntoken_calls = ["10/s", "300/m"]\n'
                     + '\n[tenants.acme.limits]\nagent_spend = ["1.00/m"]\n'
                     + '\n[x402]\nenabled = true\n')
    assert run(runner, "validate", str(other)).exit_code == 0

    result = run(runner, "diff", str(other))

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "added    limits.token_calls: - -> 10/s, 300/m",
        "added    tenants.acme.limits.agent_spend: - -> 1.00/m",
        "added    tools.search.x402: - -> true",
        "added    x402.enabled: - -> true",
        "added    x402.max_timeout: - -> 60s",
        "added    x402.tenant: - -> x402",
    ]
    code, document = run_json(runner, "diff", str(other))
    assert {change["key"]: change["tenant"] for change in document["data"]["changes"]}[
        "tenants.acme.limits.agent_spend"] == "acme"


def test_diff_of_the_same_table_is_empty(runner: CliRunner, home: Path) -> None:
    result = run(runner, "diff", str(home / "pricing.toml"))
    assert (result.exit_code, result.stdout, result.stderr) == (0, "", "no changes\n")


def test_quote_prints_the_amount_and_the_rule(runner: CliRunner, home: Path) -> None:
    result = run(runner, "quote", "summarize", "--tenant", "acme")
    assert result.exit_code == 0
    assert result.stdout == "0.40\n"
    assert "rule tools.summarize-discount:20%, pricing version 1" in flat(result.stderr)
    code, document = run_json(runner, "quote", "summarize", "-t", "acme", "--units", "100")
    assert document["data"] == {
        "tool": "summarize", "tenant": "acme", "units": 100, "amount_usd": "0.0008",
        "asset": "USDC", "rule": "tools.summarize-discount:20%", "pricing_version": 1,
        "free": False, "discount_percent": 20, "per_unit_usd": "0.00001", "max_usd": "0.40",
    }


def test_quote_an_unknown_tool_without_default_is_price_unknown(
    runner: CliRunner, home: Path
) -> None:
    path = home / "pricing.toml"
    path.write_text(SAMPLE_PRICING.replace('default_price = "0.01"', ""))
    code, document = run_json(runner, "quote", "translate")
    assert code == 10
    assert document["errors"][0]["code"] == "PRICE_UNKNOWN"


def test_quote_refuses_negative_units(runner: CliRunner, home: Path) -> None:
    result = runner.invoke(app, ["quote", "summarize", "--units", "-1"])
    assert result.exit_code == 2


# --- validate against the ledger's pricing versions -------------------------------------------

RECORDED_AT = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)


@pytest.fixture
def ledger(home: Path, engine: Engine, db_url: str, monkeypatch: pytest.MonkeyPatch) -> Engine:
    """The home's ledger (SQLite in the home, or PostgreSQL), migrated and empty."""
    monkeypatch.setenv("MCPBILL_DB_URL", db_url)
    return engine


def record(engine: Engine, table: PricingTable, at: datetime = RECORDED_AT) -> None:
    """What a verifier does with a table it charges with."""
    with writing(engine) as conn:
        conn.execute(insert(pricing_versions).values(
            version=table.version, document=json.dumps(table.to_document(), sort_keys=True),
            recorded_at=at, digest=table.digest))


def validate_json(cli: Invoke, *args: str) -> tuple[int, dict[str, Any]]:
    """`mcpbill pricing validate ARGS --json` through the whole app, which closes the ledger."""
    result = cli("pricing", "validate", *args, "--json")
    return result.exit_code, json.loads(result.stdout)


def test_validate_refuses_prices_changed_without_a_version_bump(
    cli: Invoke, home: Path, ledger: Engine
) -> None:
    record(ledger, SAMPLE)
    path = home / "pricing.toml"
    path.write_text(SAMPLE_PRICING.replace('price = "0.002"', 'price = "0.003"'))
    code, document = validate_json(cli)
    assert (code, document["status"], document["data"]) == (10, "error", None)
    assert document["errors"] == [{
        "code": "PRICING_VERSION_REUSED",
        "message": f"{path}: version 1 has other prices than the version 1 the ledger charged "
                   "with (recorded 2026-03-04 05:06:07 UTC); bump `version` to 2",
        "path": str(path), "pricingVersion": 1, "nextVersion": 2,
        "recordedAt": "2026-03-04T05:06:07.000000Z",
    }]
    result = cli("pricing", "validate")
    assert result.exit_code == 10
    assert "PRICING_VERSION_REUSED" in result.stderr and "bump `version` to 2" in flat(
        result.stderr)


def test_validate_names_a_version_past_every_recorded_one(
    cli: Invoke, home: Path, ledger: Engine, tmp_path: Path
) -> None:
    record(ledger, SAMPLE)
    record(ledger, replace(SAMPLE, version=7))
    other = tmp_path / "other.toml"  # any file is checked against the home's ledger
    other.write_text(SAMPLE_PRICING.replace("discount_percent = 20", "discount_percent = 25"))
    code, document = validate_json(cli, str(other))
    assert code == 10
    assert document["errors"][0]["message"].endswith("; bump `version` to 8")
    assert document["errors"][0]["message"].startswith(f"{other}: version 1 has other prices")


def test_validate_passes_the_recorded_table_and_a_new_version(
    cli: Invoke, home: Path, ledger: Engine, tmp_path: Path
) -> None:
    record(ledger, SAMPLE)
    code, document = validate_json(cli)
    assert (code, document["data"]["version_recorded"]) == (0, True)
    other = tmp_path / "other.toml"
    other.write_text(SAMPLE_PRICING.replace('price = "0.002"', 'price = "0.003"')
                     .replace("version = 1", "version = 2"))
    code, document = validate_json(cli, str(other))
    assert (code, document["data"]["version_recorded"]) == (0, False)
    # Comments and layout are not prices: the normal form of the same table is recorded too.
    (home / "pricing.toml").write_text(render_pricing(SAMPLE))
    assert validate_json(cli)[1]["data"]["version_recorded"] is True


def test_validate_without_a_ledger_passes_and_creates_none(cli: Invoke, home: Path) -> None:
    path = home / "pricing.toml"
    path.write_text(SAMPLE_PRICING.replace('price = "0.002"', 'price = "0.003"'))
    code, document = validate_json(cli)
    assert (code, document["data"]["version_recorded"]) == (0, False)
    assert sorted(p.name for p in home.iterdir()) == ["pricing.toml"]


def test_validate_with_an_empty_ledger_file_passes(cli: Invoke, home: Path) -> None:
    (home / "ledger.db").touch()  # not initialized: nothing recorded, nothing to check
    code, document = validate_json(cli)
    assert (code, document["data"]["version_recorded"]) == (0, False)


def test_validate_with_an_unreachable_ledger_says_it_did_not_check(
    cli: Invoke, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MCPBILL_DB_URL", "postgresql+psycopg://nobody@127.0.0.1:1/none")
    result = cli("pricing", "validate", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["data"]["version_recorded"] is False
    assert "not checked against the ledger: cannot reach the ledger" in flat(result.stderr)


def test_a_hand_edit_after_a_verifier_charged_is_refused(
    ledger_cli: Invoke, isolated_home: Path
) -> None:
    cli = ledger_cli
    ok_json(cli("wallet", "fund", "--demo", "1", "--json"))
    token = ok_json(cli("token", "issue", "--limit", "0.5", "--json"))["token"]
    verifier = Verifier.from_settings()
    try:
        verifier.charge(token, "search", idempotency_key="first")
    finally:
        verifier.close()
    assert ok_json(cli("pricing", "validate", "--json"))["version_recorded"] is True
    path = isolated_home / "pricing.toml"
    path.write_text(path.read_text().replace('price = "0.002"', 'price = "0.003"'))
    result = cli("pricing", "validate", "--json")
    assert result.exit_code == 10, result.output
    assert error_json(result, "PRICING_VERSION_REUSED")["nextVersion"] == 2


@pytest.mark.parametrize("command", ["show", "set", "unset", "validate", "diff", "quote"])
def test_every_command_has_help(runner: CliRunner, command: str) -> None:
    result = run(runner, command, "--help")
    assert result.exit_code == 0
    assert "--json" in result.stdout

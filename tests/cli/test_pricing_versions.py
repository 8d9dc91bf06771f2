"""Pricing versions through the whole CLI, one test per past bug.

A version is a 32-bit INTEGER in the ledger (``pricing_versions.version``): a larger one used to
pass ``pricing validate`` on SQLite and break every paid call, and on PostgreSQL to break
``pricing validate`` itself. ``pricing set``/``unset`` used to bump the file's version by one
even when the ledger had charged other prices under the next number.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, insert

from mcpbill_cli import Verifier
from mcpbill_cli.errors import PricingInvalid
from mcpbill_cli.ledger.engine import writing
from mcpbill_cli.ledger.models import pricing_versions
from mcpbill_cli.pricing import SAMPLE_PRICING, PricingSource, load_pricing, parse_pricing
from mcpbill_cli.receipts import Receipt
from tests.cli.conftest import Invoke, error_json, ok_json

LAST_VERSION = 2**31 - 1  # pricing_versions.version is a 32-bit INTEGER on both backends
PAST_32_BITS = [2**31, 202612071430, 2**63 - 1]
RECORDED_AT = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)


def flat(text: str) -> str:
    """Output without Rich's line wrapping."""
    return " ".join(text.split())


def sample(version: int, **replacements: str) -> str:
    text = SAMPLE_PRICING.replace("version = 1", f"version = {version}", 1)
    for old, new in replacements.items():
        text = text.replace(old, new, 1)
    return text


@pytest.fixture
def ledger_home(ledger_cli: Invoke, isolated_home: Path) -> Path:
    """An initialized home on a fresh ledger (SQLite or PostgreSQL)."""
    return isolated_home


@pytest.fixture
def token(ledger_cli: Invoke) -> str:
    ok_json(ledger_cli("wallet", "fund", "--demo", "10", "--json"))
    return str(ok_json(ledger_cli("token", "issue", "--limit", "5", "--json"))["token"])


def charge(token: str, tool: str, key: str) -> Receipt:
    """One paid call by a verifier started now on the home, as a server would make it."""
    verifier = Verifier.from_settings()
    try:
        return verifier.charge(token, tool, idempotency_key=key)
    finally:
        verifier.close()


def record(engine: Engine, version: int) -> None:
    """What a verifier does with a table it charges with."""
    table = parse_pricing(sample(version))
    with writing(engine) as conn:
        conn.execute(insert(pricing_versions).values(
            version=version, document=json.dumps(table.to_document(), sort_keys=True),
            recorded_at=RECORDED_AT, digest=table.digest))


# --- defect 1: a version past 32 bits ----------------------------------------------------------


@pytest.mark.parametrize("version", PAST_32_BITS)
def test_validate_refuses_a_version_past_32_bits_naming_the_key_and_bound(
    ledger_cli: Invoke, ledger_home: Path, version: int
) -> None:
    path = ledger_home / "pricing.toml"
    path.write_text(sample(version))
    result = ledger_cli("pricing", "validate", "--json")
    assert result.exit_code == 10, result.output
    error = error_json(result, "PRICING_INVALID")
    assert (error["key"], error["line"], error["path"]) == ("version", 6, str(path))
    assert error["message"].startswith(f"{path} line 6: version: ")
    assert f"{version}" in error["message"] and "2147483647" in error["message"]
    result = ledger_cli("pricing", "validate")
    assert result.exit_code == 10 and "PRICING_INVALID" in result.stderr
    assert "2147483647" in flat(result.stderr) and "Traceback" not in result.output


def test_validate_passes_the_last_32_bit_version(ledger_cli: Invoke, ledger_home: Path) -> None:
    (ledger_home / "pricing.toml").write_text(sample(LAST_VERSION))
    data = ok_json(ledger_cli("pricing", "validate", "--json"))
    assert (data["pricing_version"], data["version_recorded"]) == (LAST_VERSION, False)


def test_status_reports_a_version_past_32_bits(ledger_cli: Invoke, ledger_home: Path) -> None:
    (ledger_home / "pricing.toml").write_text(sample(202612071430))
    result = ledger_cli("status", "--json")
    assert result.exit_code == 10, result.output
    codes = [error["code"] for error in json.loads(result.stdout)["errors"]]
    assert "PRICING_INVALID" in codes


@pytest.mark.parametrize("command", [("set", "foo", "0.5"), ("unset", "search")])
@pytest.mark.parametrize("version", [2**63 - 1, 202612071430])
def test_editing_a_file_past_32_bits_is_refused_and_leaves_it(
    cli: Invoke, isolated_home: Path, command: tuple[str, ...], version: int
) -> None:
    assert cli("init").exit_code == 0
    path = isolated_home / "pricing.toml"
    path.write_text(sample(version))
    before = path.read_bytes()
    result = cli("pricing", *command, "--json")
    assert result.exit_code == 10, result.output
    assert error_json(result, "PRICING_INVALID")["key"] == "version"
    assert path.read_bytes() == before


@pytest.mark.parametrize("dry_run", [(), ("--dry-run",)])
@pytest.mark.parametrize("command", [("set", "foo", "0.5"), ("unset", "search")])
def test_an_edit_never_writes_a_version_past_the_last(
    cli: Invoke, isolated_home: Path, command: tuple[str, ...], dry_run: tuple[str, ...]
) -> None:
    assert cli("init").exit_code == 0
    path = isolated_home / "pricing.toml"
    path.write_text(sample(LAST_VERSION))
    before = path.read_bytes()
    result = cli("pricing", *command, *dry_run, "--json")
    assert result.exit_code == 10, result.output
    error = error_json(result, "PRICING_INVALID")
    assert (error["key"], error["path"]) == ("version", str(path))
    assert "2147483647" in error["message"] and "by hand" in error["message"]
    assert path.read_bytes() == before
    result = cli("pricing", *command, *dry_run)
    assert result.exit_code == 10 and "2147483647" in flat(result.stderr)
    assert path.read_bytes() == before


@pytest.mark.parametrize("broken", [
    sample(202612071430, **{'default_price = "0.01"': 'default_price = "0.02"'}),
    sample(2, **{'price = "0.002"': 'price = "-0.002"'}),
], ids=["version_past_32_bits", "negative_price"])
def test_a_running_verifier_keeps_the_last_good_table_when_the_file_breaks(
    ledger_cli: Invoke, ledger_home: Path, token: str, broken: str
) -> None:
    path = ledger_home / "pricing.toml"
    verifier = Verifier.from_settings(pricing=PricingSource(path, check_interval=0))
    try:
        first = verifier.charge(token, "translate", idempotency_key="before")
        path.write_text(broken)
        after = verifier.charge(token, "translate", idempotency_key="after")
        assert isinstance(verifier.pricing.last_error, PricingInvalid)
    finally:
        verifier.close()
    assert (first.amount, first.claims["pricingVersion"]) == (10_000, 1)
    assert (after.amount, after.claims["pricingVersion"]) == (10_000, 1)


def test_a_verifier_starting_on_a_version_past_32_bits_is_refused(ledger_home: Path) -> None:
    """A BillingError when the server starts, not a DataError on every call; it is raised
    before the verifier opens the ledger, so nothing is left open (warnings are errors)."""
    (ledger_home / "pricing.toml").write_text(sample(202612071430))
    with pytest.raises(PricingInvalid, match="version: .*2147483647"):
        Verifier.from_settings()


# --- defect 2: an edit reusing a version the ledger charged with ------------------------------


def charge_v5_v6_then_restore_v5(cli: Invoke, home: Path, token: str) -> Path:
    """The repro: v5 charged, v6 (another default price) charged, then the v5 file restored."""
    path = home / "pricing.toml"
    path.write_text(sample(5))
    assert charge(token, "translate", "v5").claims["pricingVersion"] == 5
    path.write_text(sample(6, **{'default_price = "0.01"': 'default_price = "0.02"'}))
    assert charge(token, "translate", "v6").claims["pricingVersion"] == 6
    path.write_text(sample(5))
    assert ok_json(cli("pricing", "validate", "--json"))["version_recorded"] is True
    return path


@pytest.mark.parametrize("command", [("set", "baz", "0.3"), ("unset", "search")])
def test_an_edit_bumps_past_every_version_the_ledger_charged_with(
    ledger_cli: Invoke, ledger_home: Path, token: str, command: tuple[str, ...]
) -> None:
    path = charge_v5_v6_then_restore_v5(ledger_cli, ledger_home, token)
    data = ok_json(ledger_cli("pricing", *command, "--json"))
    assert (data["previous_version"], data["pricing_version"]) == (5, 7)
    assert load_pricing(path).version == 7
    assert ok_json(ledger_cli("pricing", "validate", "--json"))["version_recorded"] is False
    receipt = charge(token, "translate", "after-edit")
    assert receipt.claims["pricingVersion"] == 7
    assert ok_json(ledger_cli("pricing", "validate", "--json"))["version_recorded"] is True


def test_an_edit_says_the_version_it_wrote_past_the_ledgers(
    ledger_cli: Invoke, ledger_home: Path, token: str
) -> None:
    path = charge_v5_v6_then_restore_v5(ledger_cli, ledger_home, token)
    before = path.read_bytes()
    result = ledger_cli("pricing", "set", "baz", "0.3", "--dry-run")
    assert result.exit_code == 0, result.output
    assert f"would write pricing version 7 to {path}" in flat(result.stderr)
    assert path.read_bytes() == before
    result = ledger_cli("pricing", "set", "baz", "0.3")
    assert result.exit_code == 0, result.output
    assert f"wrote pricing version 7 to {path}" in flat(result.stderr)


def test_an_edit_refuses_when_the_ledger_charged_the_last_version(
    ledger_cli: Invoke, ledger_home: Path, engine: Engine
) -> None:
    record(engine, LAST_VERSION)
    path = ledger_home / "pricing.toml"
    before = path.read_bytes()
    result = ledger_cli("pricing", "set", "baz", "0.3", "--json")
    assert result.exit_code == 10, result.output
    error = error_json(result, "PRICING_INVALID")
    assert error["key"] == "version" and "2147483647" in error["message"]
    assert path.read_bytes() == before


def test_an_edit_with_an_unreachable_ledger_bumps_the_file_and_says_so(
    cli: Invoke, isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli("init").exit_code == 0
    monkeypatch.setenv("MCPBILL_DB_URL", "postgresql+psycopg://nobody@127.0.0.1:1/none")
    result = cli("pricing", "set", "baz", "0.3", "--json")
    assert ok_json(result)["pricing_version"] == 2
    assert "not checked against the ledger: cannot reach the ledger" in flat(result.stderr)

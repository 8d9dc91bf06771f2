"""The data contract of `--json` and the exports: snake_case fields, `*_usd` decimal strings,
every time RFC 3339 UTC with `Z` to the microsecond."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from tests.cli.conftest import Invoke, ok_json
from tests.cli.data_contract import SCHEMAS, TIMESTAMP, assert_conventions
from tests.cli.test_contract import command_paths


def test_events_export_orders_by_at_as_by_id(ledger_cli: Invoke, tmp_path: Path) -> None:
    """An `issue` event took the token's whole-second time, so it sorted before the deposit
    written just before it."""
    for _ in range(3):
        ok_json(ledger_cli("wallet", "fund", "--demo", "1", "--json"))
        ok_json(ledger_cli("token", "issue", "--limit", "0.5", "--json"))
    out = tmp_path / "events.jsonl"
    ok_json(ledger_cli("events", "export", "--out", str(out), "--json"))
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["kind"] for line in lines] == ["deposit", "issue"] * 3
    assert all(TIMESTAMP.match(line["at"]) for line in lines), lines
    assert sorted(lines, key=lambda line: line["at"]) == lines
    assert not all(line["at"].endswith(".000000Z") for line in lines if line["kind"] == "issue")


def test_every_schema_is_valid_and_documents_a_command() -> None:
    commands = {"-".join(path) for path in command_paths()}
    exports = {"events-export-line", "audit-seals-export-line"}
    schemas = {path.stem: path for path in SCHEMAS.glob("*.json")}
    assert set(schemas) == commands | exports
    for path in schemas.values():
        schema = json.loads(path.read_text())
        Draft202012Validator.check_schema(schema)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema", path.name


@pytest.mark.parametrize("data", [
    {"pricingVersion": 1},
    {"limit_usd": 1.5},
    {"limit_usd": "1.5 USDC"},
    {"expires_at": "2026-12-05T16:46:14+00:00"},
    {"tokens": [{"seen": "2026-12-05T16:46:14.123Z"}]},
    {"totals": {"tenant": {"acme": {"chargedUsd": "0.01"}}}},
], ids=["camelCase", "usd-number", "usd-text", "offset-time", "millisecond-time",
        "nested-camelCase"])
def test_the_conventions_check_refuses_what_breaks_the_contract(data: object) -> None:
    with pytest.raises(AssertionError):
        assert_conventions(data)


def test_the_conventions_check_allows_keys_that_are_data() -> None:
    assert_conventions({"totals": {"agent": {"acme/Crawler-1": {"charged_usd": "0.01"}}},
                        "refusals": {"BUDGET_EXCEEDED": 2}, "at": "2026-12-05T16:46:14.123456Z"})

"""The data contract of `--json` and the exports: snake_case fields, `*_usd` decimal strings,
every time RFC 3339 UTC with `Z` to the microsecond."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.cli.conftest import Invoke, ok_json

RFC3339_Z_MICRO = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")


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
    assert all(RFC3339_Z_MICRO.match(line["at"]) for line in lines), lines
    assert sorted(lines, key=lambda line: line["at"]) == lines
    assert not all(line["at"].endswith(".000000Z") for line in lines if line["kind"] == "issue")

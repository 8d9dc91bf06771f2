"""`mcpbill reconcile` and `mcpbill events export` through the CLI: exit codes, the JSON
envelope, CSV, and the JSON lines of the export. The commands are registered here on a Typer
app with the real root callback, as cli/__init__.py will register them."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import typer
from sqlalchemy import Engine
from typer.testing import CliRunner, Result

from mcpbill_cli.cli import root
from mcpbill_cli.cli.reconcile import events_app, reconcile
from mcpbill_cli.config import load_settings
from mcpbill_cli.events_export import SCHEMA_VERSION
from mcpbill_cli.setup import initialize

from .support import DAY, Ledger, small_ledger

Invoke = Callable[..., Result]
EVENT_FIELDS = ["schema_version", "seq", "at", "kind", "code", "tenant", "agent", "jti",
                "token_hash", "tool", "amount_usd", "amount_micro", "ref", "detail", "demo",
                "prev_hash", "hash"]


def make_app() -> typer.Typer:
    app = typer.Typer(pretty_exceptions_show_locals=False)
    app.callback()(root)
    app.command("reconcile")(reconcile)
    app.add_typer(events_app, name="events")
    return app


@pytest.fixture
def home_ledger(engine: Engine, db_url: str, monkeypatch: pytest.MonkeyPatch) -> Ledger:
    """An initialized home (keys, config) whose ledger holds the small day."""
    monkeypatch.setenv("MCPBILL_DB_URL", db_url)
    settings = load_settings()
    initialize(settings, alg="EdDSA", mode="demo", force=False)
    return small_ledger(engine, settings.keys_dir)


@pytest.fixture
def cli(home_ledger: Ledger) -> Invoke:
    runner, app = CliRunner(), make_app()

    def invoke(*args: str) -> Result:
        return runner.invoke(app, list(args), catch_exceptions=False)

    return invoke


def envelope(result: Result) -> dict[str, object]:
    document: dict[str, object] = json.loads(result.stdout)
    return document


def test_a_clean_day_exits_0_with_tables_and_a_verdict(cli: Invoke) -> None:
    result = cli("reconcile", "--date", DAY.isoformat(), "--by", "tenant", "--by", "token",
                 "--verify-receipts", "--jobs", "1")
    assert result.exit_code == 0, result.output
    assert "by tenant" in result.stdout and "by token" in result.stdout
    assert "globex" in result.stdout
    assert result.stderr.splitlines()[-1] == "clean: no findings"


def test_json_of_a_clean_day(cli: Invoke) -> None:
    result = cli("reconcile", "--date", DAY.isoformat(), "--json")
    assert result.exit_code == 0, result.output
    document = envelope(result)
    assert (document["status"], document["errors"]) == ("ok", [])
    data = document["data"]
    assert isinstance(data, dict)
    assert data["findings"] == [] and data["errors"] == 0
    assert data["window"] == {"start": "2031-03-14T00:00:00+00:00",
                              "end": "2031-03-15T00:00:00+00:00"}
    assert data["summary"]["charged_usd"] == "0.069872"
    assert data["totals"]["tenant"]["globex"]["charged_usd"] == "0.05"
    assert set(data["audit_anchor"]) == {"seq", "hash"}


def test_findings_exit_20_and_the_envelope_says_why(cli: Invoke, home_ledger: Ledger) -> None:
    charge = home_ledger.calls["charge"]
    home_ledger.sql("UPDATE calls SET receipt = NULL WHERE id = :c", c=charge)

    human = cli("reconcile", "--date", DAY.isoformat())
    result = cli("reconcile", "--date", DAY.isoformat(), "--json")

    assert human.exit_code == 20, human.output
    assert "captured_call_incomplete" in human.stdout and charge in human.stdout
    assert human.stderr.splitlines()[-1] == "1 error finding(s), 0 warning(s)"
    assert result.exit_code == 20
    document = envelope(result)
    assert document["status"] == "error"
    assert document["errors"] == [{"code": "RECONCILE_FINDINGS",
                                   "message": "1 error finding(s), 0 warning(s)"}]
    finding = document["data"]["findings"][0]  # type: ignore[index]
    assert finding == {"name": "captured_call_incomplete", "severity": "error", "count": 1,
                       "message": "a captured call lacks exactly one posted transfer or its "
                                  "receipt",
                       "rows": [{"table": "calls", "key": charge, "detail": ""}]}


def test_warnings_fail_only_with_strict(cli: Invoke, home_ledger: Ledger) -> None:
    home_ledger.sql("DELETE FROM pricing_versions")
    assert cli("reconcile", "--date", DAY.isoformat()).exit_code == 0
    assert cli("reconcile", "--date", DAY.isoformat(), "--strict").exit_code == 20


def test_csv_totals(cli: Invoke) -> None:
    result = cli("reconcile", "--date", DAY.isoformat(), "--csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert rows[0]["dimension"] == "all" and rows[0]["calls"] == "5"
    tenants = {r["key"]: r for r in rows if r["dimension"] == "tenant"}
    assert tenants["globex"]["charged_usd"] == "0.05"
    assert tenants["acme"]["voided"] == "1"


def test_a_bad_date_is_invalid_input(cli: Invoke) -> None:
    result = cli("reconcile", "--date", "14/03/2031", "--json")
    assert result.exit_code == 3
    assert envelope(result)["errors"][0]["code"] == "INVALID_INPUT"  # type: ignore[index]


def test_events_export_writes_one_json_line_per_event(cli: Invoke) -> None:
    result = cli("events", "export", "--since", DAY.isoformat())
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [list(line) for line in lines] == [EVENT_FIELDS] * len(lines)
    assert [line["seq"] for line in lines] == list(range(1, len(lines) + 1))
    charge = next(line for line in lines if line["kind"] == "charge")
    assert charge["schema_version"] == SCHEMA_VERSION
    assert (charge["amount_usd"], charge["amount_micro"]) == ("0.005", 5000)
    assert charge["at"].endswith("Z") and charge["tenant"] == "acme"
    assert lines[1]["prev_hash"] == lines[0]["hash"]
    resumed = cli("events", "export", "--after-seq", str(lines[-2]["seq"]))
    assert [json.loads(line)["seq"] for line in resumed.stdout.splitlines()] == [
        lines[-1]["seq"]]


def test_events_export_to_a_file_with_a_json_summary(cli: Invoke, tmp_path: Path) -> None:
    target = tmp_path / "out" / "events.jsonl"
    result = cli("events", "export", "--until", "2031-03-14T09:00:01Z", "--out", str(target),
                 "--json")
    assert result.exit_code == 0, result.output
    assert envelope(result)["data"] == {"events": 5, "first_seq": 1, "last_seq": 5,
                                        "out": str(target)}
    assert [json.loads(line)["kind"] for line in target.read_text().splitlines()] == [
        "deposit", "deposit", "issue", "issue", "charge"]


def test_events_export_json_needs_a_file(cli: Invoke) -> None:
    result = cli("events", "export", "--json")
    assert result.exit_code == 3
    assert envelope(result)["errors"][0]["code"] == "INVALID_INPUT"  # type: ignore[index]


@pytest.mark.parametrize("command", [("reconcile",), ("events", "export")])
def test_help_teaches_and_offers_json(command: tuple[str, ...]) -> None:
    result = CliRunner().invoke(make_app(), [*command, "--help"], catch_exceptions=False)
    assert result.exit_code == 0 and "--json" in result.stdout
    assert len(result.stdout.split("Usage:")[1].split("╭")[0].strip().splitlines()) >= 2

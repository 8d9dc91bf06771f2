"""`mcpbill reconcile` and `mcpbill events export` through the CLI: exit codes, the JSON
envelope, CSV, and the JSON lines of the export. The commands are registered here on a Typer
app with the real root callback, as cli/__init__.py will register them."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import typer
from sqlalchemy import Engine, select
from typer.testing import CliRunner, Result

from mcpbill_cli.cli import root
from mcpbill_cli.cli.reconcile import events_app, reconcile
from mcpbill_cli.clock import utcnow
from mcpbill_cli.config import load_settings
from mcpbill_cli.events_export import SCHEMA_VERSION
from mcpbill_cli.ledger import audit
from mcpbill_cli.ledger import clock as ledger_clock
from mcpbill_cli.ledger.engine import reading, writing
from mcpbill_cli.ledger.models import events
from mcpbill_cli.reconcile import FINDINGS
from mcpbill_cli.setup import initialize

from .support import DAY, Ledger, midnight, small_ledger

Invoke = Callable[..., Result]
EVENT_FIELDS = ["schema_version", "id", "at", "kind", "code", "tenant", "agent", "jti",
                "token_hash", "tool", "amount_usd", "amount_micro", "ref", "detail", "demo",
                "seal", "hash"]


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
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert rows[0][:3] == ["dimension", "key", "calls"]
    assert {row[0] for row in rows[1:]} == {"all", "tenant", "token"}
    assert ["tenant", "globex"] in [row[:2] for row in rows]
    assert result.stderr.splitlines()[-1] == "clean: no findings"


def test_json_of_a_clean_day(cli: Invoke, home_ledger: Ledger) -> None:
    result = cli("reconcile", "--date", DAY.isoformat(), "--json")
    assert result.exit_code == 0, result.output
    document = envelope(result)
    assert (document["status"], document["errors"]) == ("ok", [])
    data = document["data"]
    assert isinstance(data, dict)
    assert data["findings"] == [] and data["errors"] == 0
    assert data["window"] == {"start": "2031-03-14T00:00:00.000000Z",
                              "end": "2031-03-15T00:00:00.000000Z"}
    assert data["summary"]["charged_usd"] == "0.069872"
    assert data["totals"]["tenant"]["globex"]["charged_usd"] == "0.05"
    assert data["audit_anchor"] == {"seal": 2, "hash": home_ledger.reconcile().audit_anchor[1]}
    assert data["skipped"] == ["receipt_signatures (--verify-receipts)", "onchain (--onchain)"]


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
    written = result.stdout_bytes.decode()  # as written: Click's .stdout makes CRLF LF
    lines = written.split("\r\n")
    assert lines[-1] == "" and all("\n" not in line for line in lines)  # CRLF, as RFC 4180
    rows = list(csv.DictReader(io.StringIO(written, newline="")))
    assert rows[0]["dimension"] == "all" and rows[0]["calls"] == "5"
    tenants = {r["key"]: r for r in rows if r["dimension"] == "tenant"}
    assert tenants["globex"]["charged_usd"] == "0.05"
    assert tenants["acme"]["voided"] == "1"
    as_json = envelope(cli("reconcile", "--date", DAY.isoformat(), "--json"))["data"]
    for row in rows:  # the refusals object as JSON, as in --json ({} for none)
        assert isinstance(json.loads(row["refusals"]), dict)
    assert json.loads(rows[0]["refusals"]) == as_json["summary"]["refusals"]  # type: ignore[index]


def test_a_settled_day_leaves_its_snapshot_unless_told_not_to(
        cli: Invoke, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a clock two days on, the day has settled: its reconcile leaves the snapshot of the
    sums the next day starts from; --no-snapshot writes none; --full-history reads every
    transfer whatever snapshot there is."""
    monkeypatch.setattr(ledger_clock, "ledger_clock",
                        lambda engine: lambda: midnight(DAY + timedelta(days=2)))
    day, next_day = DAY.isoformat(), (DAY + timedelta(days=1)).isoformat()

    def data(*args: str) -> dict[str, Any]:
        result = cli("reconcile", *args, "--json")
        assert result.exit_code == 0, result.output
        document: dict[str, Any] = envelope(result)["data"]  # type: ignore[assignment]
        return document

    untouched = data("--date", day, "--no-snapshot")
    assert untouched["snapshot_at"] is None
    assert "ledger_invariants (full history)" in untouched["checks"]
    assert data("--date", day)["snapshot_at"] == "2031-03-15T00:00:00.000000Z"
    assert "ledger_invariants (from snapshot 2031-03-15T00:00:00.000000Z)" in data(
        "--date", next_day)["checks"]
    assert "ledger_invariants (full history)" in data("--date", next_day,
                                                      "--full-history")["checks"]


def test_a_bad_date_is_invalid_input(cli: Invoke) -> None:
    result = cli("reconcile", "--date", "14/03/2031", "--json")
    assert result.exit_code == 3
    assert envelope(result)["errors"][0]["code"] == "INVALID_INPUT"  # type: ignore[index]


def test_events_export_writes_one_json_line_per_event(cli: Invoke,
                                                       home_ledger: Ledger) -> None:
    result = cli("events", "export", "--since", DAY.isoformat())
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [list(line) for line in lines] == [EVENT_FIELDS] * len(lines)
    assert [line["id"] for line in lines] == list(range(1, len(lines) + 1))
    charge = next(line for line in lines if line["kind"] == "charge")
    assert (charge["schema_version"], SCHEMA_VERSION) == (2, 2)
    assert (charge["amount_usd"], charge["amount_micro"]) == ("0.005", 5000)
    assert charge["at"].endswith("Z") and charge["tenant"] == "acme"
    assert [line["seal"] for line in lines] == [1] * 6 + [2] * (len(lines) - 6)
    with reading(home_ledger.engine) as conn:
        stored = {row.id: dict(row._mapping) for row in conn.execute(select(events))}
    assert [line["hash"] for line in lines] == [
        audit.event_digest(stored[line["id"]]) for line in lines]
    resumed = cli("events", "export", "--after", str(lines[-2]["id"]))
    assert [json.loads(line)["id"] for line in resumed.stdout.splitlines()] == [
        lines[-1]["id"]]


def test_events_export_to_a_file_with_a_json_summary(cli: Invoke, tmp_path: Path) -> None:
    target = tmp_path / "out" / "events.jsonl"
    result = cli("events", "export", "--until", "2031-03-14T09:00:01Z", "--out", str(target),
                 "--json")
    assert result.exit_code == 0, result.output
    assert envelope(result)["data"] == {"events": 5, "first_id": 1, "last_id": 5,
                                        "cursor": 5, "out": str(target)}
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


def test_an_unsealed_event_exports_with_a_null_seal_and_hash(cli: Invoke,
                                                              home_ledger: Ledger) -> None:
    home_ledger.verifier.charge(home_ledger.tokens["acme"].token, "search", args={"late": 1})
    last = json.loads(cli("events", "export").stdout.splitlines()[-1])
    assert (last["kind"], last["seal"], last["hash"]) == ("charge", None, None)


def test_the_readme_lists_every_finding_as_the_code_does() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    documented = re.findall(r"^\| `([a-z][a-z0-9_]*)` \| (error|warning) \| (.+) \|$", readme,
                            flags=re.MULTILINE)
    assert documented == [(name, severity, meaning)
                          for name, (severity, meaning) in FINDINGS.items()]


def test_without_the_homes_key_ring_the_seal_signatures_are_skipped(
        cli: Invoke, home_ledger: Ledger) -> None:
    home_ledger.keys_dir.rename(home_ledger.keys_dir.with_name("keys-elsewhere"))
    result = cli("reconcile", "--date", DAY.isoformat(), "--json")
    assert result.exit_code == 0, result.output
    data = envelope(result)["data"]
    assert isinstance(data, dict) and data["findings"] == []
    assert f"seal_signatures (no key ring in {home_ledger.keys_dir})" in data["skipped"]
    assert "audit_chain (window)" in data["checks"]


def test_unsealed_events_warn_and_say_how_to_seal(cli: Invoke, home_ledger: Ledger) -> None:
    """The CLI counts as late what was written 5 s before the real clock, in any window."""
    with writing(home_ledger.engine) as conn:
        audit.record(conn, "wallet_link", at=utcnow() - timedelta(seconds=6), tenant="acme")
    result = cli("reconcile", "--date", DAY.isoformat(), "--json")
    assert result.exit_code == 0, result.output
    [finding] = envelope(result)["data"]["findings"]  # type: ignore[index]
    assert (finding["name"], finding["severity"], finding["count"]) == (
        "audit_unsealed", "warning", 1)
    assert "`mcpbill audit seal`" in finding["message"]
    assert cli("reconcile", "--date", DAY.isoformat(), "--strict").exit_code == 20


def test_no_snapshot_writes_no_findings_alert_either(cli: Invoke, home_ledger: Ledger) -> None:
    """--no-snapshot is for a read-only role or a replica: a run with findings writes no
    webhook event; without it, one."""
    from mcpbill_cli.ledger.models import webhook_events

    with writing(home_ledger.engine) as conn:
        audit.record(conn, "wallet_link", at=utcnow() - timedelta(seconds=6), tenant="acme")

    def alerts() -> int:
        with reading(home_ledger.engine) as conn:
            return len(conn.execute(select(webhook_events.c.id)).all())

    result = cli("reconcile", "--date", DAY.isoformat(), "--no-snapshot", "--json")
    assert result.exit_code == 0, result.output
    assert envelope(result)["data"]["findings"] and alerts() == 0  # type: ignore[index]
    assert cli("reconcile", "--date", DAY.isoformat(), "--json").exit_code == 0
    assert alerts() == 1


def test_unsealed_events_are_counted_in_one_row_and_no_more_is_said_hidden(
        cli: Invoke, home_ledger: Ledger) -> None:
    """audit_unsealed sums its events up in one row (the oldest): --max-rows hides none of
    them, so the report does not say it did."""
    with writing(home_ledger.engine) as conn:
        for _ in range(3):
            audit.record(conn, "wallet_link", at=utcnow() - timedelta(seconds=6), tenant="acme")
    result = cli("reconcile", "--date", DAY.isoformat())
    assert result.exit_code == 0, result.output
    [title] = [line for line in result.stderr.splitlines() if "audit_unsealed (3)" in line]
    assert "not listed" not in title, title
    assert [line.split("\t")[:2] for line in result.stdout.splitlines()
            if line.startswith("audit_unsealed")] == [["audit_unsealed", "events"]]


def test_a_finding_cut_by_max_rows_says_how_many_more(cli: Invoke, home_ledger: Ledger
                                                      ) -> None:
    home_ledger.sql("UPDATE tokens SET revoked_at = :at",
                    at=home_ledger.clock() - timedelta(hours=2))
    result = cli("reconcile", "--date", DAY.isoformat(), "--max-rows", "1")
    [title] = [line for line in result.stderr.splitlines() if "charge_after_revocation" in line]
    count = int(re.search(r"charge_after_revocation \((\d+)\)", title)[1])  # type: ignore[index]
    assert count > 1 and title.endswith(f"; {count - 1} more not listed (--max-rows)"), title

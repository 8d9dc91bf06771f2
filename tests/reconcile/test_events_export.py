"""`mcpbill events export --after` never skips an event that committed after higher ids were
shipped: the sealed events go out in seal order and the cursor is a place in it, and a late
commit lands in a later seal. Unsealed events follow, and go out again once sealed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, insert, select

from mcpbill_cli.ledger import audit
from mcpbill_cli.ledger.engine import reading, writing
from mcpbill_cli.ledger.models import events

from .support import Ledger
from .test_cli import Invoke, envelope


def shipped(cli: Invoke, tmp_path: Path, *args: str) -> tuple[list[dict[str, Any]], Any]:
    """The lines an export wrote, and its cursor."""
    out = tmp_path / "events.jsonl"
    result = cli("events", "export", "--out", str(out), "--json", *args)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    return lines, envelope(result)["data"]["cursor"]  # type: ignore[index]


def an_event(ledger: Ledger, **values: Any) -> int:
    with writing(ledger.engine) as conn:
        return int(conn.execute(insert(events).values(
            at=ledger.clock(), kind="topup", tenant="acme", amount=1, demo=False, **values)
            .returning(events.c.id)).scalar_one())


def test_a_lower_id_sealed_after_the_export_is_shipped_on_resume(
        cli: Invoke, home_ledger: Ledger, tmp_path: Path) -> None:
    """The event with the lower id commits last (as on PostgreSQL, where ids are taken before
    commit): it was not there when the higher one was shipped, and is shipped after it."""
    ledger = home_ledger
    with reading(ledger.engine) as conn:
        top = int(conn.execute(select(func.max(events.c.id))).scalar_one())
    later = an_event(ledger, id=top + 10)
    ledger.seal()
    first, cursor = shipped(cli, tmp_path)
    assert first[-1]["id"] == later == cursor and all(line["seal"] for line in first)

    late = an_event(ledger, id=top + 5)
    ledger.seal()
    resumed, cursor = shipped(cli, tmp_path, "--after", str(cursor))
    assert [(line["id"], line["seal"]) for line in resumed] == [(late, first[-1]["seal"] + 1)]
    assert cursor == late
    assert shipped(cli, tmp_path, "--after", str(cursor)) == ([], cursor)


def test_unsealed_events_follow_and_are_shipped_again_once_sealed(
        cli: Invoke, home_ledger: Ledger, tmp_path: Path) -> None:
    ledger = home_ledger
    _, cursor = shipped(cli, tmp_path)
    waiting = an_event(ledger)
    lines, again = shipped(cli, tmp_path, "--after", str(cursor))
    assert [(line["id"], line["seal"]) for line in lines] == [(waiting, None)]
    assert again == cursor  # the cursor stays at the last sealed event
    ledger.seal()
    lines, moved = shipped(cli, tmp_path, "--after", str(cursor))
    assert [line["id"] for line in lines] == [waiting] and lines[0]["seal"] is not None
    assert moved == waiting


def test_after_0_is_the_start_a_script_s_first_cursor(
        cli: Invoke, home_ledger: Ledger, tmp_path: Path) -> None:
    home_ledger.seal()
    waiting = an_event(home_ledger)
    everything, cursor = shipped(cli, tmp_path)
    assert everything[-1]["id"] == waiting and cursor is not None

    assert shipped(cli, tmp_path, "--after", "0") == (everything, cursor)
    assert shipped(cli, tmp_path, "--after", str(cursor)) == (everything[-1:], cursor)


def test_resuming_after_an_unsealed_event_is_refused(cli: Invoke, home_ledger: Ledger) -> None:
    waiting = an_event(home_ledger)
    result = cli("events", "export", "--after", str(waiting), "--json")
    assert result.exit_code == 3, result.output


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)  # SQLite: ids follow commits
def test_two_writers_committing_out_of_order_on_postgres(
        cli: Invoke, home_ledger: Ledger, tmp_path: Path) -> None:
    """Two real transactions: the first takes its id, the second takes the next and commits;
    the export ships the second; the first commits; the resumed export ships it."""
    ledger = home_ledger
    _, cursor = shipped(cli, tmp_path)
    with ledger.engine.connect() as slow:
        slow.begin()
        audit.record(slow, "topup", at=ledger.clock(), tenant="acme", amount=1)
        early = int(slow.execute(select(func.max(events.c.id))).scalar_one())
        with writing(ledger.engine) as quick:
            audit.record(quick, "topup", at=ledger.clock(), tenant="acme", amount=2)
        ledger.seal()
        lines, cursor = shipped(cli, tmp_path, "--after", str(cursor))
        assert [line["amount_micro"] for line in lines] == [2] and lines[0]["id"] > early
        slow.commit()
    ledger.seal()
    lines, cursor = shipped(cli, tmp_path, "--after", str(cursor))
    assert [(line["id"], line["amount_micro"]) for line in lines] == [(early, 1)]

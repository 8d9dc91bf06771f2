"""Windows and filters: a hold captured across midnight, --tenant/--agent/--tool, parsing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from mcpbill_cli.errors import InvalidInput
from mcpbill_cli.reconcile import Filters, Window

from .support import DAY, Ledger, rows_of


def test_a_hold_captured_across_midnight_is_clean_on_both_days(ledger: Ledger) -> None:
    clock = ledger.clock
    clock.now = datetime(DAY.year, DAY.month, DAY.day, 23, 59, 59, tzinfo=UTC)
    late = ledger.mint("late", tenant="globex", agent="agent-g")
    with ledger.verifier.call(late.token, "search") as billed:
        clock.advance(2)
    next_day = Window.day(DAY + timedelta(days=1))

    today, tomorrow = ledger.reconcile(), ledger.reconcile(window=next_day)

    assert rows_of(today) == rows_of(tomorrow) == []
    assert (today.summary.calls, today.summary.captured) == (6, 5)
    assert tomorrow.summary.calls == 0
    assert billed.receipt is not None
    assert today.totals["token"][late.claims.jti].charged == 10_000


def test_filters_narrow_totals_and_charge_findings_not_the_ledger_checks(
        ledger: Ledger) -> None:
    ledger.sql("UPDATE tokens SET limit_micro = 1000")  # every token overspent: ledger-wide
    ledger.sql("DELETE FROM pricing_versions")  # every charge unpriceable: per call

    report = ledger.reconcile(filters=Filters(tenant="globex"))

    assert sorted(report.totals["tenant"]) == ["globex"]
    assert (report.summary.calls, report.summary.charged) == (1, 50_000)
    by_name = {f.name: f for f in report.findings}
    assert by_name["pricing_version_unrecorded"].count == 1
    assert by_name["token_overspent"].count == 2


def test_tool_and_agent_filters(ledger: Ledger) -> None:
    by_tool = ledger.reconcile(filters=Filters(tool="search"))
    assert (sorted(by_tool.totals["tool"]), by_tool.summary.calls) == (["search"], 2)
    by_agent = ledger.reconcile(filters=Filters(agent="agent-g"))
    assert sorted(by_agent.totals["agent"]) == ["globex/agent-g"]


NOW = datetime(2031, 3, 20, 8, 30, tzinfo=UTC)


@pytest.mark.parametrize(("given", "start", "end"), [
    ({"day": "2031-03-14"}, datetime(2031, 3, 14, tzinfo=UTC), datetime(2031, 3, 15, tzinfo=UTC)),
    ({}, datetime(2031, 3, 19, tzinfo=UTC), datetime(2031, 3, 20, tzinfo=UTC)),
    ({"since": "2031-03-14T06:00:00+02:00", "until": "2031-03-14T07:00"},
     datetime(2031, 3, 14, 4, tzinfo=UTC), datetime(2031, 3, 14, 7, tzinfo=UTC)),
    ({"since": "2031-03-20"}, datetime(2031, 3, 20, tzinfo=UTC), NOW),
])
def test_windows_from_the_command_line(given: dict[str, str], start: datetime,
                                       end: datetime) -> None:
    window = Window.parse(now=NOW, **given)
    assert (window.start, window.end) == (start, end)


@pytest.mark.parametrize(("given", "message"), [
    ({"day": "14/03/2031"}, "is not a day"),
    ({"day": "2031-03-14", "since": "2031-03-13"}, "not both"),
    ({"until": "2031-03-14"}, "--to needs --from"),
    ({"since": "2031-03-15", "until": "2031-03-14"}, "before it starts"),
    ({"since": "yesterday"}, "is not a time"),
])
def test_bad_windows_are_refused(given: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        Window.parse(now=NOW, **given)

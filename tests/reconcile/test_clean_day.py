"""A busy day written by the real Verifier reconciles clean, with every check on."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sqlalchemy import Engine, func, select

from mcpbill_cli.keys import KeyRing
from mcpbill_cli.ledger.engine import reading
from mcpbill_cli.ledger.models import accounts, calls, refusal_counts, seals
from mcpbill_cli.reconcile import Filters, Window

from .support import DAY, USDC, busy_day


def test_a_busy_day_yields_no_finding(engine: Engine, tmp_path: Path) -> None:
    ledger = busy_day(engine, tmp_path / "keys")
    assert {info.status for info in KeyRing.load(ledger.keys_dir).keys.values()} == {
        "active", "retired"}

    report = ledger.reconcile(verify_receipts=True)

    assert report.findings == ()
    assert not report.failed(strict=True)
    assert report.checks == ("prices", "control_totals", "token_validity", "event_transfers",
                             "ledger_invariants (full history)", "refunds", "stale_holds",
                             "refused_captures", "deposits", "audit_chain (window)",
                             "seal_signatures", "receipt_signatures")
    assert report.skipped == ("onchain (--onchain)",)
    with reading(engine) as conn:
        revenue = conn.execute(select(func.sum(accounts.c.credits_posted))
                               .where(accounts.c.kind == "revenue")).scalar_one()
        made = conn.execute(select(func.count()).select_from(calls)).scalar_one()
    summary = report.summary
    assert (summary.calls, summary.charged) == (made, revenue)
    assert (summary.captured, summary.voided, summary.expired, summary.held) == (32, 2, 1, 0)
    assert dict(summary.refusals) == {"BUDGET_EXCEEDED": 1, "INVALID_CREDIT_TOKEN": 2,
                                      "SCOPE_DENIED": 1, "TOKEN_REVOKED": 1}
    assert (summary.deposits, summary.deposited) == (2, 150 * USDC)


def test_every_seal_and_no_seal_agree_on_a_clean_day(engine: Engine, tmp_path: Path) -> None:
    ledger = busy_day(engine, tmp_path / "keys")
    window, full = ledger.reconcile(), ledger.reconcile(chain="full")
    off = ledger.reconcile(chain="off")
    assert window.findings == full.findings == off.findings == ()
    assert full.checks[-2:] == ("audit_chain (full)", "seal_signatures")
    assert off.skipped[0] == "audit_chain (--chain off)" and off.audit_anchor is None
    with reading(engine) as conn:
        last = conn.execute(select(seals.c.number, seals.c.hash)
                            .order_by(seals.c.number.desc()).limit(1)).one()
    assert window.audit_anchor == full.audit_anchor == tuple(last)


def test_without_the_key_ring_every_check_but_the_signatures_runs(engine: Engine,
                                                                  tmp_path: Path) -> None:
    ledger = busy_day(engine, tmp_path / "keys")
    report = ledger.reconcile(keys_dir=None)
    assert report.findings == ()
    assert "audit_chain (window)" in report.checks and "seal_signatures" not in report.checks
    assert "seal_signatures (keys_dir)" in report.skipped


def test_totals_per_dimension_add_up(engine: Engine, tmp_path: Path) -> None:
    report = busy_day(engine, tmp_path / "keys").reconcile()
    for dimension in ("tenant", "tool"):
        keyed = report.totals[dimension].values()
        assert sum(t.calls for t in keyed) == report.summary.calls
        assert sum(t.charged for t in keyed) == report.summary.charged
    assert sorted(report.totals["tenant"]) == ["acme", "globex"]
    assert report.totals["tenant"]["globex"].deposited == 50 * USDC
    assert "acme/agent-a" in report.totals["agent"]


def test_refusals_of_garbage_count_in_the_overall_totals_only(engine: Engine,
                                                              tmp_path: Path) -> None:
    """The malformed token was counted per minute, with no tenant, agent, tool or token: it
    adds to the summary, to no dimension, and to no filtered reconcile."""
    ledger = busy_day(engine, tmp_path / "keys")
    with reading(engine) as conn:
        counted = conn.execute(select(refusal_counts.c.reason, refusal_counts.c.count)).all()
    assert [tuple(row) for row in counted] == [("malformed", 1)]
    report = ledger.reconcile()
    assert report.summary.refusals["INVALID_CREDIT_TOKEN"] == 2  # and the expired token
    assert [totals.refusals.get("INVALID_CREDIT_TOKEN") for totals in
            report.totals["tenant"].values()] == [1, None]
    acme = ledger.reconcile(filters=Filters(tenant="acme"))
    assert acme.summary.refusals["INVALID_CREDIT_TOKEN"] == 1
    next_day = ledger.reconcile(window=Window.day(DAY + timedelta(days=1)))
    assert next_day.summary.refusals == {}

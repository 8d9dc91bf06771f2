"""A busy day written by the real Verifier reconciles clean, with every check on."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, func, select

from mcpbill_cli.keys import KeyRing
from mcpbill_cli.ledger.engine import reading
from mcpbill_cli.ledger.models import accounts, calls

from .support import USDC, busy_day


def test_a_busy_day_yields_no_finding(engine: Engine, tmp_path: Path) -> None:
    ledger = busy_day(engine, tmp_path / "keys")
    assert {info.status for info in KeyRing.load(ledger.keys_dir).keys.values()} == {
        "active", "retired"}

    report = ledger.reconcile(verify_receipts=True)

    assert report.findings == ()
    assert not report.failed(strict=True)
    assert report.checks == ("prices", "control_totals", "token_validity", "ledger_invariants",
                             "stale_holds", "refused_captures", "deposits",
                             "audit_chain (window)",
                             "receipt_signatures")
    assert report.skipped == ("onchain (--onchain)",)
    with reading(engine) as conn:
        revenue = conn.execute(select(accounts.c.credits_posted)
                               .where(accounts.c.id == "revenue")).scalar_one()
        made = conn.execute(select(func.count()).select_from(calls)).scalar_one()
    summary = report.summary
    assert (summary.calls, summary.charged) == (made, revenue)
    assert (summary.captured, summary.voided, summary.expired, summary.held) == (32, 2, 1, 0)
    assert dict(summary.refusals) == {"BUDGET_EXCEEDED": 1, "INVALID_CREDIT_TOKEN": 2,
                                      "SCOPE_DENIED": 1, "TOKEN_REVOKED": 1}
    assert (summary.deposits, summary.deposited) == (2, 150 * USDC)


def test_the_full_chain_and_no_chain_agree_on_a_clean_day(engine: Engine,
                                                         tmp_path: Path) -> None:
    ledger = busy_day(engine, tmp_path / "keys")
    full = ledger.reconcile(chain="full")
    off = ledger.reconcile(chain="off")
    assert full.findings == off.findings == ()
    assert full.checks[-1] == "audit_chain (full)" and off.skipped[0] == "audit_chain (--chain off)"
    assert full.audit_anchor is None and off.audit_anchor is None


def test_totals_per_dimension_add_up(engine: Engine, tmp_path: Path) -> None:
    report = busy_day(engine, tmp_path / "keys").reconcile()
    for dimension in ("tenant", "tool"):
        keyed = report.totals[dimension].values()
        assert sum(t.calls for t in keyed) == report.summary.calls
        assert sum(t.charged for t in keyed) == report.summary.charged
    assert sorted(report.totals["tenant"]) == ["acme", "globex"]
    assert report.totals["tenant"]["globex"].deposited == 50 * USDC
    assert "acme/agent-a" in report.totals["agent"]

"""Schema 0006 on a ledger that 0005 code wrote: the account snapshots table is added, empty,
so the first reconcile checks the whole history once and leaves the first snapshot; the
downgrade drops it again."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine, func, inspect, select

from mcpbill_cli.keys import KeyRing, init_keyring
from mcpbill_cli.ledger.credit import IssueRequest, fund_demo, issue
from mcpbill_cli.ledger.engine import current_revision, make_engine, reading, writing
from mcpbill_cli.ledger.models import SCHEMA_REVISION, account_snapshots, ledger_snapshots
from mcpbill_cli.ledger.schema import _alembic_config, upgrade
from mcpbill_cli.reconcile import ReconcileOptions, Window, reconcile

DAY = datetime(2031, 3, 14, 9, tzinfo=UTC)


def a_0005_ledger(db_url: str, keys_dir: Path) -> Engine:
    """A ledger at 0005 with a funded tenant and a token, written by the code of today (it
    writes no snapshot)."""
    engine = make_engine(db_url)
    assert upgrade(engine, "0005") == (None, "0005")
    init_keyring(keys_dir, "EdDSA", now=DAY, force=False).save()
    with writing(engine) as conn:
        fund_demo(conn, "acme", 5_000_000, now=DAY)
        issue(conn, IssueRequest(tenant="acme", agent="a", limit=1_000_000, ttl=3600,
                                 scope=None, audience="mcpbill", issuer="mcpbill"),
              signer=KeyRing.load(keys_dir).signing_key(), ttl_cap=86400, now=DAY)
    return engine


def snapshot_rows(engine: Engine) -> tuple[int, int]:
    with reading(engine) as conn:
        return tuple(int(conn.execute(select(func.count()).select_from(table)).scalar_one())
                     for table in (ledger_snapshots, account_snapshots))  # type: ignore[return-value]


def test_upgrade_adds_an_empty_snapshots_table_the_first_reconcile_fills(
        db_url: str, tmp_path: Path) -> None:
    engine = a_0005_ledger(db_url, tmp_path / "keys")
    try:
        assert {"ledger_snapshots", "account_snapshots"}.isdisjoint(
            inspect(engine).get_table_names())

        assert upgrade(engine) == ("0005", SCHEMA_REVISION)

        assert current_revision(engine) == SCHEMA_REVISION
        columns = {c["name"] for c in inspect(engine).get_columns("account_snapshots")}
        assert columns == {"at", "account", "debits_posted", "credits_posted", "spent"}
        assert inspect(engine).get_pk_constraint("account_snapshots")["constrained_columns"] == [
            "at", "account"]
        assert {c["name"] for c in inspect(engine).get_columns("ledger_snapshots")} == {
            "at", "base", "accounts", "written_at"}
        assert snapshot_rows(engine) == (0, 0)
        window = Window.day(DAY.date())
        report = reconcile(engine, ReconcileOptions(window=window, chain="off",
                                                    now=window.end + timedelta(hours=1)))
        assert report.findings == ()  # the trail is not sealed here: --chain off
        assert "ledger_invariants (full history)" in report.checks
        assert report.snapshot_at == window.end and snapshot_rows(engine) == (1, 3)
    finally:
        engine.dispose()


def test_downgrade_drops_the_snapshots_and_upgrade_adds_them_again(db_url: str,
                                                                    tmp_path: Path) -> None:
    from alembic import command

    engine = a_0005_ledger(db_url, tmp_path / "keys")
    try:
        upgrade(engine)
        with writing(engine) as conn:
            command.downgrade(_alembic_config(conn), "0005")
        assert current_revision(engine) == "0005"
        assert {"ledger_snapshots", "account_snapshots"}.isdisjoint(
            inspect(engine).get_table_names())
        assert upgrade(engine) == ("0005", SCHEMA_REVISION)
    finally:
        engine.dispose()

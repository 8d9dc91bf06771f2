"""Schema 0014 on a ledger with deposits credited on two days at 0013, its parent: the deposits
are indexed by when they were credited and seen, a day's reconcile counts that day's deposit
alone and finds nothing; the downgrade drops the indexes and keeps the deposits."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, func, inspect, select

from mcpbill_cli.ledger.engine import current_revision, make_engine, reading, writing
from mcpbill_cli.ledger.models import SCHEMA_REVISION, deposits
from mcpbill_cli.ledger.schema import _alembic_config, upgrade
from mcpbill_cli.reconcile import ReconcileOptions, Window, reconcile
from mcpbill_cli.wallet.crediting import Deposit, credit_deposit

DAY = datetime(2031, 3, 14, 9, tzinfo=UTC)
CHAIN = "eip155:8453"
HERE = "0x" + "33" * 20
USDC = "0x833589fcd6edb6e08f4c7c32d4f71b54bda02913"
INDEXES = {"ix_deposits_credited", "ix_deposits_seen"}


def a_deposit(n: int, amount: int) -> Deposit:
    return Deposit(chain=CHAIN, tx_hash="0x" + f"{n:02x}" * 32, log_index=n, position=0,
                   block_number=100 + n, sender="0x" + "11" * 20, recipient=HERE, token=USDC,
                   amount=amount)


def a_0013_ledger_with_deposits(db_url: str) -> Engine:
    """Two deposits to acme: one on DAY, one the day after."""
    engine = make_engine(db_url)
    assert upgrade(engine, "0013") == (None, "0013")
    with writing(engine) as conn:
        assert credit_deposit(conn, a_deposit(1, 5_000_000), "acme", DAY)
        assert credit_deposit(conn, a_deposit(2, 7_000_000), "acme", DAY + timedelta(days=1))
    return engine


def deposit_indexes(engine: Engine) -> set[str]:
    return {index["name"] for index in inspect(engine).get_indexes("deposits")} & INDEXES


def test_upgrade_indexes_the_deposits_and_a_day_counts_its_own(db_url: str) -> None:
    engine = a_0013_ledger_with_deposits(db_url)
    try:
        assert deposit_indexes(engine) == set()
        assert upgrade(engine) == ("0013", SCHEMA_REVISION)
        assert deposit_indexes(engine) == INDEXES
        report = reconcile(engine, ReconcileOptions(
            window=Window.day(DAY.date()), chain="off", snapshots=False,
            now=DAY + timedelta(days=3)))
        assert report.findings == ()
        assert (report.summary.deposits, report.summary.deposited) == (1, 5_000_000)
    finally:
        engine.dispose()


def test_downgrade_drops_the_indexes_and_keeps_the_deposits(db_url: str) -> None:
    from alembic import command

    engine = a_0013_ledger_with_deposits(db_url)
    try:
        upgrade(engine)
        with writing(engine) as conn:
            command.downgrade(_alembic_config(conn), "0013")
        assert current_revision(engine) == "0013"
        assert deposit_indexes(engine) == set()
        with reading(engine) as conn:
            assert conn.execute(select(func.count()).select_from(deposits)).scalar() == 2
        assert upgrade(engine) == ("0013", SCHEMA_REVISION)
        assert deposit_indexes(engine) == INDEXES
    finally:
        engine.dispose()

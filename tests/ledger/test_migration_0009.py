"""Schema 0009 on a ledger with calls captured at 0008: every call starts with nothing
refunded, the refunds table is added, a refund of an old call works; the downgrade drops both
and keeps the calls' partial unique index."""

from __future__ import annotations

from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine, inspect, select

from mcpbill_cli.keys import KeyRing, KeySource, init_keyring
from mcpbill_cli.ledger.credit import IssueRequest, fund_demo, issue
from mcpbill_cli.ledger.engine import current_revision, make_engine, reading, writing
from mcpbill_cli.ledger.models import SCHEMA_REVISION, calls
from mcpbill_cli.ledger.schema import _alembic_config, upgrade
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.receipts import Receipt
from mcpbill_cli.verifier import Verifier

DAY = datetime(2031, 3, 14, 9, tzinfo=UTC)
PRICING = {"version": 1, "tools": {"search": {"price": "0.01"}}}


def a_0008_ledger_with_a_call(db_url: str, keys_dir: Path) -> tuple[Engine, Receipt]:
    engine = make_engine(db_url)
    assert upgrade(engine, "0008") == (None, "0008")
    init_keyring(keys_dir, "EdDSA", now=DAY, force=False).save()
    with writing(engine) as conn:
        fund_demo(conn, "acme", 5_000_000, now=DAY)
        token = issue(conn, IssueRequest(tenant="acme", agent="a", limit=1_000_000, ttl=3600,
                                         scope=None, audience="mcpbill", issuer="mcpbill"),
                      signer=KeyRing.load(keys_dir).signing_key(), ttl_cap=86400, now=DAY)
    with closing(a_verifier(engine, keys_dir)) as verifier:
        return engine, verifier.charge(token.token, "search")


def a_verifier(engine: Engine, keys_dir: Path) -> Verifier:
    return Verifier(keys=KeySource(directory=keys_dir), engine=engine,
                    pricing=PricingTable.from_document(PRICING), clock=lambda: DAY)


def test_upgrade_starts_every_call_with_nothing_refunded(db_url: str, tmp_path: Path) -> None:
    engine, receipt = a_0008_ledger_with_a_call(db_url, tmp_path / "keys")
    try:
        assert "refunds" not in inspect(engine).get_table_names()
        assert upgrade(engine) == ("0008", SCHEMA_REVISION)
        with reading(engine) as conn:
            assert conn.execute(select(calls.c.refunded)).scalars().all() == [0]
        with closing(a_verifier(engine, tmp_path / "keys")) as verifier:
            done = verifier.refund(receipt.receipt_id)
        assert (done.amount, done.refundable) == (10_000, 0)
    finally:
        engine.dispose()


def test_downgrade_drops_refunds_and_keeps_the_calls_key_index(db_url: str,
                                                               tmp_path: Path) -> None:
    from alembic import command

    engine, _ = a_0008_ledger_with_a_call(db_url, tmp_path / "keys")
    try:
        upgrade(engine)
        with writing(engine) as conn:
            command.downgrade(_alembic_config(conn), "0008")
        assert current_revision(engine) == "0008"
        assert "refunds" not in inspect(engine).get_table_names()
        assert "refunded" not in {c["name"] for c in inspect(engine).get_columns("calls")}
        assert "uq_calls_live_key" in {i["name"] for i in inspect(engine).get_indexes("calls")}
        assert upgrade(engine) == ("0008", SCHEMA_REVISION)
    finally:
        engine.dispose()

"""Schema 0011 on a ledger with a call made at 0010, its parent: the rate_counters table is
added, a token with a rate counts in it and is refused past it; the downgrade drops it and the
old calls stay."""

from __future__ import annotations

from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, inspect, select

from mcpbill_cli.errors import RateLimited
from mcpbill_cli.keys import KeyRing, KeySource, init_keyring
from mcpbill_cli.ledger.credit import IssueRequest, fund_demo, issue
from mcpbill_cli.ledger.engine import current_revision, make_engine, reading, writing
from mcpbill_cli.ledger.models import SCHEMA_REVISION, calls, rate_counters
from mcpbill_cli.ledger.schema import _alembic_config, upgrade
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.ratelimits import parse_rates
from mcpbill_cli.verifier import Verifier

DAY = datetime(2031, 3, 14, 9, tzinfo=UTC)
PRICING = {"version": 1, "tools": {"search": {"price": "0.01"}}}


def a_0010_ledger_with_a_call(db_url: str, keys_dir: Path) -> Engine:
    engine = make_engine(db_url)
    assert upgrade(engine, "0010") == (None, "0010")
    init_keyring(keys_dir, "EdDSA", now=DAY, force=False).save()
    with writing(engine) as conn:
        fund_demo(conn, "acme", 5_000_000, now=DAY)
    with closing(a_verifier(engine, keys_dir)) as verifier:
        verifier.charge(a_token(engine, keys_dir), "search")
    return engine


def a_token(engine: Engine, keys_dir: Path, rates: tuple[str, ...] = ()) -> str:
    request = IssueRequest(tenant="acme", agent="a", limit=1_000_000, ttl=3600, scope=None,
                           audience="mcpbill", issuer="mcpbill",
                           rates=parse_rates(rates, spend=False, field="rate"))
    with writing(engine) as conn:
        return issue(conn, request, signer=KeyRing.load(keys_dir).signing_key(),
                     ttl_cap=86400, now=DAY).token


def a_verifier(engine: Engine, keys_dir: Path) -> Verifier:
    return Verifier(keys=KeySource(directory=keys_dir), engine=engine,
                    pricing=PricingTable.from_document(PRICING), clock=lambda: DAY)


def test_upgrade_adds_rate_counters_and_a_rate_holds(db_url: str, tmp_path: Path) -> None:
    engine = a_0010_ledger_with_a_call(db_url, tmp_path / "keys")
    try:
        assert "rate_counters" not in inspect(engine).get_table_names()
        assert upgrade(engine) == ("0010", SCHEMA_REVISION)
        token = a_token(engine, tmp_path / "keys", ("1/s",))
        with closing(a_verifier(engine, tmp_path / "keys")) as verifier:
            verifier.charge(token, "search", args={"n": 1})
            with pytest.raises(RateLimited):
                verifier.charge(token, "search", args={"n": 2})
        with reading(engine) as conn:
            assert conn.execute(select(func.count()).select_from(rate_counters)).scalar() == 1
            assert conn.execute(select(func.count()).select_from(calls)).scalar() == 2
    finally:
        engine.dispose()


def test_downgrade_drops_rate_counters(db_url: str, tmp_path: Path) -> None:
    from alembic import command

    engine = a_0010_ledger_with_a_call(db_url, tmp_path / "keys")
    try:
        upgrade(engine)
        with writing(engine) as conn:
            command.downgrade(_alembic_config(conn), "0010")
        assert current_revision(engine) == "0010"
        assert "rate_counters" not in inspect(engine).get_table_names()
        with reading(engine) as conn:
            assert conn.execute(select(func.count()).select_from(calls)).scalar() == 1
        assert upgrade(engine) == ("0010", SCHEMA_REVISION)
    finally:
        engine.dispose()

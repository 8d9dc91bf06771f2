"""Schema 0013 on a ledger at 0012 (its parent): the tenants' daily spend moves to
``budget_spend`` as tenant/day windows, held calls counted in their tenant's day are marked so
their void gives it back, tokens get their caps and top-up columns (empty); the downgrade puts
the daily spend back.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Engine, inspect, select, text

from mcpbill_cli.ledger.engine import current_revision, make_engine, reading, writing
from mcpbill_cli.ledger.models import SCHEMA_REVISION, budget_spend, calls
from mcpbill_cli.ledger.schema import _alembic_config, upgrade

HELD_AT = datetime(2031, 3, 14, 23, 59, tzinfo=UTC)


def a_0012_ledger(db_url: str) -> Engine:
    engine = make_engine(db_url)
    assert upgrade(engine, "0012") == (None, "0012")
    with writing(engine) as conn:
        conn.execute(text("INSERT INTO tenant_daily_spend (tenant, day, amount) VALUES "
                          "('acme', '2031-03-14', 20000), ('acme', '2031-03-13', 5), "
                          "('zeta', '2031-03-14', 7)"))
        for call_id, tenant in (("rcpt_a", "acme"), ("rcpt_b", "other")):
            conn.execute(text(
                "INSERT INTO calls (id, idempotency_key, request_hash, jti, tenant, agent, "
                "tool, amount_held, status, pricing_version, price_rule, demo, created_at, "
                "key_retired) VALUES (:id, :id, 'h', 'tok_1', :tenant, 'a', 'search', 10000, "
                "'held', 1, 'tools.search', false, :at, false)"),
                {"id": call_id, "tenant": tenant, "at": HELD_AT})
    return engine


def test_upgrade_moves_the_daily_spend_and_marks_counted_held_calls(db_url: str) -> None:
    engine = a_0012_ledger(db_url)
    try:
        assert upgrade(engine) == ("0012", SCHEMA_REVISION)
        assert "tenant_daily_spend" not in inspect(engine).get_table_names()
        with reading(engine) as conn:
            rows = conn.execute(select(budget_spend)).all()
            marked = dict(conn.execute(select(calls.c.id, calls.c.budgets)).all())
            terms = conn.execute(text("SELECT daily_cap_micro, monthly_cap_micro, "
                                      "topup_below_micro, topup_to_micro FROM tokens")).all()
        assert sorted(tuple(r) for r in rows) == [
            ("tenant", "acme", "", "day", "2031-03-13", 5),
            ("tenant", "acme", "", "day", "2031-03-14", 20_000),
            ("tenant", "zeta", "", "day", "2031-03-14", 7)]
        assert marked == {"rcpt_a": "tenant.day", "rcpt_b": None}
        assert terms == []
    finally:
        engine.dispose()


def test_downgrade_puts_the_daily_spend_back(db_url: str) -> None:
    from alembic import command

    engine = a_0012_ledger(db_url)
    try:
        upgrade(engine)
        with writing(engine) as conn:
            conn.execute(text("INSERT INTO budget_spend VALUES "
                              "('agent', 'acme', 'a', 'month', '2031-03-01', 3)"))
            command.downgrade(_alembic_config(conn), "0012")
        assert current_revision(engine) == "0012"
        assert "budget_spend" not in inspect(engine).get_table_names()
        assert "budgets" not in {c["name"] for c in inspect(engine).get_columns("calls")}
        assert "topup_to_micro" not in {c["name"] for c in inspect(engine).get_columns("tokens")}
        with reading(engine) as conn:
            rows = conn.execute(text("SELECT tenant, day, amount FROM tenant_daily_spend "
                                     "ORDER BY tenant, day")).all()
        assert [tuple(r) for r in rows] == [("acme", "2031-03-13", 5),
                                            ("acme", "2031-03-14", 20_000),
                                            ("zeta", "2031-03-14", 7)]
        assert upgrade(engine) == ("0012", SCHEMA_REVISION)
    finally:
        engine.dispose()

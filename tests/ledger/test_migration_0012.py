"""Schema 0012 on a ledger with a funded tenant from the schema before: the webhook tables are
added empty and work (an endpoint, an event and its delivery); the downgrade drops them and
leaves the money as it was."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import inspect

from mcpbill_cli.ledger import outbox
from mcpbill_cli.ledger.credit import fund_demo
from mcpbill_cli.ledger.engine import current_revision, make_engine, reading, writing
from mcpbill_cli.ledger.models import SCHEMA_REVISION
from mcpbill_cli.ledger.ops import balance, tenant_account
from mcpbill_cli.ledger.schema import _alembic_config, upgrade

NOW = datetime(2031, 3, 14, 9, tzinfo=UTC)
TABLES = {"webhook_endpoints", "webhook_events", "webhook_deliveries", "tenant_alerts"}


def before_0012() -> str:
    from alembic.script import ScriptDirectory

    revision = ScriptDirectory.from_config(_alembic_config()).get_revision("0012")
    return str(revision.down_revision)


def test_upgrade_adds_the_webhook_tables_and_downgrade_drops_them(db_url: str) -> None:
    from alembic import command

    engine = make_engine(db_url)
    try:
        previous = before_0012()
        upgrade(engine, previous)
        with writing(engine) as conn:
            fund_demo(conn, "acme", 5_000_000, now=NOW)
        assert not TABLES & set(inspect(engine).get_table_names())
        assert upgrade(engine) == (previous, SCHEMA_REVISION)
        with writing(engine) as conn:
            endpoint, _ = outbox.add_endpoint(conn, "https://example.com/h", ["*"], at=NOW)
            event_id = outbox.emit(conn, "refund.created", {"refund_id": "rfnd_1"}, at=NOW)
        with reading(engine) as conn:
            [delivery] = outbox.deliveries(conn)
        assert (delivery.event_id, delivery.endpoint_id) == (event_id, endpoint.id)
        with writing(engine) as conn:
            command.downgrade(_alembic_config(conn), previous)
        assert current_revision(engine) == previous
        assert not TABLES & set(inspect(engine).get_table_names())
        with reading(engine) as conn:
            assert balance(conn, tenant_account("acme")).available == 5_000_000
        assert upgrade(engine) == (previous, SCHEMA_REVISION)
    finally:
        engine.dispose()

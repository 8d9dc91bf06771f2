from sqlalchemy import Engine

from mcpbill_cli.ledger.engine import check_schema


def test_migrated_ledger_passes_schema_check(engine: Engine) -> None:
    check_schema(engine)

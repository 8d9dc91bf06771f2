"""Schema migrations through Alembic (imported only by `mcpbill init` and `mcpbill db`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from mcpbill_cli.ledger.engine import current_revision, writing
from mcpbill_cli.ledger.models import SCHEMA_REVISION

MIGRATIONS = Path(__file__).parent / "migrations"


def _alembic_config(connection: Any = None) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str]:
    """Migrate the ledger to ``revision``; returns (before, after)."""
    from alembic import command

    before = current_revision(engine)
    with writing(engine) as conn:
        command.upgrade(_alembic_config(conn), revision)
    return before, current_revision(engine) or SCHEMA_REVISION


def head() -> str:
    from alembic.script import ScriptDirectory

    return str(ScriptDirectory.from_config(_alembic_config()).get_current_head())

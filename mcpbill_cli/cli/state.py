"""Per-invocation state: settings resolved once, one ledger engine opened lazily and closed."""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING

import typer

from mcpbill_cli.config import Settings, load_settings

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from mcpbill_cli.keys import KeyRing


class State:
    def __init__(self, home: str | None, db_url: str | None) -> None:
        self._home = home
        self._db_url = db_url
        self._engine: Engine | None = None

    @cached_property
    def settings(self) -> Settings:
        return load_settings(home=self._home, db_url=self._db_url)

    def engine(self, *, check: bool = True) -> Engine:
        """The ledger engine; with ``check`` a missing or outdated schema is refused."""
        from mcpbill_cli.ledger.engine import check_schema, make_engine

        if self._engine is None:
            self._engine = make_engine(self.settings.db_url)
        if check:
            check_schema(self._engine)
        return self._engine

    def keyring(self) -> KeyRing:
        from mcpbill_cli.keys import KeyRing

        return KeyRing.load(self.settings.keys_dir)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()


def state(ctx: typer.Context) -> State:
    root = ctx.find_root()
    if not isinstance(root.obj, State):
        root.obj = State(None, None)
    return root.obj

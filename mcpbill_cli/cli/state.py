"""Per-invocation state: settings resolved once, one ledger engine opened lazily and closed."""

from __future__ import annotations

from datetime import datetime
from functools import cached_property
from typing import TYPE_CHECKING

import typer

from mcpbill_cli.config import Settings, default_db_url, load_settings

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from mcpbill_cli.clock import Clock
    from mcpbill_cli.keys import KeyRing


class State:
    def __init__(self, home: str | None, db_url: str | None) -> None:
        self._home = home
        self._db_url = db_url
        self._engine: Engine | None = None
        self._clock: Clock | None = None

    @cached_property
    def settings(self) -> Settings:
        return load_settings(home=self._home, db_url=self._db_url)

    def engine(self, *, check: bool = True, create: bool = False) -> Engine:
        """The ledger engine; with ``check`` a missing or outdated schema is refused.

        Only ``create`` (`db upgrade`) may start a SQLite ledger file, and only one named by
        --db-url, MCPBILL_DB_URL or config.toml: anything else on a mistyped ``--home`` would
        leave a stray home and an empty ledger behind. The home's own ledger is started by
        `mcpbill init`, with the keys and config that make the home.
        """
        from mcpbill_cli.ledger.engine import check_schema, make_engine, start_sqlite_file

        if self._engine is None:
            if create and self.settings.db_url != default_db_url(self.settings.home):
                start_sqlite_file(self.settings.db_url)
            else:
                self._refuse_missing_ledger()
            self._engine = make_engine(self.settings.db_url)
        if check:
            check_schema(self._engine)
        return self._engine

    def clock(self) -> Clock:
        """The ledger's clock (its server's on PostgreSQL, read once per command): the times
        a command writes to the ledger agree with the verifiers' whatever this host's clock."""
        if self._clock is None:
            from mcpbill_cli.ledger.clock import ledger_clock

            self._clock = ledger_clock(self.engine(check=False))
        return self._clock

    def now(self) -> datetime:
        """The time by :meth:`clock`."""
        return self.clock()()

    def _refuse_missing_ledger(self) -> None:
        from mcpbill_cli.errors import NotInitialized
        from mcpbill_cli.ledger.engine import sqlite_file

        path = sqlite_file(self.settings.db_url)
        if path is None or path.exists():
            return
        home = self.settings.home
        if not home.is_dir():
            raise NotInitialized(f"no mcpbill home at {home}: check --home or MCPBILL_HOME, "
                                 "or run `mcpbill init` to create one", path=str(home))
        raise NotInitialized(f"no ledger at {path}: set db_url in {self.settings.config_path} "
                             "(or MCPBILL_DB_URL) to the ledger in use, or run `mcpbill init`",
                             path=str(path))

    def keyring(self) -> KeyRing:
        from mcpbill_cli.keys import KeyRing

        return KeyRing.load(self.settings.keys_dir)

    def require_tenant(self, tenant: str | None) -> None:
        """NOT_FOUND (exit 4) for a tenant the ledger never funded, in every command that
        addresses one tenant; ``None`` (no tenant named) passes."""
        if tenant is None:
            return
        from mcpbill_cli.ledger.credit import require_tenant
        from mcpbill_cli.ledger.engine import reading

        with reading(self.engine()) as conn:
            require_tenant(conn, tenant)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()


def state(ctx: typer.Context) -> State:
    root = ctx.find_root()
    if not isinstance(root.obj, State):
        root.obj = State(None, None)
    return root.obj

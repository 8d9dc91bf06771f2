"""Shared fixtures. Every ledger test runs on a real SQLite file and on a real PostgreSQL.

PostgreSQL: each test run creates its own database (``mcpbill_test_<pid>_<hex>``) and each test
its own schema in it, so runs and tests cannot collide. Under ``CI=true`` an unreachable
PostgreSQL fails the run instead of skipping.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from mcpbill_cli.ledger.engine import make_engine
from mcpbill_cli.ledger.schema import upgrade

PG_ADMIN_URL = os.environ.get(
    "MCPBILL_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
BACKENDS = ["sqlite", "postgres"]


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("MCPBILL_HOME", str(home))
    for name in ("MCPBILL_DB_URL", "MCPBILL_MODE", "MCPBILL_TTL_CAP", "MCPBILL_ISSUER",
                 "MCPBILL_AUDIENCE", "AGENT_CREDIT_JWT", "MCPBILL_KEYSTORE_PASSWORD",
                 "MCPBILL_DEFAULT_TTL", "MCPBILL_LEEWAY", "MCPBILL_HOLD_TIMEOUT",
                 "MCPBILL_REPLAY_RESULT_CAP", "MCPBILL_CHAIN", "MCPBILL_DEPOSIT_ADDRESS",
                 "MCPBILL_RPC_URL", "MCPBILL_MCP_AUTHORIZATION", "MCPBILL_MCP_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "80")
    return home


def _admin_connect() -> object:
    import psycopg

    url = make_url(PG_ADMIN_URL)
    return psycopg.connect(
        host=url.host, port=url.port or 5432, user=url.username, password=url.password,
        dbname=url.database, autocommit=True, connect_timeout=5,
    )


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A database of this test run's own; its URL without a schema."""
    try:
        admin = _admin_connect()
    except Exception as exc:  # noqa: BLE001 - any failure to connect means "no PostgreSQL"
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL is required under CI=true: {exc}")
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}")
    name = f"mcpbill_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin.execute(f'CREATE DATABASE "{name}"')  # type: ignore[attr-defined]
    try:
        yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[attr-defined]
        admin.close()  # type: ignore[attr-defined]


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty ledger URL: a SQLite file, or a fresh schema in this run's PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return _new_schema(request.getfixturevalue("pg_database"))


def _new_schema(database_url: str) -> str:
    """A URL on a new, empty schema of ``database_url`` (dropped with the database)."""
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    url = make_url(database_url)
    with psycopg.connect(host=url.host, port=url.port or 5432, user=url.username,
                         password=url.password, dbname=url.database, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    return url.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
        hide_password=False)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """A migrated ledger on each backend."""
    eng = make_engine(db_url)
    upgrade(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def pg_engine(pg_database: str) -> Iterator[Engine]:
    """A migrated ledger on PostgreSQL only, for what only PostgreSQL does."""
    eng = make_engine(_new_schema(pg_database))
    upgrade(eng)
    yield eng
    eng.dispose()

"""CLI fixtures: a runner that never swallows exceptions, and the CLI on either backend."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from mcpbill_cli.cli import app

Invoke = Callable[..., Result]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def cli(runner: CliRunner) -> Invoke:
    """``cli("token", "issue", ...)``: run mcpbill in process; stdout and stderr kept apart."""

    def invoke(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> Result:
        return runner.invoke(app, list(args), input=input, env=env, catch_exceptions=False)

    return invoke


@pytest.fixture
def ledger_cli(cli: Invoke, db_url: str, monkeypatch: pytest.MonkeyPatch) -> Invoke:
    """The CLI on a fresh ledger (SQLite or PostgreSQL) and an initialized home."""
    monkeypatch.setenv("MCPBILL_DB_URL", db_url)
    result = cli("init")
    assert result.exit_code == 0, result.output
    return cli


def ok_json(result: Result) -> Any:
    """The data of a successful --json envelope (asserting it is one)."""
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["status"] == "ok" and document["errors"] == [], document
    return document["data"]


def error_json(result: Result, code: str) -> dict[str, Any]:
    document = json.loads(result.stdout)
    assert document["status"] == "error", document
    assert [e["code"] for e in document["errors"]] == [code], document
    return dict(document["errors"][0])


def tree_snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes, to prove a failed command changed nothing."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and not p.name.startswith("ledger.db")}

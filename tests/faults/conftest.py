"""Fixtures for the fault tests: a PostgreSQL cluster of the test's own, and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .scratch_postgres import ScratchPostgres, scratch_postgres, server_binaries

MCPBILL = str(Path(sys.executable).with_name("mcpbill"))
Run = Callable[..., subprocess.CompletedProcess[str]]
MAX_DEPOSITS = 300  # a full ledger refuses long before this many


def deposits_until_refused(invoke: Callable[..., Any]) -> tuple[int, Any]:
    """``wallet fund --demo 1 --json`` for tenant ``acme``, each under its own key, through
    ``invoke`` (a CliRunner's) until one fails: how many went in, and the failed result."""
    for n in range(MAX_DEPOSITS):
        result = invoke("wallet", "fund", "--demo", "1", "--tenant", "acme", "--json",
                        "--idempotency-key", f"fill-{n}")
        if result.exit_code != 0:
            return n, result
    raise AssertionError(f"{MAX_DEPOSITS} deposits fitted in a full ledger")


@pytest.fixture
def pg_server() -> None:
    """PostgreSQL's server binaries are installed: else skipped, but failed under CI=true."""
    if server_binaries() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL server binaries are required under CI=true")
        pytest.skip("no PostgreSQL server binaries under /usr/lib/postgresql")


@pytest.fixture
def cluster(pg_server: None) -> Iterator[ScratchPostgres]:
    """A throwaway PostgreSQL cluster (never the shared server), destroyed afterwards."""
    with scratch_postgres() as started:
        yield started


@pytest.fixture
def mcpbill() -> Run:
    """Run the installed ``mcpbill`` command (its real entry point) with this test's home."""

    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([MCPBILL, *args], capture_output=True, text=True,  # noqa: S603
                              timeout=120, env={**os.environ, **(env or {})}, check=False)

    return run

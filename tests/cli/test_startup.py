"""`mcpbill --help` and `mcpbill token issue` must not import web3, mcp or alembic."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("web3", "mcp", "alembic", "eth_account", "x402")

PROBE = """
import sys
from mcpbill_cli.cli import main
sys.argv = ["mcpbill", *sys.argv[1:]]
try:
    main()
except SystemExit:
    pass
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[0:0] or {HEAVY}))
print("HEAVY:" + ",".join(heavy), file=sys.stderr)
""".replace("{HEAVY}", repr(set(HEAVY)))


def heavy_imports(*args: str, env: dict[str, str]) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True,
                          env=env, check=False)
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("HEAVY:")]
    assert line, proc.stderr
    return [m for m in line[-1].removeprefix("HEAVY:").split(",") if m]


def test_help_imports_nothing_heavy(isolated_home: Path) -> None:
    assert heavy_imports("--help", env=dict(os.environ)) == []


@pytest.mark.parametrize("backend", ["sqlite"])
def test_token_issue_imports_nothing_heavy(isolated_home: Path, backend: str) -> None:
    env = dict(os.environ)
    for args in (["init"], ["wallet", "fund", "--demo", "1"]):
        subprocess.run([sys.executable, "-m", "mcpbill_cli", *args], env=env, check=True,
                       capture_output=True)
    assert heavy_imports("token", "issue", "--limit", "0.5", env=env) == []


NOT_FOR_SQLITE = ("sqlalchemy.dialects.postgresql", "rich.console")

LOADED = """
import sys
from mcpbill_cli.cli import main
sys.argv = ["mcpbill", *sys.argv[1:]]
try:
    main()
except SystemExit:
    pass
print("LOADED:" + ",".join(sorted(set(sys.modules) & {NAMES})), file=sys.stderr)
""".replace("{NAMES}", repr(set(NOT_FOR_SQLITE)))


def test_token_issue_on_sqlite_in_a_pipe_loads_no_postgresql_dialect_nor_rich_console(
        isolated_home: Path) -> None:
    """The PostgreSQL dialect (with all its drivers' modules, ~30 ms) and a Rich console made
    to say one plain line (~12 ms) are start-up time `token issue` cannot spare on SQLite."""
    env = dict(os.environ)
    for args in (["init"], ["wallet", "fund", "--demo", "1"]):
        subprocess.run([sys.executable, "-m", "mcpbill_cli", *args], env=env, check=True,
                       capture_output=True)
    proc = subprocess.run([sys.executable, "-c", LOADED, "token", "issue", "--limit", "0.5"],
                          capture_output=True, text=True, env=env, check=False)
    assert proc.stdout.startswith("ey"), proc.stderr  # the token was issued
    assert proc.stderr.splitlines()[-1] == "LOADED:", proc.stderr

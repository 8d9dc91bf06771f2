"""`mcpbill version` and `-h`: what an operator types first."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import pytest

from mcpbill_cli.__about__ import __version__
from mcpbill_cli.ledger.models import SCHEMA_REVISION
from tests.cli.conftest import Invoke, ok_json

MCPBILL = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "mcpbill"


def test_version_prints_what_dash_dash_version_prints(cli: Invoke) -> None:
    command, flag = cli("version"), cli("--version")
    assert (command.exit_code, flag.exit_code) == (0, 0)
    assert command.stdout == flag.stdout == f"mcpbill {__version__}\n"


def test_version_json(cli: Invoke) -> None:
    assert ok_json(cli("version", "--json")) == {
        "version": __version__, "python": platform.python_version(),
        "schema_revision": SCHEMA_REVISION}


def test_version_needs_no_home(cli: Invoke, isolated_home: Path) -> None:
    assert cli("version").exit_code == 0
    assert not isolated_home.exists()


@pytest.mark.parametrize("path", [(), ("token",), ("token", "issue"), ("status",)], ids=str)
def test_dash_h_is_help(cli: Invoke, path: tuple[str, ...]) -> None:
    short, long = cli(*path, "-h"), cli(*path, "--help")
    assert short.exit_code == long.exit_code == 0
    assert short.stdout == long.stdout and "Usage: mcpbill" in short.stdout


@pytest.mark.skipif(not MCPBILL.exists(), reason="needs the installed mcpbill script")
def test_dash_h_from_the_installed_command() -> None:
    proc = subprocess.run([str(MCPBILL), "-h"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "Usage: mcpbill" in proc.stdout and "status" in proc.stdout

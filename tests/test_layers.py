"""DESIGN.md's layer rules run as import-linter contracts: [tool.importlinter] in pyproject.toml."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mcpbill_cli"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def importlinter_section() -> dict[str, Any]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    section: dict[str, Any] = pyproject["tool"]["importlinter"]
    return section


def lint_imports(config: Path, *, cwd: Path,
                 env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo", str(config)], cwd=cwd,
                          env=env, capture_output=True, text=True, check=False)


def test_the_package_keeps_its_layers() -> None:
    proc = lint_imports(ROOT / "pyproject.toml", cwd=ROOT, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_ledger_importing_the_cli_fails_lint(tmp_path: Path) -> None:
    shutil.copytree(PACKAGE, tmp_path / "mcpbill_cli",
                    ignore=shutil.ignore_patterns("__pycache__"))
    with (tmp_path / "mcpbill_cli" / "ledger" / "ops.py").open("a") as ops:
        ops.write("\nimport mcpbill_cli.cli\n")
    config = tmp_path / "pyproject.toml"
    config.write_text(tomli_w.dumps({"tool": {"importlinter": importlinter_section()}}))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}  # the copy, not the installed package

    proc = lint_imports(config, cwd=tmp_path, env=env)

    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "The verifier and the ledger never import the CLI BROKEN" in proc.stdout, proc.stdout
    assert "mcpbill_cli.ledger.ops -> mcpbill_cli.cli (l." in proc.stdout, proc.stdout


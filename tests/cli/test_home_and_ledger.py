"""`init` remembers the ledger it was given; reads never create a home or a ledger."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from mcpbill_cli.config import redact_url
from mcpbill_cli.ledger.models import SCHEMA_REVISION
from tests.cli.conftest import Invoke, error_json, ok_json, tree_snapshot

READ_ONLY = [
    ("token", "list"), ("token", "show", "tok_x"), ("wallet", "balance"), ("keys", "list"),
    ("db", "status"), ("reconcile",), ("revocations", "export"), ("pricing", "show"),
]


def test_init_saves_the_database_url_it_was_given(
        cli: Invoke, db_url: str, isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCPBILL_DB_URL", db_url)
    assert cli("init").exit_code == 0
    monkeypatch.delenv("MCPBILL_DB_URL")
    config = tomllib.loads((isolated_home / "config.toml").read_text())
    assert config["db_url"] == db_url
    assert (isolated_home / "config.toml").stat().st_mode & 0o077 == 0
    funded = ok_json(cli("wallet", "fund", "--demo", "5", "--json"))
    assert funded["available_usd"] == "5.00"
    assert ok_json(cli("config", "show", "--json"))["db_url"] == redact_url(db_url)


def test_init_saves_a_db_url_flag_too(cli: Invoke, tmp_path: Path, isolated_home: Path) -> None:
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    assert cli("--db-url", url, "init").exit_code == 0
    assert tomllib.loads((isolated_home / "config.toml").read_text())["db_url"] == url
    assert ok_json(cli("token", "list", "--json")) == []
    assert not (isolated_home / "ledger.db").exists()


def test_init_saves_the_url_into_a_config_written_before_it(
        cli: Invoke, tmp_path: Path, isolated_home: Path) -> None:
    """An operator who wrote config.toml first: init adds db_url to it and keeps the rest."""
    isolated_home.mkdir(parents=True, exist_ok=True)
    written = '# my settings\nmode = "demo"\n\n[wallet]\nchain = "base-sepolia"\n'
    (isolated_home / "config.toml").write_text(written)
    (isolated_home / "config.toml").chmod(0o600)
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    assert cli("--db-url", url, "init").exit_code == 0
    text = (isolated_home / "config.toml").read_text()
    assert text.endswith(written)
    assert tomllib.loads(text) == {"db_url": url, "mode": "demo",
                                   "wallet": {"chain": "base-sepolia"}}
    assert (isolated_home / "config.toml").stat().st_mode & 0o777 == 0o600
    assert ok_json(cli("token", "list", "--json")) == []  # finds the ledger without the flag
    assert not (isolated_home / "ledger.db").exists()


def test_init_keeps_a_db_url_the_config_already_names(
        cli: Invoke, tmp_path: Path, isolated_home: Path) -> None:
    isolated_home.mkdir(parents=True, exist_ok=True)
    mine = f"sqlite:///{tmp_path / 'mine.db'}"
    (isolated_home / "config.toml").write_text(f'db_url = "{mine}"\n')
    other = f"sqlite:///{tmp_path / 'other.db'}"
    result = ok_json(cli("--db-url", other, "init", "--json"))
    assert tomllib.loads((isolated_home / "config.toml").read_text()) == {"db_url": mine}
    assert any("its db_url is kept" in line for line in result["kept"])


def test_init_without_a_url_keeps_the_ledger_in_the_home(cli: Invoke, isolated_home: Path) -> None:
    assert cli("init").exit_code == 0
    assert "db_url" not in tomllib.loads((isolated_home / "config.toml").read_text())
    assert (isolated_home / "ledger.db").exists()


@pytest.mark.parametrize("command", READ_ONLY, ids=" ".join)
def test_a_mistyped_home_is_not_initialized_and_creates_nothing(
        cli: Invoke, tmp_path: Path, command: tuple[str, ...]) -> None:
    mistyped = tmp_path / "typo" / "home"
    result = cli("--home", str(mistyped), *command, "--json")
    assert result.exit_code == 9, result.output
    assert str(mistyped) in error_json(result, "NOT_INITIALIZED")["message"]
    assert not (tmp_path / "typo").exists()


def test_a_home_without_its_ledger_names_the_ledger_file(cli: Invoke, isolated_home: Path) -> None:
    assert cli("init").exit_code == 0
    (isolated_home / "ledger.db").unlink()
    result = cli("wallet", "balance", "--json")
    assert result.exit_code == 9
    message = error_json(result, "NOT_INITIALIZED")["message"]
    assert str(isolated_home / "ledger.db") in message and "db_url" in message
    assert not (isolated_home / "ledger.db").exists()


def test_db_upgrade_still_creates_a_ledger(cli: Invoke, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new' / 'ledger.db'}"
    assert ok_json(cli("--db-url", url, "db", "upgrade", "--json"))["changed"] is True
    assert (tmp_path / "new" / "ledger.db").exists()


def test_db_upgrade_on_a_mistyped_home_is_not_initialized_and_creates_nothing(
        cli: Invoke, tmp_path: Path) -> None:
    """It made the home and a ledger in it and exited 0, where every other command says
    NOT_INITIALIZED: then `wallet fund --demo` funded the half-made home, and `init` said it
    created the ledger that held those funds."""
    mistyped = tmp_path / "typo" / "home"
    result = cli("--home", str(mistyped), "db", "upgrade", "--json")
    assert result.exit_code == 9, result.output
    assert str(mistyped) in error_json(result, "NOT_INITIALIZED")["message"]
    assert not (tmp_path / "typo").exists()
    said = cli("--home", str(mistyped), "db", "upgrade")
    assert said.exit_code == 9 and said.stdout == ""
    assert f"NOT_INITIALIZED: no mcpbill home at {mistyped}" in " ".join(said.stderr.split())
    assert not (tmp_path / "typo").exists()


def test_db_upgrade_does_not_start_a_lost_ledger_of_the_home(
        cli: Invoke, isolated_home: Path) -> None:
    """An initialized home whose ledger file is gone: an empty ledger in its place would pass
    for it (its tenants' balances gone, its tokens unknown). The missing file is named, as
    by any other command."""
    assert cli("init").exit_code == 0
    ledger = isolated_home / "ledger.db"
    ledger.unlink()
    result = cli("db", "upgrade", "--json")
    assert result.exit_code == 9, result.output
    message = error_json(result, "NOT_INITIALIZED")["message"]
    assert str(ledger) in message and "db_url" in message
    assert not ledger.exists()


def test_init_exist_ok_creates_a_missing_home(cli: Invoke, isolated_home: Path) -> None:
    data = ok_json(cli("init", "--exist-ok", "--json"))
    assert data["created"] and (isolated_home / "keys" / "keyring.json").exists()


def test_init_exist_ok_on_an_initialized_home_changes_nothing(
        ledger_cli: Invoke, isolated_home: Path) -> None:
    before = tree_snapshot(isolated_home)
    kid = ok_json(ledger_cli("keys", "list", "--json"))[0]["kid"]
    data = ok_json(ledger_cli("init", "--exist-ok", "--json"))
    assert (data["created"], data["kid"], data["schema"]) == ([], kid, SCHEMA_REVISION)
    assert tree_snapshot(isolated_home) == before
    assert ledger_cli("init", "--json").exit_code == 7


def test_init_refuses_force_with_exist_ok(ledger_cli: Invoke, isolated_home: Path) -> None:
    before = tree_snapshot(isolated_home)
    result = ledger_cli("init", "--force", "--exist-ok", "--json")
    assert result.exit_code == 3
    error_json(result, "INVALID_INPUT")
    assert tree_snapshot(isolated_home) == before


def test_a_new_sqlite_ledger_and_its_log_are_the_owner_s_alone(
        cli: Invoke, tmp_path: Path, isolated_home: Path) -> None:
    """init (the home's ledger) and db upgrade (a file elsewhere) start a SQLite ledger mode
    0600, whatever the umask, and SQLite gives the write-ahead log the same mode."""
    import sqlite3

    old = os.umask(0o022)
    try:
        assert cli("init").exit_code == 0
        elsewhere = tmp_path / "elsewhere.db"
        assert cli("--db-url", f"sqlite:///{elsewhere}", "db", "upgrade").exit_code == 0
    finally:
        os.umask(old)
    for ledger in (isolated_home / "ledger.db", elsewhere):
        assert ledger.stat().st_mode & 0o777 == 0o600, ledger
        writer = sqlite3.connect(ledger)  # the WAL and its index exist while it is open
        try:
            writer.execute("CREATE TABLE scratch (n INTEGER)")
            for log in (ledger.with_name(ledger.name + "-wal"),
                        ledger.with_name(ledger.name + "-shm")):
                assert log.stat().st_mode & 0o777 == 0o600, log
        finally:
            writer.close()


@pytest.mark.parametrize("option", ["--home", "--db-url"])
@pytest.mark.parametrize("value", ["", " "])
def test_an_empty_home_or_ledger_is_refused_not_taken_for_the_default(
        isolated_home: Path, tmp_path: Path, option: str, value: str) -> None:
    """``mcpbill --home "$TYPO" init`` in a script: refused, and the home the environment
    names (here the default) is not created or touched."""
    def mcpbill(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mcpbill_cli", option, value, *args],
                              capture_output=True, text=True, check=False, timeout=60,
                              cwd=tmp_path)

    made = mcpbill("init")
    assert made.returncode == 2, made.stderr
    assert f"Invalid value for '{option}'" in made.stderr and "is empty" in made.stderr
    assert not isolated_home.exists()
    listed = mcpbill("token", "list", "--json")
    assert listed.returncode == 2
    document = json.loads(listed.stdout)
    assert [error["code"] for error in document["errors"]] == ["USAGE_ERROR"]
    assert "is empty" in document["errors"][0]["message"]
    assert not isolated_home.exists()

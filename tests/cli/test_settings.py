"""Settings precedence, config show scrubbing, and schema checks that never migrate."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from mcpbill_cli.config import load_settings
from mcpbill_cli.ledger.engine import make_engine
from mcpbill_cli.ledger.models import SCHEMA_REVISION
from tests.cli.conftest import Invoke, error_json, ok_json


def test_flag_beats_environment_beats_file_beats_default(
        isolated_home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    isolated_home.mkdir()
    (isolated_home / "config.toml").write_text('mode = "live"\ndb_url = "sqlite:///file.db"\n')
    assert load_settings().db_url == "sqlite:///file.db"
    assert load_settings().mode == "live"
    monkeypatch.setenv("MCPBILL_DB_URL", "sqlite:///env.db")
    monkeypatch.setenv("MCPBILL_MODE", "demo")
    assert (load_settings().db_url, load_settings().mode) == ("sqlite:///env.db", "demo")
    assert load_settings(db_url="sqlite:///flag.db").db_url == "sqlite:///flag.db"
    (isolated_home / "config.toml").write_text("")
    monkeypatch.delenv("MCPBILL_DB_URL")
    assert load_settings().db_url == f"sqlite:///{isolated_home / 'ledger.db'}"


def test_home_flag_beats_environment(cli: Invoke, tmp_path: Path) -> None:
    data = ok_json(cli("--home", str(tmp_path / "elsewhere"), "config", "show", "--json"))
    assert data["home"] == str(tmp_path / "elsewhere")


def test_config_show_scrubs_the_database_password(cli: Invoke) -> None:
    result = cli("--db-url", "postgresql+psycopg://ops:hunter2@db/ledger", "config", "show")
    assert result.exit_code == 0
    assert "ops:***@db/ledger" in result.stdout and "hunter2" not in result.output


def test_a_broken_config_file_is_an_error_naming_it(cli: Invoke, isolated_home: Path) -> None:
    isolated_home.mkdir()
    (isolated_home / "config.toml").write_text("modee = 'demo'\n")
    result = cli("config", "show", "--json")
    assert result.exit_code == 10
    assert "modee" in error_json(result, "CONFIG_INVALID")["message"]


def test_an_older_schema_is_refused_and_never_migrated_by_a_read(
        ledger_cli: Invoke, db_url: str) -> None:
    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0000'"))
    result = ledger_cli("wallet", "balance", "--json")
    assert result.exit_code == 9
    assert "mcpbill db upgrade" in error_json(result, "SCHEMA_OUTDATED")["message"]
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0000"
    status = ok_json(ledger_cli("db", "status", "--json"))
    assert (status["current"], status["up_to_date"]) == ("0000", False)
    engine.dispose()


def test_an_empty_ledger_asks_for_init(cli: Invoke, db_url: str) -> None:
    result = cli("--db-url", db_url, "token", "list", "--json")
    assert result.exit_code == 9
    assert "mcpbill init" in error_json(result, "NOT_INITIALIZED")["message"]
    upgraded = ok_json(cli("--db-url", db_url, "db", "upgrade", "--json"))
    assert (upgraded["from"], upgraded["to"]) == (None, SCHEMA_REVISION)
    assert ok_json(cli("--db-url", db_url, "token", "list", "--json")) == []


@pytest.mark.parametrize(("written", "cap"), [(None, 262_144), ('"1MiB"', 1_048_576),
                                              ('"64KiB"', 65_536), ("4096", 4_096)])
def test_the_replay_result_cap_is_read_from_config_toml(
        cli: Invoke, isolated_home: Path, written: str | None, cap: int) -> None:
    isolated_home.mkdir()
    if written is not None:
        (isolated_home / "config.toml").write_text(f"replay_result_cap = {written}\n")
    assert load_settings().result_cap == cap
    assert ok_json(cli("config", "show", "--json"))["replay_result_cap"] == str(cap)


@pytest.mark.parametrize("written", ['"1GiB"', '"-1"', '"lots"', "true", '"1.5MiB"'])
def test_a_bad_replay_result_cap_is_config_invalid(cli: Invoke, isolated_home: Path,
                                                   written: str) -> None:
    isolated_home.mkdir()
    (isolated_home / "config.toml").write_text(f"replay_result_cap = {written}\n")
    result = cli("config", "show", "--json")
    assert "replay_result_cap" in error_json(result, "CONFIG_INVALID")["message"]


@pytest.mark.parametrize(("variable", "value", "setting", "shown"), [
    ("MCPBILL_DEFAULT_TTL", "2h", "default_ttl", "2h"),
    ("MCPBILL_LEEWAY", "5s", "leeway", "5s"),
    ("MCPBILL_HOLD_TIMEOUT", "90s", "hold_timeout", "90s"),
    ("MCPBILL_REPLAY_RESULT_CAP", "64KiB", "replay_result_cap", "65536"),
])
def test_every_duration_and_size_setting_has_a_variable_that_beats_the_file(
        cli: Invoke, isolated_home: Path, monkeypatch: pytest.MonkeyPatch,
        variable: str, value: str, setting: str, shown: str) -> None:
    isolated_home.mkdir()
    (isolated_home / "config.toml").write_text(
        'default_ttl = "3h"\nleeway = "1s"\nhold_timeout = "1m"\nreplay_result_cap = 1024\n')
    before = ok_json(cli("config", "show", "--json"))[setting]
    monkeypatch.setenv(variable, value)
    after = ok_json(cli("config", "show", "--json"))[setting]
    assert (before != after, after) == (True, shown)


def test_a_bad_duration_in_a_variable_is_config_invalid(
        cli: Invoke, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCPBILL_LEEWAY", "soon")
    assert "leeway" in error_json(cli("config", "show", "--json"), "CONFIG_INVALID")["message"]


def test_the_default_ttl_variable_sets_an_issued_tokens_lifetime(
        ledger_cli: Invoke, monkeypatch: pytest.MonkeyPatch) -> None:
    from datetime import datetime

    ok_json(ledger_cli("wallet", "fund", "--demo", "5", "--json"))
    monkeypatch.setenv("MCPBILL_DEFAULT_TTL", "90m")
    issued = ok_json(ledger_cli("token", "issue", "--limit", "1", "--json"))
    shown = ok_json(ledger_cli("token", "show", issued["jti"], "--json"))
    lifetime = (datetime.fromisoformat(shown["expires_at"])
                - datetime.fromisoformat(shown["issued_at"]))
    assert lifetime.total_seconds() == 90 * 60


@pytest.mark.parametrize(("variable", "key"), [("MCPBILL_CHAIN", "chain"),
                                               ("MCPBILL_DEPOSIT_ADDRESS", "deposit_address")])
def test_wallet_settings_have_variables(isolated_home: Path, monkeypatch: pytest.MonkeyPatch,
                                        variable: str, key: str) -> None:
    isolated_home.mkdir()
    (isolated_home / "config.toml").write_text(f'[wallet]\n{key} = "from-file"\n')
    monkeypatch.setenv(variable, "from-env")
    assert load_settings().file["wallet"][key] == "from-env"


def test_the_readme_settings_table_names_every_variable() -> None:
    import mcpbill_cli.config as config
    from mcpbill_cli.wallet.chains import ENV_RPC_URL
    from mcpbill_cli.wallet.keystore import ENV_KEYSTORE_PASSWORD

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    table = readme.split("## Settings", 1)[1].split("\n## ", 1)[0]
    variables = [v for k, v in vars(config).items() if k.startswith("ENV_") and isinstance(v, str)]
    variables += [*config.ENV_WALLET.values(), ENV_RPC_URL, ENV_KEYSTORE_PASSWORD]
    assert [v for v in variables if f"`{v}`" not in table] == []


# --- [mcp]: mcpbill as an MCP server's authorization ------------------------------------------


def test_mcp_authorization_is_off_unless_configured(cli: Invoke) -> None:
    shown = ok_json(cli("config", "show", "--json"))
    assert (shown["mcp_authorization"], shown["mcp_resource"]) == ("none", "")


def test_bearer_authorization_takes_the_servers_canonical_uri(
        cli: Invoke, isolated_home: Path) -> None:
    isolated_home.mkdir()
    (isolated_home / "config.toml").write_text(
        '[mcp]\nauthorization = "bearer"\nresource = "HTTPS://MCP.Example.com/mcp/"\n')
    shown = ok_json(cli("config", "show", "--json"))
    assert (shown["mcp_authorization"], shown["mcp_resource"]) == (
        "bearer", "https://mcp.example.com/mcp")


@pytest.mark.parametrize(("table", "complaint"), [
    ('[mcp]\nauthorization = "bearer"\n', "needs resource"),
    ('[mcp]\nauthorization = "oauth"\n', "not one of none, bearer"),
    ('[mcp]\nauthorization = "bearer"\nresource = "http://mcp.example.com/mcp"\n', "https"),
    ('[mcp]\nresource = "https://mcp.example.com/mcp#frag"\n', "no fragment"),
    ('[mcp]\nresource = "mcp.example.com"\n', "canonical server URI"),
    ('[mcp]\naudience = "x"\n', "unknown key(s) audience"),
    ('mcp = "bearer"\n', "must be a table"),
])
def test_a_bad_mcp_table_is_config_invalid(cli: Invoke, isolated_home: Path, table: str,
                                           complaint: str) -> None:
    isolated_home.mkdir()
    (isolated_home / "config.toml").write_text(table)
    message = error_json(cli("config", "show", "--json"), "CONFIG_INVALID")["message"]
    assert complaint in message


def test_the_mcp_variables_beat_the_file(cli: Invoke, isolated_home: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    isolated_home.mkdir()
    (isolated_home / "config.toml").write_text('[mcp]\nauthorization = "none"\n')
    monkeypatch.setenv("MCPBILL_MCP_AUTHORIZATION", "bearer")
    monkeypatch.setenv("MCPBILL_MCP_RESOURCE", "http://127.0.0.1:8000/mcp")
    shown = ok_json(cli("config", "show", "--json"))
    assert (shown["mcp_authorization"], shown["mcp_resource"]) == (
        "bearer", "http://127.0.0.1:8000/mcp")

"""Every failure path ends in a coded error: a documented exit status, under --json exactly one
JSON document with status "error" and a code, no traceback, and nothing changed on disk.

One row of ``CASES`` is one bad input: what to break in an initialized home (or which file to
point at), the command, and the code it must end in. Add a case by adding a row.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mcpbill_cli.cli import app
from mcpbill_cli.cli.output import EXIT_CODES
from tests.cli.conftest import Invoke, ok_json, tree_snapshot
from tests.cli.terminal import in_terminal, without_terminal

HUGE = "9" * 5001  # more digits than int() converts (4,300)
# More nesting than json parses at the default recursion limit; not so deep that the C parser
# could overflow the stack where a test has raised the limit (it raises RecursionError then).
DEEP = "[" * 5_000
Break = Callable[[Path, Path], None]  # (home, an empty scratch directory)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An initialized home on SQLite, 10 USDC funded, one token issued: copied for each case."""
    home = tmp_path_factory.mktemp("template") / "home"
    runner = CliRunner()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MCPBILL_HOME", str(home))
        mp.delenv("MCPBILL_DB_URL", raising=False)
        for args in (["init"], ["wallet", "fund", "--demo", "10"], ["token", "issue", "--limit",
                                                                      "1"]):
            result = runner.invoke(app, args, catch_exceptions=False)
            assert result.exit_code == 0, result.output
    yield home


@pytest.fixture
def home(template: Path, isolated_home: Path) -> Path:
    shutil.copytree(template, isolated_home)
    return isolated_home


# --- ways to break a home -------------------------------------------------------------------


def write(name: str, content: bytes | str) -> Break:
    def apply(home: Path, _scratch: Path) -> None:
        path = home / name
        path.unlink(missing_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return apply


def make_directory(name: str) -> Break:
    def apply(home: Path, _scratch: Path) -> None:
        (home / name).unlink()
        (home / name).mkdir()
    return apply


def remove(name: str) -> Break:
    return lambda home, _scratch: (home / name).unlink()


def config_line(line: str) -> Break:
    """Set one key of config.toml (replacing the line that sets it, if any)."""
    def apply(home: Path, _scratch: Path) -> None:
        path = home / "config.toml"
        key = line.split("=")[0].strip()
        kept = [x for x in path.read_text().splitlines() if x.split("=")[0].strip() != key]
        path.write_text("\n".join([*kept, line]) + "\n")
    return apply


def key_file(content: bytes | None = None, *, directory: bool = False) -> Break:
    """Replace the active signing key's file: new bytes, a directory, or nothing."""
    def apply(home: Path, _scratch: Path) -> None:
        path = next((home / "keys").glob("*.pem"))
        path.unlink()
        if directory:
            path.mkdir()
        elif content is not None:
            path.write_bytes(content)
    return apply


def keyring(document: Any) -> Break:
    return write("keys/keyring.json", document if isinstance(document, str)
                 else json.dumps(document))


def keyring_entry(**changes: Any) -> Break:
    """keyring.json with the active key's entry changed."""
    def apply(home: Path, _scratch: Path) -> None:
        path = home / "keys" / "keyring.json"
        document = json.loads(path.read_text())
        document["keys"][0].update(changes)
        path.write_text(json.dumps(document))
    return apply


def es256_key_in_an_eddsa_slot() -> Break:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    return key_file(pem)


def corrupt_pages(home: Path, _scratch: Path) -> None:
    """Overwrite the ledger's pages 3 to 6 (the schema page survives: it opens, then fails)."""
    _checkpoint(home / "ledger.db")
    path = home / "ledger.db"
    data = bytearray(path.read_bytes())
    data[4096 * 2:4096 * 6] = b"\xab" * (4096 * 4)
    path.write_bytes(bytes(data))


def _checkpoint(path: Path) -> None:
    """Fold the WAL into the file, so what is broken in the file is what SQLite reads."""
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def garbage_ledger(home: Path, scratch: Path) -> None:
    _checkpoint(home / "ledger.db")
    write("ledger.db", b"\x89garbage\x00" * 1000)(home, scratch)


def ledger_directory(home: Path, scratch: Path) -> None:
    _checkpoint(home / "ledger.db")
    make_directory("ledger.db")(home, scratch)


def scratch_file(name: str, content: bytes | str) -> Break:
    def apply(_home: Path, scratch: Path) -> None:
        (scratch / name).write_bytes(content.encode() if isinstance(content, str) else content)
    return apply


def scratch_directory(name: str) -> Break:
    return lambda _home, scratch: (scratch / name).mkdir()


def nothing(_home: Path, _scratch: Path) -> None:
    pass


# (id, break, command (SCRATCH is the scratch directory), code)
CASES: list[tuple[str, Break, list[str], str]] = [
    # config.toml
    ("config-binary", write("config.toml", b"\x00\x01\xfe\xff" * 64), ["token", "list"],
     "CONFIG_INVALID"),
    ("config-directory", make_directory("config.toml"), ["token", "list"], "CONFIG_INVALID"),
    ("config-not-toml", write("config.toml", "mode = \n[[["), ["token", "list"], "CONFIG_INVALID"),
    ("config-unknown-key", config_line('colour = "blue"'), ["token", "list"], "CONFIG_INVALID"),
    ("config-ttl-cap-huge", config_line('ttl_cap = "999999999d"'),
     ["token", "issue", "--limit", "1"], "CONFIG_INVALID"),
    ("config-hold-timeout-negative", config_line('hold_timeout = "-5m"'), ["wallet", "balance"],
     "CONFIG_INVALID"),
    ("config-leeway-empty", config_line('leeway = ""'), ["token", "list"], "CONFIG_INVALID"),
    ("config-mode-huge", config_line(f'mode = "{"d" * 100_000}"'), ["token", "list"],
     "CONFIG_INVALID"),
    ("config-result-cap-huge", config_line(f"replay_result_cap = {HUGE}"), ["token", "list"],
     "CONFIG_INVALID"),
    # pricing.toml
    ("pricing-binary", write("pricing.toml", b"\x00\xff" * 100), ["pricing", "show"],
     "PRICING_INVALID"),
    ("pricing-directory", make_directory("pricing.toml"), ["pricing", "show"],
     "PRICING_INVALID"),
    ("pricing-empty", write("pricing.toml", ""), ["pricing", "validate"], "PRICING_INVALID"),
    ("pricing-huge-price", write("pricing.toml", f'version = 1\n[tools.x]\nprice = "{HUGE}"\n'),
     ["pricing", "validate"], "PRICING_INVALID"),
    ("pricing-version-huge", write("pricing.toml", f"version = {HUGE}\n"),
     ["pricing", "validate"], "PRICING_INVALID"),
    ("pricing-validate-missing-file", nothing, ["pricing", "validate", "SCRATCH/nope.toml"],
     "PRICING_INVALID"),
    # signing keys
    ("key-garbage", key_file(b"-----BEGIN PRIVATE KEY-----\ngarbage\n"),
     ["token", "issue", "--limit", "1"], "KEYRING_CORRUPT"),
    ("key-empty", key_file(b""), ["token", "issue", "--limit", "1"], "KEYRING_CORRUPT"),
    ("key-missing", key_file(None), ["token", "issue", "--limit", "1"], "KEYRING_CORRUPT"),
    ("key-directory", key_file(directory=True), ["keys", "export-jwks"], "KEYRING_CORRUPT"),
    ("key-of-another-algorithm", es256_key_in_an_eddsa_slot(), ["token", "issue", "--limit", "1"],
     "KEYRING_CORRUPT"),
    ("keyring-not-json", keyring('{"keys": ['), ["token", "issue", "--limit", "1"],
     "KEYRING_CORRUPT"),
    ("keyring-binary", write("keys/keyring.json", b"\x00\xff\xfe"), ["keys", "list"],
     "KEYRING_CORRUPT"),
    ("keyring-a-list", keyring([]), ["keys", "list"], "KEYRING_CORRUPT"),
    ("keyring-entry-incomplete", keyring({"keys": [{"kid": "k"}]}), ["keys", "list"],
     "KEYRING_CORRUPT"),
    ("keyring-kid-a-path", keyring_entry(kid="../../config"), ["keys", "export-jwks"],
     "KEYRING_CORRUPT"),
    ("keyring-unknown-status", keyring_entry(status="sleeping"), ["keys", "list"],
     "KEYRING_CORRUPT"),
    ("keyring-naive-verify-until", keyring_entry(status="verifying",
                                                 verify_until="2026-01-01T00:00:00"),
     ["keys", "export-jwks"], "KEYRING_CORRUPT"),
    ("keyring-deep", keyring(DEEP), ["keys", "list"], "KEYRING_CORRUPT"),
    ("keyring-directory", make_directory("keys/keyring.json"), ["keys", "list"],
     "KEYRING_CORRUPT"),
    ("keyring-missing", remove("keys/keyring.json"), ["keys", "list"], "NOT_INITIALIZED"),
    # the ledger file
    ("ledger-garbage", garbage_ledger, ["wallet", "balance"], "LEDGER_UNAVAILABLE"),
    ("ledger-corrupt-pages", corrupt_pages, ["token", "list"], "LEDGER_UNAVAILABLE"),
    ("ledger-directory", ledger_directory, ["wallet", "balance"], "LEDGER_UNAVAILABLE"),
    # --jwks
    ("jwks-missing", nothing, ["receipt", "verify", "x", "--jwks", "SCRATCH/nope.json"],
     "FILE_UNAVAILABLE"),
    ("jwks-directory", scratch_directory("j"), ["receipt", "verify", "x", "--jwks", "SCRATCH/j"],
     "FILE_UNAVAILABLE"),
    ("jwks-not-json", scratch_file("j", "{"), ["receipt", "verify", "x", "--jwks", "SCRATCH/j"],
     "INVALID_INPUT"),
    ("jwks-binary", scratch_file("j", b"\xff\xfe\x00"),
     ["receipt", "verify", "x", "--jwks", "SCRATCH/j"], "INVALID_INPUT"),
    ("jwks-empty", scratch_file("j", ""), ["receipt", "verify", "x", "--jwks", "SCRATCH/j"],
     "INVALID_INPUT"),
    ("jwks-deep", scratch_file("j", DEEP), ["receipt", "verify", "x", "--jwks", "SCRATCH/j"],
     "INVALID_INPUT"),
    ("jwks-not-a-jwks", scratch_file("j", "[1]"),
     ["receipt", "verify", "x", "--jwks", "SCRATCH/j"], "INVALID_INPUT"),
    ("jwks-bad-key", scratch_file("j", json.dumps({"keys": [{"kid": "k", "alg": "EdDSA",
                                                              "kty": "OKP", "x": "!!"}]})),
     ["receipt", "verify", "x", "--jwks", "SCRATCH/j"], "INVALID_INPUT"),
    # --out
    ("events-out-parent-a-file", scratch_file("f", "x"),
     ["events", "export", "--out", "SCRATCH/f/e.jsonl"], "FILE_UNAVAILABLE"),
    ("events-out-a-directory", scratch_directory("d"), ["events", "export", "--out", "SCRATCH/d"],
     "FILE_UNAVAILABLE"),
    ("events-out-in-proc", nothing, ["events", "export", "--out", "/proc/mcpbill-e.jsonl"],
     "FILE_UNAVAILABLE"),
    ("events-until-before-since", nothing,
     ["events", "export", "--since", "2026-12-08", "--until", "2026-12-07"], "INVALID_INPUT"),
    ("seals-out-a-directory", scratch_directory("d"),
     ["audit", "seals", "export", "--out", "SCRATCH/d"], "FILE_UNAVAILABLE"),
    ("revocations-out-parent-a-file", scratch_file("f", "x"),
     ["revocations", "export", "--out", "SCRATCH/f/r.json"], "FILE_UNAVAILABLE"),
    ("jwks-out-a-directory", scratch_directory("d"), ["keys", "export-jwks", "--out", "SCRATCH/d"],
     "FILE_UNAVAILABLE"),
    # numbers
    ("limit-huge", nothing, ["token", "issue", "--limit", HUGE], "INVALID_INPUT"),
    ("limit-huge-decimals", nothing, ["token", "issue", "--limit", "0." + HUGE], "INVALID_INPUT"),
    ("limit-empty", nothing, ["token", "issue", "--limit", ""], "INVALID_INPUT"),
    ("fund-huge", nothing, ["wallet", "fund", "--demo", HUGE], "INVALID_INPUT"),
    ("price-huge", nothing, ["pricing", "set", "search", HUGE], "INVALID_INPUT"),
    ("after-huge", nothing, ["events", "export", "--after", HUGE], "USAGE_ERROR"),
    # dates
    ("reconcile-date-9999", nothing, ["reconcile", "--date", "9999-12-31"], "INVALID_INPUT"),
    ("reconcile-date-0001", nothing, ["reconcile", "--date", "0001-01-01"], "INVALID_INPUT"),
    ("reconcile-date-not-a-day", nothing, ["reconcile", "--date", "2026-02-30"],
     "INVALID_INPUT"),
    ("reconcile-date-empty", nothing, ["reconcile", "--date", ""], "INVALID_INPUT"),
    ("reconcile-from-overflows", nothing, ["reconcile", "--from", "0001-01-01T00:00:00+01:00"],
     "INVALID_INPUT"),
    ("reconcile-to-9999", nothing, ["reconcile", "--from", "2026-01-01", "--to",
                                    "9999-12-31T23:59:59"], "INVALID_INPUT"),
    ("events-since-9999", nothing, ["events", "export", "--since", "9999-12-31"],
     "INVALID_INPUT"),
    ("events-until-huge", nothing, ["events", "export", "--until", HUGE], "INVALID_INPUT"),
    # durations
    ("ttl-huge", nothing, ["token", "issue", "--limit", "1", "--ttl", "999999999d"],
     "INVALID_INPUT"),
    ("ttl-too-many-digits", nothing, ["token", "issue", "--limit", "1", "--ttl", HUGE + "s"],
     "INVALID_INPUT"),
    ("ttl-empty", nothing, ["token", "issue", "--limit", "1", "--ttl", ""], "INVALID_INPUT"),
    # unknown names
    ("token-unknown", nothing, ["token", "show", "tok_nope"], "NOT_FOUND"),
    ("key-unknown", nothing, ["keys", "retire", "nope"], "NOT_FOUND"),
    ("receipt-unknown", nothing, ["receipt", "show", "rcpt_nope"], "NOT_FOUND"),
    ("chain-unknown", nothing, ["wallet", "sync", "--chain", "narnia"], "UNKNOWN_CHAIN"),
]


def disk(home: Path, scratch: Path) -> dict[str, Any]:
    """Everything a failed command must leave as it was: the home's files, the ledger's rows
    (or its bytes, when it is too broken to read), the scratch directory."""
    return {"home": tree_snapshot(home), "ledger": _ledger_rows(home / "ledger.db"),
            "scratch": sorted(str(p.relative_to(scratch)) for p in scratch.rglob("*"))}


def _ledger_rows(path: Path) -> object:
    if not path.is_file():
        return None
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE "
                                                 "type = 'table' ORDER BY name")]
            rows = {t: sorted(map(repr, conn.execute(f'SELECT * FROM "{t}"'))) for t in tables}
        conn.close()
        return rows
    except sqlite3.DatabaseError:
        return path.read_bytes()


def expanded(args: list[str], scratch: Path) -> list[str]:
    return [a.replace("SCRATCH", str(scratch)) for a in args]


@pytest.mark.parametrize(("breaking", "args", "code"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_a_bad_input_ends_in_one_coded_error(cli: Invoke, home: Path, tmp_path: Path,
                                             breaking: Break, args: list[str],
                                             code: str) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    breaking(home, scratch)
    before = disk(home, scratch)
    run = _subprocess if code == "USAGE_ERROR" else _in_process(cli)  # Typer's own parsing

    status, stdout, stderr = run([*expanded(args, scratch), "--json"])
    assert status == EXIT_CODES[code] != 0, stdout + stderr
    document = json.loads(stdout)  # exactly one document: json.loads refuses more
    assert document["status"] == "error" and document["data"] is None, document
    assert [e["code"] for e in document["errors"]] == [code], document
    assert "Traceback" not in stderr

    status, stdout, stderr = run(expanded(args, scratch))
    assert status == EXIT_CODES[code], stdout + stderr
    assert "Traceback" not in stderr and stdout == "", stdout + stderr
    assert code in stderr or code == "USAGE_ERROR", stderr
    assert disk(home, scratch) == before


Run = Callable[[list[str]], tuple[int, str, str]]


def _in_process(cli: Invoke) -> Run:
    def run(args: list[str]) -> tuple[int, str, str]:
        result = cli(*args)
        return result.exit_code, result.stdout, result.stderr
    return run


def _subprocess(args: list[str]) -> tuple[int, str, str]:
    ran = without_terminal(*args)
    return ran.returncode, ran.stdout, ran.stderr


def test_case_ids_are_unique() -> None:
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))


# --- no question without a terminal -------------------------------------------------------------


def _one_error(stdout: str, code: str) -> dict[str, Any]:
    document = json.loads(stdout)
    assert document["status"] == "error", document
    assert [e["code"] for e in document["errors"]] == [code], document
    return dict(document["errors"][0])


def test_wallet_create_without_a_terminal_names_the_variable(home: Path) -> None:
    ran = without_terminal("wallet", "create", "--json")
    assert ran.returncode == EXIT_CODES["NO_TERMINAL"], ran
    assert "MCPBILL_KEYSTORE_PASSWORD" in _one_error(ran.stdout, "NO_TERMINAL")["message"]
    said = without_terminal("wallet", "create")
    assert said.returncode == EXIT_CODES["NO_TERMINAL"] and said.stdout == ""
    assert "MCPBILL_KEYSTORE_PASSWORD" in said.stderr and "Aborted" not in said.stderr
    assert not (home / "keys" / "wallet.json").exists()


def test_x402_fetch_checks_the_keystore_before_asking_for_its_password(cli: Invoke,
                                                                       home: Path) -> None:
    token = ok_json(cli("token", "issue", "--limit", "1", "--json"))["token"]
    fetch = ("x402", "fetch", f"http://127.0.0.1:{closed_port()}/report", "--token", token)

    missing = without_terminal(*fetch, "--json")
    assert missing.returncode == EXIT_CODES["NOT_FOUND"], missing
    assert "wallet create" in _one_error(missing.stdout, "NOT_FOUND")["message"]

    made = without_terminal("wallet", "create",
                            env={**os.environ, "MCPBILL_KEYSTORE_PASSWORD": "pw-1234"})
    assert made.returncode == 0, made
    asked = without_terminal(*fetch, "--json")
    assert asked.returncode == EXIT_CODES["NO_TERMINAL"], asked
    assert "MCPBILL_KEYSTORE_PASSWORD" in _one_error(asked.stdout, "NO_TERMINAL")["message"]
    assert "Aborted" not in asked.stderr


def test_token_inspect_on_a_terminal_without_a_token_is_a_usage_error(home: Path) -> None:
    shown = in_terminal("token", "inspect", timeout=30)
    assert shown.returncode == EXIT_CODES["USAGE_ERROR"], shown
    assert "AGENT_CREDIT_JWT" in shown.stderr
    as_json = in_terminal("token", "inspect", "--json", timeout=30)
    assert as_json.returncode == EXIT_CODES["USAGE_ERROR"], as_json
    assert '"USAGE_ERROR"' in as_json.stderr


def test_token_inspect_with_nothing_piped_in_is_a_usage_error(home: Path) -> None:
    """stdin at its end (cron, CI, `< /dev/null`) brings no token: missing, not malformed."""
    env = {k: v for k, v in os.environ.items() if k != "AGENT_CREDIT_JWT"}
    for args in (("token", "inspect"), ("token", "inspect", "-"), ("token", "inspect", "--json")):
        ran = without_terminal(*args, env=env, timeout=30)
        assert ran.returncode == EXIT_CODES["USAGE_ERROR"], ran
        said = ran.stdout if "--json" in args else ran.stderr  # --json: one document
        assert "stdin was empty" in said and "AGENT_CREDIT_JWT" in said, ran


# --- x402 fetch: nothing listening --------------------------------------------------------------


def closed_port() -> int:
    """A local port nothing listens on: bound once by the OS, then closed."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "paying"])
def test_x402_fetch_to_a_closed_port_is_unreachable(cli: Invoke, home: Path, dry_run: bool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCPBILL_KEYSTORE_PASSWORD", "pw-1234")
    if not dry_run:
        assert cli("wallet", "create").exit_code == 0
    token = ok_json(cli("token", "issue", "--limit", "1", "--json"))["token"]
    assert cli("audit", "seal").exit_code == 0  # what a verifier's close would seal anyway
    before = disk(home, home / "keys")
    url = f"http://127.0.0.1:{closed_port()}/report"
    flags = ["--dry-run"] if dry_run else []
    result = cli("x402", "fetch", url, "--token", token, *flags, "--json")
    assert result.exit_code == EXIT_CODES["X402_UNREACHABLE"], result.output
    assert url in _one_error(result.stdout, "X402_UNREACHABLE")["message"]
    assert disk(home, home / "keys") == before


# --- the last line of defence -------------------------------------------------------------------


def _fault(exc: Exception) -> Callable[..., Any]:
    def raise_it(*_args: Any, **_kwargs: Any) -> Any:
        raise exc
    return raise_it


def test_an_unexpected_exception_is_internal_error(cli: Invoke, home: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mcpbill_cli.cli.state.load_settings", _fault(ZeroDivisionError("boom")))
    result = cli("wallet", "balance", "--json")
    assert result.exit_code == EXIT_CODES["INTERNAL_ERROR"] == 1, result.output
    message = _one_error(result.stdout, "INTERNAL_ERROR")["message"]
    assert "ZeroDivisionError: boom" in message and "MCPBILL_DEBUG=1" in message
    assert "Traceback" not in result.stderr

    said = cli("wallet", "balance")
    assert said.exit_code == 1 and said.stdout == ""
    assert "INTERNAL_ERROR" in said.stderr and "Traceback" not in said.stderr


def test_mcpbill_debug_adds_the_traceback_and_keeps_the_document(
        cli: Invoke, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mcpbill_cli.cli.state.load_settings", _fault(ZeroDivisionError("boom")))
    result = cli("wallet", "balance", "--json", env={"MCPBILL_DEBUG": "1"})
    assert result.exit_code == 1, result.output
    _one_error(result.stdout, "INTERNAL_ERROR")
    assert "Traceback" in result.stderr and "ZeroDivisionError: boom" in result.stderr


def test_an_os_error_on_a_path_names_the_path(cli: Invoke, home: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    refused = PermissionError(13, "Permission denied", "/srv/mcpbill/config.toml")
    monkeypatch.setattr("mcpbill_cli.cli.state.load_settings", _fault(refused))
    result = cli("wallet", "balance", "--json")
    assert result.exit_code == EXIT_CODES["FILE_UNAVAILABLE"], result.output
    error = _one_error(result.stdout, "FILE_UNAVAILABLE")
    assert error["path"] == "/srv/mcpbill/config.toml"
    assert "Permission denied" in error["message"]

"""Contracts every command keeps: --help that teaches, one JSON document with --json (on
failure too), committed completion scripts that match what the CLI generates."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.main import get_command
from typer.testing import CliRunner

from mcpbill_cli import Receipt, Verifier
from mcpbill_cli.cli import app
from mcpbill_cli.cli.completion import SHELLS, script
from mcpbill_cli.clock import utcnow
from tests.cli.conftest import Invoke, ok_json
from tests.cli.data_contract import add_activity, assert_contract, assert_export_lines

ROOT = Path(__file__).resolve().parents[2]


def leaf_commands() -> dict[tuple[str, ...], object]:
    """Every leaf command of the CLI by its path, e.g. ("token", "issue")."""
    found: dict[tuple[str, ...], object] = {}

    def walk(command: object, prefix: tuple[str, ...]) -> None:
        subcommands = getattr(command, "commands", None)
        if not subcommands:
            found[prefix] = command
            return
        for name, sub in subcommands.items():
            walk(sub, (*prefix, name))

    walk(get_command(app), ())
    return found


def command_paths() -> list[tuple[str, ...]]:
    return sorted(leaf_commands())


@pytest.mark.parametrize("path", command_paths(), ids=" ".join)
def test_every_command_has_help_and_takes_json(cli: Invoke, path: tuple[str, ...]) -> None:
    result = cli(*path, "--help")
    assert result.exit_code == 0, result.output
    assert "--json" in result.stdout
    summary = result.stdout.split("Usage:")[1].split("╭")[0].strip()
    assert len(summary.splitlines()) >= 2, f"{' '.join(path)} has no help text"


@pytest.mark.parametrize("path", command_paths(), ids=" ".join)
def test_help_paragraphs_reflow_to_the_terminal(path: tuple[str, ...]) -> None:
    """Typer keeps a help text's line breaks: a paragraph must be one line, or a terminal
    narrower than the source breaks it twice."""
    text = getattr(leaf_commands()[path], "help", None) or ""
    assert all("\n" not in paragraph for paragraph in text.split("\n\n")), text


def every_command() -> dict[tuple[str, ...], Any]:
    """Every command of the CLI, groups and the root (``()``) included, by its path."""
    found: dict[tuple[str, ...], Any] = {}

    def walk(command: Any, prefix: tuple[str, ...]) -> None:
        found[prefix] = command
        for name, sub in (getattr(command, "commands", None) or {}).items():
            walk(sub, (*prefix, name))

    walk(get_command(app), ())
    return found


# `[mcp]`, `mcpbill[otel]`: bracketed text a help string means literally. Rich markup, which
# the help is rendered with, takes it for a style and drops it unless written `\[mcp]`.
BRACKETED = re.compile(r"\\?(\[[^\[\]\s]+\])")


def bracketed_in_source(command: Any) -> set[str]:
    """The bracketed words a command's help, its options' help and shown defaults write."""
    texts = [command.help or ""]
    for param in command.params:
        texts.append(getattr(param, "help", None) or "")
        if isinstance(getattr(param, "show_default", None), str):
            texts.append(param.show_default)
    return {match.group(1) for text in texts for match in BRACKETED.finditer(text)}


def test_help_texts_write_bracketed_words_to_check() -> None:
    """The next test has something to check: the help does name extras and config tables."""
    assert set().union(*map(bracketed_in_source, every_command().values()))


@pytest.mark.parametrize("path", sorted(every_command()), ids=lambda p: " ".join(p) or "mcpbill")
def test_help_shows_the_bracketed_words_its_source_writes(runner: CliRunner,
                                                          path: tuple[str, ...]) -> None:
    """`token issue --help` showed "canonical URI ( resource)" for "([mcp] resource)", `proxy
    --help` "Needs mcpbill." for "mcpbill[otel]"."""
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "250"},
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    missing = sorted(word for word in bracketed_in_source(every_command()[path])
                     if word not in result.stdout)
    assert missing == [], result.stdout


def test_root_help_lists_every_group(cli: Invoke) -> None:
    result = cli("--help")
    assert result.exit_code == 0
    for group in ("init", "wallet", "token", "revoke", "keys", "pricing", "db", "config"):
        assert group in result.stdout


# One successful invocation per command, run in order on one home, each with --json.
SUCCESSFUL = [
    ("config", "show"),
    ("status",),
    ("version",),
    ("db", "status"),
    ("db", "upgrade"),
    ("keys", "list"),
    ("keys", "export-jwks"),
    ("wallet", "fund", "--demo", "10"),
    ("wallet", "address", "--set", "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"),
    ("wallet", "address"),
    ("wallet", "link", "--tenant", "default", "--address", "0x" + "aa" * 20),
    ("wallet", "create"),
    ("wallet", "balance"),
    ("tenant", "list"),
    ("token", "issue", "--limit", "1", "--ttl", "12h"),
    ("token", "list"),
    ("token", "show", "{jti}"),
    ("token", "inspect", "{token}"),
    ("token", "topup", "{jti}", "--amount", "0.5"),
    ("token", "extend", "{jti}", "--ttl", "13h"),
    ("receipt", "show", "{idempotency_key}"),
    ("receipt", "verify", "{receipt}"),
    ("refund", "{receipt_id}", "--amount", "0.001", "--reason", "contract"),
    ("receipt", "verify", "{refund}"),
    ("webhooks", "add", "http://127.0.0.1:9/hooks", "--events", "refund.created"),
    ("webhooks", "list"),
    ("webhooks", "balance-alert", "default", "--below", "1"),
    ("refund", "{receipt_id}", "--amount", "0.001", "--reason", "webhook"),
    ("webhooks", "deliver", "--once"),
    ("webhooks", "deliveries"),
    ("webhooks", "remove", "{endpoint_id}"),
    ("pricing", "show"),
    ("pricing", "quote", "search"),
    ("pricing", "set", "search", "0.003"),
    ("pricing", "unset", "search"),
    ("pricing", "validate"),
    ("pricing", "diff", "{pricing}"),
    ("revoke", "{jti}"),
    ("revocations", "export"),
    ("reconcile", "--from", "{today}"),
    ("events", "export", "--out", "{events}"),
    ("audit", "seal"),
    ("audit", "seals", "export", "--out", "{seals}"),
    ("token", "sweep"),
    ("keys", "rotate"),
    ("keys", "retire", "{old_kid}", "--force", "--yes"),
    ("completion", "bash"),
    ("init", "--force", "--yes"),
    ("demo", "--home", "{demo}"),
]


def charge_once(token: str) -> Receipt:
    verifier = Verifier.from_settings()
    try:
        return verifier.charge(token, "search", idempotency_key="contract-1")
    finally:
        verifier.close()


# Commands that need a live chain or a paid HTTP peer succeed in tests/wallet and tests/x402
# (over anvil), not here.
NEEDS_A_CHAIN = {("wallet", "sync"), ("x402", "fetch")}
# A server that runs until stopped: tests/proxy/test_cli.py checks its one --json document.
RUNS_UNTIL_STOPPED = {("proxy",)}
# A test delivery needs a receiver: tests/webhooks/test_cli.py runs one.
NEEDS_A_RECEIVER = {("webhooks", "test")}


def test_every_command_prints_one_json_document(ledger_cli: Invoke, isolated_home: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCPBILL_KEYSTORE_PASSWORD", "correct horse battery staple")
    elsewhere = NEEDS_A_CHAIN | RUNS_UNTIL_STOPPED | NEEDS_A_RECEIVER
    missing = [p for p in command_paths() if p not in elsewhere
               and not any(args[:len(p)] == p for args in SUCCESSFUL)]
    assert not missing, f"add a --json invocation for {missing}"
    values: dict[str, str] = {"pricing": str(isolated_home / "pricing.toml"),
                              "demo": str(isolated_home.parent / "demo-home"),
                              "events": str(isolated_home.parent / "events.jsonl"),
                              "seals": str(isolated_home.parent / "seals.jsonl"),
                              "today": f"{utcnow():%Y-%m-%d}"}
    paths = command_paths()
    add_activity(ledger_cli)
    for args in SUCCESSFUL:
        data = ok_json(ledger_cli(*(a.format(**values) for a in args), "--json"))
        assert_contract(next(p for p in paths if args[:len(p)] == p), data)
        if args[:2] == ("token", "issue"):
            values.update(token=data["token"], jti=data["jti"])
            receipt = charge_once(data["token"])
            values.update(idempotency_key=receipt.claims["idempotencyKey"], receipt=receipt.jws,
                          receipt_id=receipt.receipt_id)
        if args[0] == "refund":
            values["refund"] = data["jws"]
        if args[:2] == ("webhooks", "add"):
            values["endpoint_id"] = data["id"]
        if args[:2] == ("keys", "rotate"):
            values["old_kid"] = data["previous"]["kid"]
        if args[0] == "demo":
            kinds = [step["kind"] for step in data["steps"]]
            assert kinds[-2:] == ["refusal", "summary"] and "receipt" in kinds
            assert data["steps"][-1]["data"]["violations"] == []
    assert_export_lines("events-export-line", Path(values["events"]))
    assert_export_lines("audit-seals-export-line", Path(values["seals"]))


@pytest.mark.parametrize("args", [
    ("wallet", "balance"), ("token", "list"), ("keys", "list"), ("token", "show", "tok_x"),
    ("revoke", "tok_x"), ("db", "status"), ("pricing", "show"),
])
def test_failures_are_one_json_document(cli: Invoke, args: tuple[str, ...]) -> None:
    result = cli("--db-url", "postgresql+psycopg://nobody@127.0.0.1:1/x", *args, "--json")
    assert result.exit_code != 0
    document = json.loads(result.stdout)
    assert set(document) == {"schema_version", "status", "data", "errors"}
    assert document["status"] == "error" and document["data"] is None
    assert all(set(e) >= {"code", "message"} for e in document["errors"])


@pytest.mark.parametrize("shell", SHELLS)
def test_committed_completion_scripts_match_the_cli(shell: str) -> None:
    committed = (ROOT / "completions" / f"mcpbill.{shell}").read_text()
    assert committed == script(shell), (
        f"completions/mcpbill.{shell} is stale: run `mcpbill completion {shell} > "
        f"completions/mcpbill.{shell}`")


def test_unknown_shell_is_refused(cli: Invoke) -> None:
    assert cli("completion", "powershell").exit_code == 3


def test_typer_app_has_no_install_completion() -> None:
    assert isinstance(app, typer.Typer)
    assert "--install-completion" not in str(get_command(app).params)


def test_readme_exit_code_table_matches_the_cli() -> None:
    from mcpbill_cli.cli.output import EXIT_CODES

    documented: dict[str, int] = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        row = re.match(r"\| (\d+) \| ([^|]*) \|", line)
        if row:
            for code in re.findall(r"`([A-Z][A-Z0-9_]+)`", row.group(2)):
                documented[code] = int(row.group(1))
    assert documented == EXIT_CODES


def test_every_refusal_code_has_its_exit_code() -> None:
    """Each code a BillingError can carry (the x402 refusals' root aside, which none carries
    alone) is in the exit code table: none falls through to the generic 1 of INTERNAL_ERROR."""
    import importlib
    import pkgutil

    import mcpbill_cli
    from mcpbill_cli.cli.output import EXIT_CODES
    from mcpbill_cli.errors import BillingError

    for module in pkgutil.walk_packages(mcpbill_cli.__path__, "mcpbill_cli."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)

    def kinds(cls: type[BillingError]) -> list[type[BillingError]]:
        return [k for sub in cls.__subclasses__() for k in (sub, *kinds(sub))]

    codes = {kind.code for kind in kinds(BillingError)} - {"X402_ERROR", "INTERNAL_ERROR"}
    assert sorted(codes - set(EXIT_CODES)) == []

"""The CLI's data contract, checked on every `--json` document and export line: a JSON Schema
per command in ``schemas/cli/``, snake_case keys, ``*_usd`` decimal strings, and every time in
RFC 3339 UTC with ``Z`` to the microsecond."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from mcpbill_cli import Verifier
from tests.cli.conftest import Invoke, ok_json

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "schemas" / "cli"
SNAKE_CASE = re.compile(r"^[a-z][a-z0-9_]*$")
USD = re.compile(r"^\d+\.\d{2,6}$")
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
LOOKS_LIKE_A_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}")


def assert_contract(command: tuple[str, ...], data: Any) -> None:
    """``data`` of ``mcpbill COMMAND --json`` matches its schema and the conventions."""
    assert_schema("-".join(command), data)
    assert_conventions(data)


def assert_export_lines(schema: str, path: Path) -> None:
    """Every JSON line of an export file matches ``schema`` and the conventions."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines, f"{path} is empty: nothing was checked"
    for line in lines:
        assert_schema(schema, line)
        assert_conventions(line)


def assert_schema(name: str, data: Any) -> None:
    path = SCHEMAS / f"{name}.json"
    assert path.is_file(), f"no schema for `{name}`: document its data in {path.relative_to(ROOT)}"
    schema = json.loads(path.read_text())
    Draft202012Validator.check_schema(schema)
    error = best_match(Draft202012Validator(schema).iter_errors(data))
    assert error is None, (f"{path.relative_to(ROOT)}: {error.message} at "
                           f"{'/'.join(map(str, error.absolute_path))}")


def assert_conventions(value: Any, path: tuple[str, ...] = ()) -> None:
    """Walk every object: field names snake_case, ``*_usd`` decimal strings, ``*_at`` and every
    value that looks like a time in the one RFC 3339 form."""
    where = "/".join(path) or "data"
    if isinstance(value, dict):
        for key, item in value.items():
            if not _keyed_by_data(path):
                _assert_field(key, item, where)
            assert_conventions(item, (*path, str(key)))
    elif isinstance(value, list):
        for item in value:
            assert_conventions(item, path)
    elif isinstance(value, str) and LOOKS_LIKE_A_TIME.match(value):
        assert TIMESTAMP.match(value), f"{where}: {value!r} is not RFC 3339 Z to the microsecond"


def _assert_field(key: str, item: Any, where: str) -> None:
    assert SNAKE_CASE.match(key), f"{where}: field {key!r} is not snake_case"
    if key.endswith("_usd"):
        assert item is None or (isinstance(item, str) and USD.match(item)), (
            f"{where}/{key}: {item!r} is not a decimal string")
    if key.endswith("_at"):
        assert item is None or (isinstance(item, str) and TIMESTAMP.match(item)), (
            f"{where}/{key}: {item!r} is not RFC 3339 Z to the microsecond")


def _keyed_by_data(path: tuple[str, ...]) -> bool:
    """Objects whose keys are data, not field names: refusals by error code, the demo's
    prices by tool, reconcile's totals by tenant, agent, tool or jti."""
    return path[-1:] in (("refusals",), ("tools",)) or path[-2:-1] == ("totals",)


def add_activity(cli: Invoke) -> None:
    """A second tenant with a parent and a child token, paid calls, a revocation that cascades
    and a token that expires at once: lists, totals, revocations and sweeps are not empty."""
    ok_json(cli("wallet", "fund", "--tenant", "acme", "--demo", "5", "--json"))
    parent = ok_json(cli("token", "issue", "--tenant", "acme", "--agent", "crawler", "--limit",
                         "1", "--scope", "search", "--json"))
    ok_json(cli("token", "issue", "--parent", parent["jti"], "--agent", "helper", "--limit",
                "0.2", "--json"))
    ok_json(cli("token", "issue", "--tenant", "acme", "--limit", "0.1", "--ttl", "1s",
                "--json"))
    verifier = Verifier.from_settings()
    try:
        verifier.charge(parent["token"], "search", idempotency_key="activity-1")
        verifier.charge(parent["token"], "search", args={"page": 2})
    finally:
        verifier.close()
    ok_json(cli("revoke", parent["jti"], "--reason", "rotated", "--json"))

"""Names: a blank one is refused everywhere a name is taken, and a tenant the ledger never
funded is NOT_FOUND (exit 4) in every command that addresses one tenant."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli.conftest import Invoke, error_json, ok_json, tree_snapshot
from tests.cli.test_bad_input import ledger_snapshot

# Each command line with "{}" where a name goes.
TAKES_A_NAME = [
    ("wallet", "fund", "--tenant", "{}", "--demo", "1"),
    ("wallet", "balance", "--tenant", "{}"),
    ("token", "issue", "--limit", "1", "--tenant", "{}"),
    ("token", "issue", "--limit", "1", "--agent", "{}"),
    ("token", "issue", "--limit", "1", "--scope", "{}"),
    ("token", "issue", "--limit", "1", "--parent", "{}"),
    ("token", "list", "--tenant", "{}"),
    ("token", "list", "--agent", "{}"),
    ("token", "show", "{}"),
    ("revoke", "{}"),
    ("revoke", "--tenant", "{}", "--yes"),
    ("revoke", "--agent", "{}", "--yes"),
    ("reconcile", "--tenant", "{}"),
    ("reconcile", "--tool", "{}"),
    ("receipt", "show", "{}"),
    ("receipt", "show", "some-key", "--tenant", "{}"),
    ("pricing", "set", "{}", "0.1"),
    ("pricing", "set", "search", "0.1", "--tenant", "{}"),
    ("pricing", "unset", "{}"),
    ("pricing", "quote", "{}"),
    ("keys", "retire", "{}"),
]


@pytest.fixture
def funded(ledger_cli: Invoke) -> Invoke:
    ok_json(ledger_cli("wallet", "fund", "--tenant", "acme", "--demo", "5", "--json"))
    ok_json(ledger_cli("token", "issue", "--tenant", "acme", "--limit", "1", "--json"))
    return ledger_cli


def test_a_blank_name_is_refused_everywhere(funded: Invoke, isolated_home: Path,
                                            db_url: str) -> None:
    files, ledger = tree_snapshot(isolated_home), ledger_snapshot(db_url)
    for args in TAKES_A_NAME:
        for blank in ("", "   "):
            result = funded(*(a.format(blank) for a in args), "--json")
            assert result.exit_code == 3, (args, result.output)
            assert "empty" in error_json(result, "INVALID_INPUT")["message"]
    as_text = funded("wallet", "fund", "--tenant", "", "--demo", "1")
    assert as_text.exit_code == 3 and "tenant given is empty" in as_text.stderr
    assert tree_snapshot(isolated_home) == files and ledger_snapshot(db_url) == ledger
    assert [t["tenant"] for t in ok_json(funded("tenant", "list", "--json"))] == ["acme"]


@pytest.mark.parametrize("args", [
    ("wallet", "balance", "--tenant", "nobody"),
    ("token", "issue", "--limit", "1", "--tenant", "nobody"),
    ("token", "list", "--tenant", "nobody"),
    ("revoke", "--tenant", "nobody", "--yes"),
    ("reconcile", "--tenant", "nobody"),
])
def test_an_unknown_tenant_is_not_found_in_every_command(
        funded: Invoke, isolated_home: Path, db_url: str, args: tuple[str, ...]) -> None:
    files, ledger = tree_snapshot(isolated_home), ledger_snapshot(db_url)
    result = funded(*args, "--json")
    assert result.exit_code == 4, result.output
    error = error_json(result, "NOT_FOUND")
    assert error["tenant"] == "nobody" and "wallet fund" in error["message"]
    assert tree_snapshot(isolated_home) == files and ledger_snapshot(db_url) == ledger


def test_a_known_tenant_still_works(funded: Invoke) -> None:
    assert len(ok_json(funded("token", "list", "--tenant", "acme", "--json"))) == 1
    assert ok_json(funded("reconcile", "--tenant", "acme", "--json"))["errors"] == 0
    assert len(ok_json(funded("revoke", "--tenant", "acme", "--yes", "--json"))["revoked"]) == 1

"""`mcpbill revoke`: an agent is revoked within one tenant, and a dry run states the money a
revoke would move, without moving it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from mcpbill_cli import Verifier
from mcpbill_cli.ledger.engine import make_engine, reading
from tests.cli.conftest import Invoke, error_json, ok_json
from tests.cli.data_contract import assert_contract
from tests.cli.test_bad_input import ledger_snapshot
from tests.verifier.invariants import assert_ledger_invariants


def _issue(cli: Invoke, *args: str) -> dict[str, Any]:
    return dict(ok_json(cli("token", "issue", *args, "--json")))


def _active(cli: Invoke, tenant: str) -> list[str]:
    listed = ok_json(cli("token", "list", "--tenant", tenant, "--status", "active", "--json"))
    return sorted(t["jti"] for t in listed)


def _moved(document: dict[str, Any]) -> list[tuple[str, str, str | None, bool]]:
    return [(r["jti"], r["released_usd"], r["cascaded_from"], r["already_revoked"])
            for r in document["revoked"]]


@pytest.fixture
def same_agent_in_two_tenants(ledger_cli: Invoke) -> Iterator[tuple[Invoke, str, str]]:
    """Agent `crawler` has one token in the tenant default and one in acme."""
    for tenant in ("default", "acme"):
        ok_json(ledger_cli("wallet", "fund", "--tenant", tenant, "--demo", "5", "--json"))
    in_default = _issue(ledger_cli, "--limit", "1", "--agent", "crawler")["jti"]
    in_acme = _issue(ledger_cli, "--limit", "1", "--agent", "crawler", "--tenant", "acme")["jti"]
    yield ledger_cli, in_default, in_acme


def test_a_dry_run_states_what_the_revoke_then_releases(ledger_cli: Invoke,
                                                        db_url: str) -> None:
    """Past bug: a dry run showed "released_usd": "0.00" for every token, while the revoke
    returned each unspent, unheld remainder. Here one call is charged and one is held."""
    cli = ledger_cli
    ok_json(cli("wallet", "fund", "--tenant", "acme", "--demo", "10", "--json"))
    parent = _issue(cli, "--tenant", "acme", "--agent", "crawler", "--limit", "2")
    child = _issue(cli, "--agent", "helper", "--limit", "0.5", "--parent", parent["jti"])
    verifier = Verifier.from_settings()
    try:
        spent = verifier.hold(parent["token"], "search", amount=50_000, idempotency_key="a")
        verifier.capture(spent)
        verifier.hold(parent["token"], "search", amount=50_000, idempotency_key="b")
    finally:
        verifier.close()
    before = ledger_snapshot(db_url)
    balance = ok_json(cli("wallet", "balance", "--tenant", "acme", "--json"))

    dry = ok_json(cli("revoke", "--tenant", "acme", "--agent", "crawler", "--dry-run",
                      "--json"))
    assert_contract(("revoke",), dry)
    # 2.00 less the child's 0.50, 0.05 spent and 0.05 held; the child's 0.50 to the tenant
    assert _moved(dry) == [(parent["jti"], "1.40", None, False),
                           (child["jti"], "0.50", parent["jti"], False)]
    assert ledger_snapshot(db_url) == before
    assert ok_json(cli("wallet", "balance", "--tenant", "acme", "--json")) == balance
    assert _active(cli, "acme") == sorted([parent["jti"], child["jti"]])

    done = ok_json(cli("revoke", "--tenant", "acme", "--agent", "crawler", "--yes", "--json"))
    assert _moved(done) == _moved(dry)
    assert not done["dry_run"] and dry["dry_run"]
    after = ok_json(cli("wallet", "balance", "--tenant", "acme", "--json"))
    assert (balance["available_usd"], after["available_usd"]) == ("8.00", "9.90")
    engine = make_engine(db_url)
    try:
        with reading(engine) as conn:
            assert_ledger_invariants(conn)
    finally:
        engine.dispose()


def test_a_dry_run_of_tokens_named_by_jti_states_their_remainders(ledger_cli: Invoke) -> None:
    ok_json(ledger_cli("wallet", "fund", "--demo", "5", "--json"))
    issued = _issue(ledger_cli, "--limit", "1.25")
    dry = ok_json(ledger_cli("revoke", issued["jti"], "--dry-run", "--json"))
    assert _moved(dry) == [(issued["jti"], "1.25", None, False)]
    assert (dry["tenant"], dry["agent"]) == (None, None)
    assert _moved(ok_json(ledger_cli("revoke", issued["jti"], "--json"))) == _moved(dry)
    again = ok_json(ledger_cli("revoke", issued["jti"], "--dry-run", "--json"))
    assert _moved(again) == [(issued["jti"], "0.00", None, True)]


def test_tenant_and_agent_revoke_the_agent_in_that_tenant_only(
        same_agent_in_two_tenants: tuple[Invoke, str, str]) -> None:
    """Past bug: `revoke --agent A` revoked agent A's tokens in every tenant, and
    `--tenant T --agent A` was refused (exit 3)."""
    cli, in_default, in_acme = same_agent_in_two_tenants
    done = ok_json(cli("revoke", "--tenant", "acme", "--agent", "crawler", "--yes", "--json"))
    assert_contract(("revoke",), done)
    assert (done["tenant"], done["agent"]) == ("acme", "crawler")
    assert [(r["jti"], r["tenant"], r["agent"]) for r in done["revoked"]] == [
        (in_acme, "acme", "crawler")]
    assert _active(cli, "acme") == []
    assert _active(cli, "default") == [in_default]


def test_agent_alone_is_the_agent_of_the_default_tenant(
        same_agent_in_two_tenants: tuple[Invoke, str, str]) -> None:
    cli, in_default, in_acme = same_agent_in_two_tenants
    done = cli("revoke", "--agent", "crawler", "--yes", "--json")
    data = ok_json(done)
    assert _active(cli, "acme") == [in_acme]
    assert _active(cli, "default") == []
    assert [r["jti"] for r in data["revoked"]] == [in_default]
    assert (data["tenant"], data["agent"]) == ("default", "crawler")
    assert "crawler also has active tokens in tenant(s) acme" in done.stderr


def test_the_prompt_and_the_output_name_the_tenant(
        same_agent_in_two_tenants: tuple[Invoke, str, str], db_url: str) -> None:
    cli, _, in_acme = same_agent_in_two_tenants
    before = ledger_snapshot(db_url)
    asked = cli("revoke", "--tenant", "acme", "--agent", "crawler", "--json")
    assert asked.exit_code == 25, asked.output
    message = error_json(asked, "CONFIRMATION_REQUIRED")["message"]
    assert "Revoke 1 active token(s) of agent crawler in tenant acme" in message
    assert ledger_snapshot(db_url) == before
    told = cli("revoke", "--tenant", "acme", "--agent", "crawler", "--yes")
    assert told.exit_code == 0, told.output
    assert told.stderr.startswith(f"revoked {in_acme} (agent crawler, tenant acme), returned "
                                  "1.00 USDC")
    nothing = cli("revoke", "--tenant", "acme", "--agent", "crawler", "--yes")
    assert "no active tokens of agent crawler in tenant acme" in nothing.stderr


def test_agent_in_a_tenant_never_funded_is_not_found(ledger_cli: Invoke, db_url: str) -> None:
    ok_json(ledger_cli("wallet", "fund", "--tenant", "acme", "--demo", "5", "--json"))
    _issue(ledger_cli, "--tenant", "acme", "--agent", "crawler", "--limit", "1")
    before = ledger_snapshot(db_url)
    for args in (("--agent", "crawler"), ("--tenant", "nobody", "--agent", "crawler")):
        result = ledger_cli("revoke", *args, "--yes", "--json")
        assert result.exit_code == 4, result.output
        assert error_json(result, "NOT_FOUND")["tenant"] in ("default", "nobody")
    assert ledger_snapshot(db_url) == before


@pytest.mark.parametrize("args", [(), ("tok_x", "--tenant", "acme"), ("tok_x", "--agent", "a")])
def test_tokens_and_a_selection_are_not_both_named(ledger_cli: Invoke,
                                                   args: tuple[str, ...]) -> None:
    result = ledger_cli("revoke", *args, "--yes", "--json")
    assert result.exit_code == 3, result.output
    assert "--agent A" in error_json(result, "INVALID_INPUT")["message"]

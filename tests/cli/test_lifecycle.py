"""The whole token lifecycle from the shell, on SQLite and on PostgreSQL."""

from __future__ import annotations

from tests.cli.conftest import Invoke, ok_json


def test_init_fund_issue_child_revoke_cascade_returns_credit(ledger_cli: Invoke) -> None:
    cli = ledger_cli
    funded = ok_json(cli("wallet", "fund", "--demo", "10", "--json"))
    assert funded["amount_usd"] == "10.00" and funded["available_usd"] == "10.00"

    token = cli("token", "issue", "--limit", "5", "--ttl", "24h")
    assert token.exit_code == 0, token.output
    jwt_text = token.stdout.strip()
    assert jwt_text.count(".") == 2 and "\n" not in jwt_text  # only the JWT on stdout

    inspected = ok_json(cli("token", "inspect", jwt_text, "--json"))
    jti = inspected["jti"]
    assert inspected["limit_usd"] == "5.00" and inspected["status"] == "active"

    balance = ok_json(cli("wallet", "balance", "--json"))
    assert (balance["available_usd"], balance["allotted_usd"]) == ("5.00", "5.00")

    child = ok_json(cli("token", "issue", "--limit", "1.5", "--parent", jti, "--scope",
                        "search", "--agent", "sub-agent", "--json"))
    assert child["parent"] == jti and child["scope"] == ["search"]
    parent_view = ok_json(cli("token", "show", jti, "--json"))
    assert parent_view["remaining_usd"] == "3.50"
    assert parent_view["children"] == [child["jti"]]

    revoked = ok_json(cli("revoke", jti, "--reason", "done", "--json"))
    assert [(r["jti"], r["cascaded_from"]) for r in revoked["revoked"]] == [
        (jti, None), (child["jti"], jti)]
    assert sorted(r["released_usd"] for r in revoked["revoked"]) == ["1.50", "3.50"]

    balance = ok_json(cli("wallet", "balance", "--json"))
    assert balance == {"tenant": "default", "funded_usd": "10.00", "allotted_usd": "0.00",
                       "held_usd": "0.00", "spent_usd": "0.00", "available_usd": "10.00"}
    assert ok_json(cli("token", "show", child["jti"], "--json"))["status"] == "revoked"

    again = ok_json(cli("revoke", jti, "--json"))
    assert [r["already_revoked"] for r in again["revoked"]] == [True, True]
    assert cli("token", "inspect", jwt_text).exit_code == 6


def test_child_token_cannot_widen_scope_or_outlive_parent(ledger_cli: Invoke) -> None:
    cli = ledger_cli
    ok_json(cli("wallet", "fund", "--demo", "3", "--json"))
    parent = ok_json(cli("token", "issue", "--limit", "2", "--ttl", "1h", "--scope", "db.*",
                         "--json"))
    wider = cli("token", "issue", "--limit", "1", "--parent", parent["jti"], "--scope", "*")
    assert wider.exit_code == 3, wider.output
    child = ok_json(cli("token", "issue", "--limit", "1", "--ttl", "24h", "--parent",
                        parent["jti"], "--scope", "db.read", "--json"))
    assert child["expires_at"] == parent["expires_at"]
    too_much = cli("token", "issue", "--limit", "1.01", "--parent", parent["jti"])
    assert too_much.exit_code == 5, too_much.output


def test_revoke_by_agent_and_sweep_of_expired(ledger_cli: Invoke) -> None:
    cli = ledger_cli
    ok_json(cli("wallet", "fund", "--tenant", "acme", "--demo", "4", "--json"))
    for agent in ("crawler", "crawler", "writer"):
        ok_json(cli("token", "issue", "--tenant", "acme", "--agent", agent, "--limit", "1",
                    "--json"))
    dry = ok_json(cli("revoke", "--tenant", "acme", "--agent", "crawler", "--dry-run",
                      "--json"))
    assert dry["dry_run"] and len(dry["revoked"]) == 2
    assert len(ok_json(cli("token", "list", "--status", "active", "--json"))) == 3
    done = ok_json(cli("revoke", "--tenant", "acme", "--agent", "crawler", "--yes", "--json"))
    assert [r["released_usd"] for r in done["revoked"]] == ["1.00", "1.00"]
    listed = ok_json(cli("token", "list", "--tenant", "acme", "--status", "revoked", "--json"))
    assert {t["agent"] for t in listed} == {"crawler"}
    exported = ok_json(cli("revocations", "export", "--json"))
    assert sorted(r["jti"] for r in exported["revoked"]) == sorted(t["jti"] for t in listed)
    assert ok_json(cli("wallet", "balance", "--tenant", "acme", "--json"))[
        "available_usd"] == "3.00"

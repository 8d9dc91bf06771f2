"""`token list --tenant/--agent/--expiring/--sort/--limit`: finding the tokens that matter."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.cli.conftest import Invoke, error_json, ok_json

Lister = Callable[..., list[str]]


@pytest.fixture
def tokens(ledger_cli: Invoke) -> dict[str, str]:
    """Four tokens: two tenants, two agents, lifetimes 30m to 20h, one revoked. They may be
    issued within one second (JWT times are whole seconds), so no test relies on that order."""
    for tenant in ("default", "acme"):
        ok_json(ledger_cli("wallet", "fund", "--tenant", tenant, "--demo", "20", "--json"))
    made = {}
    for name, tenant, agent, limit, ttl in [("a", "default", "bot", "3", "30m"),
                                            ("b", "default", "crawler", "1", "20h"),
                                            ("c", "acme", "bot", "2", "90m"),
                                            ("d", "default", "bot", "4", "45m")]:
        made[name] = ok_json(ledger_cli("token", "issue", "--tenant", tenant, "--agent", agent,
                                        "--limit", limit, "--ttl", ttl, "--json"))["jti"]
    ok_json(ledger_cli("revoke", made["d"], "--json"))
    return made


@pytest.fixture
def listed(ledger_cli: Invoke, tokens: dict[str, str]) -> Lister:
    """The names of the tokens ``token list ARGS`` prints, in its order."""
    names = {jti: name for name, jti in tokens.items()}

    def run(*args: str) -> list[str]:
        return [names[t["jti"]] for t in ok_json(ledger_cli("token", "list", *args, "--json"))]

    return run


def test_filters_by_tenant_and_agent(listed: Lister) -> None:
    assert listed("--tenant", "acme") == ["c"]
    assert sorted(listed("--agent", "bot")) == ["a", "c", "d"]
    assert listed("--tenant", "default", "--agent", "bot", "--sort", "limit") == ["a", "d"]


def test_expiring_keeps_active_tokens_expiring_within_the_window(listed: Lister) -> None:
    assert listed("--expiring", "1h") == ["a"]
    assert listed("--expiring", "2h", "--sort", "expires") == ["a", "c"]
    assert sorted(listed("--expiring", "999999999d")) == ["a", "b", "c"]


def test_sort_by_any_field_either_way(listed: Lister) -> None:
    assert listed("--sort", "-limit") == ["d", "a", "c", "b"]
    assert listed("--sort", "expires") == ["a", "d", "c", "b"]
    assert listed("--sort", "tenant")[0] == "c"
    assert listed("--sort", "-remaining") == ["a", "c", "b", "d"]


def test_limit_cuts_the_sorted_list(listed: Lister) -> None:
    assert listed("--sort", "-limit", "--limit", "2") == ["d", "a"]
    assert sorted(listed("--limit", "10")) == ["a", "b", "c", "d"]


@pytest.mark.parametrize(("args", "code"), [
    (("--sort", "price"), 3), (("--expiring", "soon"), 3), (("--limit", "0"), 2),
    (("--limit", "9" * 5001), 2),
])
def test_bad_values_are_refused(ledger_cli: Invoke, tokens: dict[str, str],
                                args: tuple[str, ...], code: int) -> None:
    result = ledger_cli("token", "list", *args, "--json")
    assert result.exit_code == code, result.output
    if code == 3:
        error_json(result, "INVALID_INPUT")

"""`say`: talk on stderr, styled by Rich on a terminal, plain and unwrapped elsewhere."""

from __future__ import annotations

import json

from tests.cli.conftest import Invoke, ok_json


def test_talk_in_a_pipe_is_plain_one_line_each(ledger_cli: Invoke) -> None:
    ledger_cli("wallet", "fund", "--demo", "10")
    parent = ok_json(ledger_cli("token", "issue", "--limit", "1", "--json"))
    agent = "agent-" + "x" * 120  # longer than the 80 columns the tests set
    result = ledger_cli("token", "issue", "--limit", "0.5", "--parent", parent["jti"],
                        "--tenant", "other", "--agent", agent)
    assert result.exit_code == 0, result.output
    issued, note = result.stderr.splitlines()  # "[yellow]note[/]": the markup is gone
    assert note == "note: a child token belongs to its parent's tenant default"
    assert issued.startswith("issued tok_") and f"for {agent} (default)" in issued
    listed = json.loads(ledger_cli("token", "list", "--json").stdout)["data"]
    assert agent in [token["agent"] for token in listed]

"""``[webhooks] deliver = true`` in config.toml: a server built from the home delivers alert
webhooks by itself, with no ``mcpbill webhooks deliver`` running; anything else there is a
CONFIG_INVALID that names the key."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mcpbill_cli.config import load_settings
from mcpbill_cli.errors import ConfigInvalid
from mcpbill_cli.verifier import Verifier
from tests.cli.conftest import Invoke, ok_json
from tests.webhooks.conftest import Receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver.running() as server:
        yield server


def _configure(home: Path, text: str) -> None:
    config = home / "config.toml"
    config.write_text(config.read_text() + text)


def test_a_server_from_the_home_delivers_when_configured(
        ledger_cli: Invoke, receiver: Receiver) -> None:
    home = load_settings().home
    _configure(home, "\n[webhooks]\ndeliver = true\n")
    assert ok_json(ledger_cli("config", "show", "--json"))["deliver_webhooks"] == "true"
    added = ok_json(ledger_cli("webhooks", "add", receiver.url, "--events", "token.threshold",
                               "--json"))
    receiver.secret = added["secret"]
    ok_json(ledger_cli("wallet", "fund", "--demo", "1", "--json"))
    token = ok_json(ledger_cli("token", "issue", "--limit", "0.004", "--json"))["token"]
    verifier = Verifier.from_settings()
    try:
        verifier.charge(token, "search", args={"n": 1})  # 0.002 of 0.004: under 80%
        verifier.charge(token, "search", args={"n": 2})  # all of it: 80% and 100% crossed
        receiver.wait_for(1, timeout=15)
    finally:
        verifier.close()
    assert {event["type"] for event in receiver.received} == {"token.threshold"}


def test_without_it_a_server_delivers_nothing(ledger_cli: Invoke) -> None:
    assert ok_json(ledger_cli("config", "show", "--json"))["deliver_webhooks"] == "false"
    verifier = Verifier.from_settings()
    try:
        assert verifier._deliverer is None
    finally:
        verifier.close()


@pytest.mark.parametrize("text", ['deliver = "yes"', "deliver = 1", "send = true"])
def test_a_bad_webhooks_table_is_config_invalid(ledger_cli: Invoke, text: str) -> None:
    _configure(load_settings().home, f"\n[webhooks]\n{text}\n")
    with pytest.raises(ConfigInvalid) as refused:
        load_settings()
    assert "[webhooks]" in refused.value.message
    result = ledger_cli("config", "show", "--json")
    assert result.exit_code == 10, result.output

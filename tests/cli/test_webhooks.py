"""`mcpbill webhooks ...` through the CLI: the secret is shown by `add` only, never by list,
deliveries or the deliverer's log; `test` reaches a real receiver that verifies the
signature; refusals have their codes and change nothing."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from mcpbill_cli.ledger.engine import sqlite_file
from tests.cli.conftest import Invoke, error_json, ok_json
from tests.cli.data_contract import assert_contract
from tests.webhooks.conftest import Receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver.running() as server:
        yield server


def add(cli: Invoke, url: str, *events: str) -> dict[str, str]:
    args = ["--events", ",".join(events)] if events else []
    data = ok_json(cli("webhooks", "add", url, *args, "--json"))
    assert_contract(("webhooks", "add"), data)
    return dict(data)


def test_add_shows_the_secret_once_and_never_again(ledger_cli: Invoke, receiver: Receiver,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="mcpbill")
    endpoint = add(ledger_cli, receiver.url, "refund.created", "webhook.test")
    secret = endpoint["secret"]
    assert secret.startswith("whsec_") and endpoint["event_types"] == ["refund.created",
                                                                       "webhook.test"]
    receiver.secret = secret
    listed = ledger_cli("webhooks", "list", "--json")
    assert_contract(("webhooks", "list"), ok_json(listed))
    assert ok_json(listed)[0]["id"] == endpoint["id"]
    tested = ledger_cli("webhooks", "test", endpoint["id"], "--json")
    assert_contract(("webhooks", "test"), ok_json(tested))
    assert ok_json(tested)["http_status"] == 200
    [got] = receiver.received  # verified with the secret by the standardwebhooks verifier
    assert got["type"] == "webhook.test" and got["data"] == {"endpoint_id": endpoint["id"]}
    deliveries = ok_json(ledger_cli("webhooks", "deliveries", endpoint["id"], "--json"))
    assert_contract(("webhooks", "deliveries"), deliveries)
    assert [(d["event_id"], d["status"], d["attempts"]) for d in deliveries] == [
        (got["id"], "delivered", 1)]
    for result in (listed, tested, ledger_cli("webhooks", "list"),
                   ledger_cli("webhooks", "deliveries"), ledger_cli("webhooks", "test",
                                                                    endpoint["id"])):
        assert secret not in result.stdout + result.stderr
    assert secret not in caplog.text


def test_a_url_with_credentials_is_printed_masked_and_delivered_to_whole(
        ledger_cli: Invoke, receiver: Receiver) -> None:
    url = receiver.url.replace("http://", "http://ops:hunter2@") + "?token=abc123&team=ops"
    endpoint = add(ledger_cli, url, "webhook.test")
    receiver.secret = endpoint["secret"]
    printed = [ledger_cli("webhooks", "list", "--json"), ledger_cli("webhooks", "list")]
    assert ok_json(printed[0])[0]["url"] == endpoint["url"]
    for text in (endpoint["url"], *(result.stdout for result in printed)):
        assert "hunter2" not in text and "abc123" not in text
        assert f"ops:***@127.0.0.1:{receiver.port}/hooks?token=***&team=ops" in text
    tested = ok_json(ledger_cli("webhooks", "test", endpoint["id"], "--json"))
    assert tested["http_status"] == 200 and len(receiver.received) == 1  # the URL as given


def test_add_in_a_terminal_prints_only_the_secret_on_stdout(ledger_cli: Invoke,
                                                            db_url: str) -> None:
    result = ledger_cli("webhooks", "add", "https://ops.example.com/hooks")
    assert result.exit_code == 0, result.output
    ledger = sqlite_file(db_url)
    if ledger is not None:  # the SQLite ledger holds the secret now: owner only
        assert ledger.stat().st_mode & 0o777 == 0o600
    assert result.stdout.strip().startswith("whsec_") and len(result.stdout.split()) == 1
    assert "shown this once" in result.stderr


def test_a_failed_test_delivery_exits_31_and_stays_pending(ledger_cli: Invoke) -> None:
    down = Receiver()  # never started
    endpoint = add(ledger_cli, down.url)
    result = ledger_cli("webhooks", "test", endpoint["id"], "--json")
    assert result.exit_code == 31, result.output
    error = error_json(result, "WEBHOOK_FAILED")
    [delivery] = ok_json(ledger_cli("webhooks", "deliveries", "--json"))
    assert (delivery["event_id"], delivery["status"]) == (error["event_id"], "pending")
    assert delivery["last_status"] is None and delivery["last_error"]


@pytest.mark.parametrize(("args", "code", "status"), [
    (("webhooks", "add", "ftp://example.com/x"), "INVALID_INPUT", 3),
    (("webhooks", "add", "http://127.0.0.1:abc/hook"), "INVALID_INPUT", 3),
    (("webhooks", "add", "http://127.0.0.1:70000/hook"), "INVALID_INPUT", 3),
    (("webhooks", "add", "http://[::1/hook"), "INVALID_INPUT", 3),
    (("webhooks", "add", "https://example.com/x", "--events", "refund.made"), "INVALID_INPUT", 3),
    (("webhooks", "remove", "whep_nope"), "NOT_FOUND", 4),
    (("webhooks", "test", "whep_nope"), "NOT_FOUND", 4),
    (("webhooks", "deliveries", "whep_nope"), "NOT_FOUND", 4),
    (("webhooks", "balance-alert", "nobody", "--below", "1"), "NOT_FOUND", 4),
    (("webhooks", "balance-alert", "default"), "INVALID_INPUT", 3),
])
def test_refusals_have_codes_and_change_nothing(ledger_cli: Invoke, args: tuple[str, ...],
                                                code: str, status: int) -> None:
    ok_json(ledger_cli("wallet", "fund", "--demo", "1", "--json"))
    result = ledger_cli(*args, "--json")
    assert result.exit_code == status, result.output
    error_json(result, code)
    assert ok_json(ledger_cli("webhooks", "list", "--json")) == []
    assert ok_json(ledger_cli("webhooks", "deliveries", "--json")) == []


def test_remove_drops_pending_deliveries(ledger_cli: Invoke) -> None:
    endpoint = add(ledger_cli, "http://127.0.0.1:9/hooks")
    ledger_cli("webhooks", "test", endpoint["id"])
    data = ok_json(ledger_cli("webhooks", "remove", endpoint["id"], "--json"))
    assert data == {"id": endpoint["id"], "removed": True, "pending_dropped": 1}
    assert ok_json(ledger_cli("webhooks", "deliveries", "--json")) == []
    assert json.loads(ledger_cli("webhooks", "list", "--json").stdout)["data"] == []


def test_a_tenant_under_its_balance_alert_is_told_once_per_crossing(ledger_cli: Invoke,
                                                            receiver: Receiver) -> None:
    receiver.secret = add(ledger_cli, receiver.url, "tenant.balance_low")["secret"]
    ok_json(ledger_cli("wallet", "fund", "--demo", "10", "--json"))
    data = ok_json(ledger_cli("webhooks", "balance-alert", "default", "--below", "5", "--json"))
    assert_contract(("webhooks", "balance-alert"), data)
    assert data == {"tenant": "default", "below_usd": "5.00"}
    jti = ok_json(ledger_cli("token", "issue", "--limit", "4", "--json"))["jti"]  # 10 -> 6
    ok_json(ledger_cli("token", "topup", jti, "--amount", "2", "--json"))  # 6 -> 4: under 5
    ok_json(ledger_cli("token", "issue", "--limit", "1", "--json"))  # 4 -> 3: no new crossing
    done = ok_json(ledger_cli("webhooks", "deliver", "--once", "--json"))
    assert_contract(("webhooks", "deliver"), done)
    assert done["delivered"] == 1
    [got] = receiver.received
    assert got["data"] == {"tenant": "default", "available_usd": "4.00", "below_usd": "5.00"}
    ok_json(ledger_cli("wallet", "fund", "--demo", "10", "--json"))  # 3 -> 13
    ok_json(ledger_cli("token", "issue", "--limit", "9", "--json"))  # 13 -> 4: crosses again
    assert ok_json(ledger_cli("webhooks", "deliver", "--once", "--json"))["delivered"] == 1
    assert [r["data"]["available_usd"] for r in receiver.received] == ["4.00", "4.00"]

"""On PostgreSQL the CLI decides by the database server's clock, not this host's.

The database's clock cannot be skewed from here, but the CLI's can: each command runs as a
subprocess under libfaketime (``LD_PRELOAD``), which moves every wall-clock reading the process
makes a day forward or back while PostgreSQL's ``clock_timestamp()`` stays where it is. A CLI
that read the host's clock would then call a live token expired, retire a key still in use,
miss a stale hold, reconcile the wrong day and hold back webhooks that are due.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import libfaketime
import pytest
from sqlalchemy import text

from mcpbill_cli.ledger.engine import make_engine
from mcpbill_cli.verifier import Verifier
from tests.cli.conftest import Invoke, ok_json
from tests.webhooks.conftest import Receiver

pytestmark = pytest.mark.parametrize("db_url", ["postgres"], indirect=True)


def skewed_env(shift: str) -> dict[str, str]:
    """The environment of a process whose wall clock is ``shift`` (``+1d``) off this one's."""
    _, preload = libfaketime.get_reload_information()
    return {**os.environ, **preload, "FAKETIME": shift}


def skewed(shift: str, *args: str) -> Any:
    """``mcpbill ARGS --json`` under a wall clock ``shift`` off: its JSON envelope."""
    done = subprocess.run([sys.executable, "-m", "mcpbill_cli", *args, "--json"],
                          env=skewed_env(shift),
                          capture_output=True, text=True, timeout=120, check=False)
    assert "Traceback" not in done.stderr, done.stderr
    return json.loads(done.stdout)


def database_now(db_url: str) -> datetime:
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT clock_timestamp()")).scalar_one().astimezone(UTC)
    finally:
        engine.dispose()


def wait_for_a_stale_hold(db_url: str) -> None:
    """Until a hold is past its timeout by the database's clock."""
    engine = make_engine(db_url)
    try:
        for _ in range(300):
            with engine.connect() as conn:
                if conn.execute(text(STALE_HOLDS)).scalar_one():
                    return
            time.sleep(0.2)
    finally:
        engine.dispose()
    pytest.fail("no hold went past its timeout")


STALE_HOLDS = ("SELECT count(*) FROM transfers WHERE kind = 'pending' AND status = 'pending' "
               "AND timeout_at <= clock_timestamp()")


def test_the_skew_is_real(ledger_cli: Invoke, db_url: str) -> None:
    """The subprocess's own clock is a day ahead: what the tests below rely on."""
    done = subprocess.run([sys.executable, "-c", "import time; print(time.time())"],
                          env=skewed_env("+1d"),
                          capture_output=True, text=True, timeout=60, check=True)
    ahead = float(done.stdout) - database_now(db_url).timestamp()
    assert timedelta(hours=23) < timedelta(seconds=ahead) < timedelta(hours=25)


@pytest.mark.parametrize("shift", ["+1d", "-1d"])
def test_a_token_live_by_the_database_is_shown_live(ledger_cli: Invoke, shift: str) -> None:
    """An hour-long token: a day past its expiry by the skewed host, not yet valid by the
    other skew; live by the database's clock, which is the one that decides."""
    ok_json(ledger_cli("wallet", "fund", "--demo", "10", "--json"))
    token = ok_json(ledger_cli("token", "issue", "--limit", "1", "--ttl", "1h",
                               "--json"))["token"]
    shown = skewed(shift, "token", "inspect", token)
    assert shown["status"] == "ok", shown
    assert shown["data"]["status"] == "active"
    listed = skewed(shift, "tenant", "list")["data"]
    assert [t["active_tokens"] for t in listed] == [1], listed


def test_reconcile_follows_the_database_days_and_stale_holds(ledger_cli: Invoke,
                                                             db_url: str) -> None:
    """A hold past its timeout by the database's clock is stale to reconcile with the host a
    day behind; the default window is the database's yesterday whichever way the host is off."""
    ok_json(ledger_cli("wallet", "fund", "--demo", "10", "--json"))
    token = ok_json(ledger_cli("token", "issue", "--limit", "1", "--json"))["token"]
    verifier = Verifier.from_settings(hold_timeout=1)
    try:
        verifier.hold(token, "search")
    finally:
        verifier.close()  # and with it the keeper that would extend the hold
    wait_for_a_stale_hold(db_url)
    yesterday = database_now(db_url).date() - timedelta(days=1)
    for shift in ("+1d", "-1d"):
        report = skewed(shift, "reconcile")
        data = report["data"]
        assert data["window"]["start"].startswith(yesterday.isoformat()), data["window"]
        stale = [f for f in data["findings"] if f["name"] == "hold_past_timeout"]
        assert [f["count"] for f in stale] == [1], data["findings"]


def test_a_key_signing_a_token_live_by_the_database_is_not_retired(ledger_cli: Invoke) -> None:
    """With the host a day on, the old key's hour-long token is still live by the database's
    clock, so retiring the key is refused as it would be on time."""
    ok_json(ledger_cli("wallet", "fund", "--demo", "10", "--json"))
    old = ok_json(ledger_cli("token", "issue", "--limit", "1", "--ttl", "1h", "--json"))
    ok_json(ledger_cli("keys", "rotate", "--json"))
    refused = skewed("+1d", "keys", "retire", old["kid"])
    assert [e["code"] for e in refused["errors"]] == ["INVALID_INPUT"], refused
    assert "1 unexpired token(s)" in refused["errors"][0]["message"]


def test_webhooks_due_by_the_database_are_delivered(ledger_cli: Invoke) -> None:
    """An event stamped by the database's clock is due to a deliverer whose host is a day
    behind: it goes out on the first pass, not a day later."""
    with Receiver.running() as receiver:
        added = ok_json(ledger_cli("webhooks", "add", receiver.url, "--events",
                                   "tenant.balance_low", "--json"))
        receiver.secret = added["secret"]
        ok_json(ledger_cli("wallet", "fund", "--demo", "10", "--json"))
        ok_json(ledger_cli("webhooks", "balance-alert", "default", "--below", "5", "--json"))
        ok_json(ledger_cli("token", "issue", "--limit", "6", "--json"))  # 10 -> 4: under 5
        done = skewed("-1d", "webhooks", "deliver", "--once")
        assert done["data"]["delivered"] == 1, done
        [got] = receiver.received
    assert got["type"] == "tenant.balance_low"

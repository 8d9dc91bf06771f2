"""A server SIGKILLed in the middle of an x402 settlement: the next servers to start on the same
home resolve what it left by themselves, exactly once, with no operator action.

The dying server is a real process (``tests/x402/crash_server.py``): ``Billing.from_settings()``
on a live home that settles from its keystore on anvil, paid through the official MCP client.
The survivors are two replicas built the same way in this process; config.toml shortens
``[x402] recover_after`` and ``recover_interval`` to a second so the test need not wait
minutes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from eth_account import Account
from eth_account.signers.local import LocalAccount
from sqlalchemy import Engine, func, select
from web3 import Web3

from mcpbill_cli.config import Settings, load_settings
from mcpbill_cli.ledger import invariants
from mcpbill_cli.ledger.engine import reading
from mcpbill_cli.ledger.models import calls, deposits, x402_payments
from mcpbill_cli.mcp import Billing
from mcpbill_cli.pricing import Price
from mcpbill_cli.verifier import Hold
from mcpbill_cli.wallet.keystore import ENV_KEYSTORE_PASSWORD, create_keystore, keystore_path
from mcpbill_cli.x402.offers import Terms
from mcpbill_cli.x402.recovery import recovery_times

from .accepting import SEARCH_PRICE, balance, new_payer, signed_payment
from .conftest import Peer
from .peer import NETWORK
from .test_accept_settings import PASSWORD, live_home

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def home(isolated_home: Path, db_url: str, peer: Peer, fuji_anvil: str,
         monkeypatch: pytest.MonkeyPatch) -> Settings:
    """A live home accepting x402 on anvil, settling from a funded keystore, recovering after
    a second and looking every second."""
    pay_to = Account.create().address.lower()
    settings = live_home(isolated_home, db_url, peer, fuji_anvil, deposit_address=pay_to)
    operator = create_keystore(keystore_path(settings.keys_dir), PASSWORD, iterations=2)
    w3 = peer.devnet.w3
    w3.eth.wait_for_transaction_receipt(w3.eth.send_transaction(
        {"from": peer.devnet.deployer, "to": Web3.to_checksum_address(operator),
         "value": 10**19}))
    config = tomllib.loads(settings.config_path.read_text())
    config["x402"] = {"recover_after": "1s", "recover_interval": "1s"}
    settings.config_path.write_text(tomli_w.dumps(config))
    monkeypatch.setenv(ENV_KEYSTORE_PASSWORD, PASSWORD)
    return load_settings(home=isolated_home, db_url=db_url)


def terms_of(settings: Settings, peer: Peer) -> Terms:
    chain = peer.devnet.chain
    pay_to = str(tomllib.loads(settings.config_path.read_text())["wallet"]["deposit_address"])
    return Terms(NETWORK, chain.usdc, pay_to, chain.eip712_name, chain.eip712_version, 60)


def crash(settings: Settings, hook: str, payment: dict[str, Any], tmp_path: Path) -> None:
    """Run the crash server until it SIGKILLs itself at ``hook``."""
    payment_file = tmp_path / "payment.json"
    payment_file.write_text(json.dumps(payment))
    log = tmp_path / "crash.log"
    with log.open("w") as errors:
        process = subprocess.run(
            [sys.executable, "-m", "tests.x402.crash_server", str(settings.home),
             settings.db_url, hook, str(payment_file)],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=errors, stderr=errors, timeout=120,
            env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    assert process.returncode == -signal.SIGKILL, log.read_text()


@pytest.fixture
def replicas(home: Settings) -> Iterator[Callable[[], list[Billing]]]:
    """``start()``: two servers on the home, as an operator starts them after the crash."""
    started: list[Billing] = []

    def start() -> list[Billing]:
        started.extend(Billing.from_settings(home) for _ in range(2))
        assert all(b.acceptor is not None and b.acceptor.recovery is not None for b in started)
        return started

    yield start
    for billing in started:
        assert billing.acceptor is not None
        billing.acceptor.close()
        billing.verifier.close()


def statuses(engine: Engine) -> list[str]:
    with reading(engine) as conn:
        return [row.status for row in conn.execute(select(x402_payments))]


def count(engine: Engine, query: Any) -> int:
    with reading(engine) as conn:
        return int(conn.execute(query).scalar_one())


def wait_for(engine: Engine, status: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while statuses(engine) != [status]:
        assert time.monotonic() < deadline, f"still {statuses(engine)}, not [{status!r}]"
        time.sleep(0.2)


def captured(engine: Engine) -> int:
    return count(engine, select(func.count()).select_from(calls).where(
        calls.c.status == "captured"))


def test_a_server_killed_after_settling_is_recorded_once_by_the_next_ones(
        home: Settings, peer: Peer, engine: Engine, tmp_path: Path,
        replicas: Callable[[], list[Billing]]) -> None:
    terms = terms_of(home, peer)
    payer: LocalAccount = new_payer(peer.devnet)
    crash(home, "settled", signed_payment(payer, terms, amount=SEARCH_PRICE), tmp_path)
    assert statuses(engine) == ["reserved"] and captured(engine) == 0
    assert balance(peer.devnet, terms.pay_to) == SEARCH_PRICE  # the USDC did move

    replicas()
    wait_for(engine, "settled")
    time.sleep(2.5)  # more turns of both replicas: nothing is booked twice

    assert statuses(engine) == ["settled"] and captured(engine) == 1
    assert count(engine, select(func.count()).select_from(deposits)) == 1
    assert balance(peer.devnet, terms.pay_to) == SEARCH_PRICE
    with reading(engine) as conn:
        assert invariants.check(conn) == []


def test_a_server_killed_before_settling_is_released_once_it_can_no_longer_settle(
        home: Settings, peer: Peer, engine: Engine, tmp_path: Path,
        replicas: Callable[[], list[Billing]]) -> None:
    terms = terms_of(home, peer)
    payer: LocalAccount = new_payer(peer.devnet)
    valid_before = int(time.time()) + 12  # short, so the test sees it lapse
    payment = signed_payment(payer, terms, amount=SEARCH_PRICE, valid_before=valid_before)
    crash(home, "settling", payment, tmp_path)
    assert statuses(engine) == ["reserved"]

    replicas()
    time.sleep(1.5)
    if time.time() < valid_before:
        assert statuses(engine) == ["reserved"]  # it could still settle: left alone
    wait_for(engine, "released", timeout=valid_before - time.time() + 15)

    assert captured(engine) == 0 and balance(peer.devnet, terms.pay_to) == 0
    assert balance(peer.devnet, payer.address) == 1_000_000
    with reading(engine) as conn:
        assert invariants.check(conn) == []


def test_closing_the_verifier_stops_every_thread_it_and_its_acceptor_started(
        home: Settings) -> None:
    """A server that closes only its verifier (as ``mcpbill proxy`` does) leaves no thread
    of billing's running: the acceptor's recovery stops with the sealer, the hold keeper and
    the webhook deliverer; a second close does nothing."""
    config = tomllib.loads(home.config_path.read_text())
    home.config_path.write_text(tomli_w.dumps({**config, "webhooks": {"deliver": True}}))
    before = set(threading.enumerate())
    billing = Billing.from_settings(load_settings(home=home.home, db_url=home.db_url))
    assert billing.acceptor is not None and billing.acceptor.recovery is not None
    billing.verifier.keep_alive(Hold(  # its keeper's thread starts with the first hold kept
        "kept-by-this-test", "jti", "acme", "agent", "search", SEARCH_PRICE, "key",
        datetime.now(UTC) + timedelta(minutes=5), Price(SEARCH_PRICE, "search", 1)))
    started = {thread.name for thread in set(threading.enumerate()) - before}
    assert {"mcpbill-x402-recovery", "mcpbill-sealer", "mcpbill-hold-keeper",
            "mcpbill-webhooks"} <= started
    billing.verifier.close()
    billing.verifier.close()
    assert [thread.name for thread in set(threading.enumerate()) - before] == []


def test_recovery_times_come_from_config_and_refuse_words() -> None:
    assert recovery_times({}) == (120, 30.0)
    assert recovery_times({"x402": {"recover_after": "5m", "recover_interval": "10s"}}) == (
        300, 10.0)
    from mcpbill_cli.errors import ConfigInvalid

    with pytest.raises(ConfigInvalid, match="recover_after"):
        recovery_times({"x402": {"recover_after": "soon"}})

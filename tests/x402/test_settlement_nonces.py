"""Replicas sharing one keystore settle at the same moment from one operator account: both
read the same transaction nonce, the node refuses the second transaction, and that replica
reads the nonce again and resends. Two processes on anvil, each settling its own payment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select
from web3 import Web3

from mcpbill_cli.config import Settings
from mcpbill_cli.ledger.engine import reading
from mcpbill_cli.ledger.models import x402_payments
from mcpbill_cli.wallet.keystore import keystore_address, keystore_path

from .accepting import SEARCH_PRICE, balance, new_payer, signed_payment
from .conftest import Peer
from .test_recovery import home, terms_of  # noqa: F401 - the live home settling by itself

ROOT = Path(__file__).resolve().parents[2]
RACERS = 2


def race(settings: Settings, payments: list[dict[str, Any]], tmp_path: Path
         ) -> tuple[list[dict[str, Any]], str]:
    """Run one settling process per payment, all sending at once; their answers and logs."""
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    processes, outs = [], []
    log = tmp_path / "racers.log"
    with log.open("w") as errors:
        for n, payment in enumerate(payments):
            (tmp_path / f"payment-{n}.json").write_text(json.dumps(payment))
            outs.append(tmp_path / f"out-{n}.json")
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "tests.x402.settle_race", str(settings.home),
                 settings.db_url, str(tmp_path / f"payment-{n}.json"), str(barrier),
                 str(len(payments)), str(outs[-1])],
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=errors, stderr=errors,
                env={**os.environ, "PYTHONPATH": str(ROOT)}))
        for process in processes:
            assert process.wait(120) == 0, log.read_text()
    return [json.loads(out.read_text()) for out in outs], log.read_text()


def test_two_replicas_settling_at_once_from_one_account_both_settle(
        home: Settings, peer: Peer, engine: Engine, tmp_path: Path) -> None:  # noqa: F811
    terms = terms_of(home, peer)
    operator = Web3.to_checksum_address(keystore_address(keystore_path(home.keys_dir)))
    w3 = peer.devnet.w3
    nonce_before = w3.eth.get_transaction_count(operator)
    payments = [signed_payment(new_payer(peer.devnet), terms, amount=SEARCH_PRICE)
                for _ in range(RACERS)]

    answers, log = race(home, payments, tmp_path)

    assert all("transaction" in answer for answer in answers), (answers, log)
    assert "was taken by another sender; retrying" in log  # the race did happen
    assert len({answer["transaction"] for answer in answers}) == RACERS
    assert w3.eth.get_transaction_count(operator) == nonce_before + RACERS
    assert balance(peer.devnet, terms.pay_to) == RACERS * SEARCH_PRICE
    with reading(engine) as conn:
        rows = list(conn.execute(select(x402_payments)))
    assert sorted(row.status for row in rows) == ["settled"] * RACERS
    assert {row.tx_hash for row in rows} == {answer["transaction"] for answer in answers}

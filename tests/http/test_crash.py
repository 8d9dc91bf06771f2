"""A server killed halfway through a billed request: nothing is billed, nothing is lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from sqlalchemy import Engine

from mcpbill_cli.http import IDEMPOTENCY_KEY_HEADER, RECEIPT_HEADER, TOKEN_HEADER
from mcpbill_cli.keys import KeySource
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.verifier import Verifier
from tests.verifier.billing_support import PRICE, PRICING_DOC, FakeClock
from tests.wallet.devnet import free_port

from .conftest import Endpoints, Mint, Switch, assert_ledger_sound, build_app, view

ROOT = Path(__file__).resolve().parents[2]


def _wait_for(path: Path, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, "the server process exited"
        assert time.monotonic() < deadline, f"{path.name} did not appear"
        time.sleep(0.05)


def test_a_server_killed_mid_request_bills_nothing_and_the_retry_is_answered(
        db_url: str, engine: Engine, keys_dir: Path, new_token: Mint, tmp_path: Path,
        served: tuple[Switch, str]) -> None:
    token = new_token()
    port, marker = free_port(), tmp_path / "entered"
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.http.crash_server", db_url, str(keys_dir), str(port),
         str(marker)], cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    failures: list[BaseException] = []

    def call() -> None:
        deadline = time.monotonic() + 30
        while True:  # the server may still be starting
            try:
                httpx.get(f"http://127.0.0.1:{port}/hang", timeout=60, headers={
                    TOKEN_HEADER: token.token, IDEMPOTENCY_KEY_HEADER: "crash-1"})
                return
            except httpx.ConnectError as exc:
                if marker.exists() or time.monotonic() > deadline:
                    failures.append(exc)
                    return
                time.sleep(0.1)
            except httpx.HTTPError as exc:
                failures.append(exc)
                return

    caller = threading.Thread(target=call)
    caller.start()
    try:
        _wait_for(marker, process)
        assert view(engine, token).held == PRICE  # the call is open: its price is held
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        caller.join(30)
    assert failures, "the client got no answer from a killed server"

    later = FakeClock()
    later.advance(600)  # past the hold's timeout (300 s): nobody keeps it alive any more
    survivor = Verifier(keys=KeySource(directory=keys_dir),
                        pricing=PricingTable.from_document(PRICING_DOC), engine=engine,
                        clock=later)
    switch, url = served
    endpoints = Endpoints()
    switch.app = build_app(survivor, endpoints)
    try:
        assert survivor.sweep_expired() == 1
        state = view(engine, token)
        assert (state.spent, state.held) == (0, 0)
        retried = httpx.get(f"{url}/hang", headers={
            TOKEN_HEADER: token.token, IDEMPOTENCY_KEY_HEADER: "crash-1"})
        fresh = httpx.get(f"{url}/report", headers={
            TOKEN_HEADER: token.token, IDEMPOTENCY_KEY_HEADER: "crash-2"})
    finally:
        switch.app = None
        survivor.close()
    assert retried.status_code == 409, retried.text  # that key's call failed, and stays so
    assert retried.json()["code"] == "CALL_FAILED"
    assert fresh.status_code == 200 and RECEIPT_HEADER in fresh.headers
    assert endpoints.runs["hang"] == 0 and endpoints.runs["report"] == 1
    assert view(engine, token).spent == PRICE
    assert_ledger_sound(engine)

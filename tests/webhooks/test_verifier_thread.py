"""A verifier built with ``deliver_webhooks`` delivers alert events from a thread of its own
process; the paid call that caused one never waits for the receiver."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Engine

from mcpbill_cli.keys import KeySource
from mcpbill_cli.ledger.credit import IssuedToken
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.verifier import Verifier
from tests.verifier.billing_support import FakeClock

from .conftest import PRICING, Receiver, add_endpoint


def test_the_call_does_not_wait_and_the_thread_delivers(
        funded: Engine, keys_dir: Path, clock: FakeClock, receiver: Receiver,
        new_token: Callable[..., IssuedToken]) -> None:
    _, receiver.secret = add_endpoint(funded, receiver.url, ["token.threshold"])
    receiver.delay = 2.0  # a slow receiver
    verifier = Verifier(keys=KeySource(directory=keys_dir), engine=funded, clock=clock,
                        pricing=PricingTable.from_document(PRICING), deliver_webhooks=True)
    try:
        token = new_token(limit=250_000).token  # one 0.2 call is 80%
        started = time.monotonic()
        verifier.charge(token, "search")
        assert time.monotonic() - started < 1.5
        [event_id] = receiver.wait_for(1, timeout=15)
    finally:
        verifier.close()
    assert receiver.received[0]["data"]["percent"] == 80 and event_id.startswith("evt_")

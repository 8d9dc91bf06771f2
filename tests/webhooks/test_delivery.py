"""Delivery: signed as Standard Webhooks (checked by the ``standardwebhooks`` verifier in a
real HTTP receiver), retried with backoff while the receiver is down, at least once and never
by two deliverers at the same time, surviving a deliverer killed mid-delivery."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime

from sqlalchemy import Engine

from mcpbill_cli.clock import utcnow
from mcpbill_cli.ledger import outbox
from mcpbill_cli.ledger.engine import reading, writing
from mcpbill_cli.webhooks import Deliverer

from .conftest import Receiver, add_endpoint


def emit_refunds(engine: Engine, count: int) -> list[str]:
    ids = []
    for n in range(count):
        with writing(engine) as conn:
            event_id = outbox.emit(conn, "refund.created", {"refund_id": f"rfnd_{n}"},
                                   at=datetime.now(UTC))
        assert event_id is not None
        ids.append(event_id)
    return ids


def statuses(engine: Engine) -> Counter[str]:
    with reading(engine) as conn:
        return Counter(d.status for d in outbox.deliveries(conn, limit=1000))


def test_a_delivery_is_signed_and_carries_the_event(engine: Engine, receiver: Receiver) -> None:
    _, receiver.secret = add_endpoint(engine, receiver.url)
    [event_id] = emit_refunds(engine, 1)
    [attempt] = Deliverer(engine, utcnow).deliver_due()
    assert (attempt.outcome, attempt.status) == ("delivered", 200)
    assert receiver.rejected == []
    [got] = receiver.received
    assert got["id"] == event_id and got["type"] == "refund.created"
    assert got["data"] == {"refund_id": "rfnd_0"}
    assert Deliverer(engine, utcnow).deliver_due() == []  # nothing left to send


def test_a_wrong_secret_fails_verification_and_is_retried(engine: Engine,
                                                          receiver: Receiver) -> None:
    add_endpoint(engine, receiver.url)
    receiver.secret = outbox.new_secret()  # not the endpoint's
    emit_refunds(engine, 1)
    [attempt] = Deliverer(engine, utcnow).deliver_due()
    assert (attempt.outcome, attempt.status) == ("retry", 400)
    assert receiver.rejected == ["No matching signature found"]


def test_only_endpoints_listening_to_a_type_get_it(engine: Engine, receiver: Receiver) -> None:
    _, receiver.secret = add_endpoint(engine, receiver.url, ["cap.reached"])
    emit_refunds(engine, 2)
    assert Deliverer(engine, utcnow).deliver_due() == []
    assert receiver.received == []


def test_a_receiver_down_then_back_gets_every_event_once(engine: Engine) -> None:
    receiver = Receiver()  # not started: connections are refused
    _, receiver.secret = add_endpoint(engine, receiver.url)
    ids = emit_refunds(engine, 6)
    deliverer = Deliverer(engine, utcnow, backoff=0.05, timeout=2)
    assert {a.outcome for a in deliverer.deliver_due()} == {"retry"}
    assert {a.outcome for a in deliverer.deliver_due()} <= {"retry"}  # backoff: maybe none due
    receiver.start()
    try:
        deadline = time.monotonic() + 20
        while statuses(engine)["delivered"] < 6 and time.monotonic() < deadline:
            deliverer.deliver_due()
            time.sleep(0.05)
    finally:
        receiver.stop()
    assert sorted(receiver.ids) == sorted(ids)  # each id exactly once, none lost
    with reading(engine) as conn:
        assert all(d.attempts >= 2 for d in outbox.deliveries(conn))


def test_5xx_is_retried_with_growing_jittered_backoff(engine: Engine,
                                                      receiver: Receiver) -> None:
    _, receiver.secret = add_endpoint(engine, receiver.url)
    receiver.statuses = [503, 500]
    [event_id] = emit_refunds(engine, 1)
    deliverer = Deliverer(engine, utcnow, backoff=0.05)
    outcomes = []
    while not outcomes or outcomes[-1] != "delivered":
        outcomes += [a.outcome for a in deliverer.deliver_due()]
        time.sleep(0.02)
    assert outcomes == ["retry", "retry", "delivered"]
    assert receiver.ids == [event_id]
    delays = [Deliverer(engine, utcnow, backoff=1).retry_delay(n) for n in (1, 2, 3, 30)]
    assert 0.5 <= delays[0] <= 1 and 1 <= delays[1] <= 2 and 2 <= delays[2] <= 4
    assert 1800 <= delays[3] <= 3600


def test_an_endpoint_whose_url_cannot_be_used_fails_alone(engine: Engine,
                                                         receiver: Receiver) -> None:
    """An endpoint kept with a URL httpx cannot send to (a port that is not a number, as an
    older `webhooks add` took): its delivery fails and is retried like any other; the other
    endpoints' are delivered, and the deliverer goes on."""
    _, receiver.secret = add_endpoint(engine, receiver.url)
    add_endpoint(engine, "http://127.0.0.1:abc/hook")
    emit_refunds(engine, 2)
    attempts = Deliverer(engine, utcnow).deliver_due()
    assert Counter(a.outcome for a in attempts) == Counter({"delivered": 2, "retry": 2})
    assert len(receiver.received) == 2
    with reading(engine) as conn:
        failed = [d for d in outbox.deliveries(conn, limit=10) if d.status != "delivered"]
    assert len(failed) == 2 and all("abc" in (d.last_error or "") for d in failed)


def test_a_delivery_past_its_attempts_is_failed(engine: Engine) -> None:
    receiver = Receiver()  # never started
    _, receiver.secret = add_endpoint(engine, receiver.url)
    emit_refunds(engine, 1)
    deliverer = Deliverer(engine, utcnow, backoff=0.01, max_attempts=3)
    outcomes: list[str] = []
    while "failed" not in outcomes:
        outcomes += [a.outcome for a in deliverer.deliver_due()]
        time.sleep(0.02)
    assert outcomes == ["retry", "retry", "failed"]
    assert statuses(engine) == Counter({"failed": 1})


def test_two_deliverers_never_send_one_event_twice(engine: Engine, receiver: Receiver) -> None:
    _, receiver.secret = add_endpoint(engine, receiver.url)
    receiver.delay = 0.02
    ids = emit_refunds(engine, 20)
    threads = [threading.Thread(target=Deliverer(engine, utcnow).deliver_due) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(receiver.ids) == sorted(ids)
    assert statuses(engine) == Counter({"delivered": 20})


def test_a_deliverer_killed_mid_delivery_loses_nothing(engine: Engine, receiver: Receiver,
                                                       db_url: str, tmp_path: str) -> None:
    _, receiver.secret = add_endpoint(engine, receiver.url)
    receiver.delay = 0.3
    ids = emit_refunds(engine, 8)
    env = {**os.environ, "MCPBILL_DB_URL": db_url}
    command = [sys.executable, "-m", "mcpbill_cli", "webhooks", "deliver", "--interval",
               "0.1", "--timeout", "1", "--backoff", "0.1"]
    first = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    receiver.wait_for(2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert 2 <= len(set(receiver.ids)) < 8, receiver.ids
    second = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    try:  # what the killed one had in flight comes due again when its lease (3 s) ends
        deadline = time.monotonic() + 30
        while statuses(engine)["delivered"] < 8 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        second.send_signal(signal.SIGINT)
        _, stderr = second.communicate(timeout=20)
    assert set(receiver.ids) == set(ids)  # at least once, none lost
    assert statuses(engine) == Counter({"delivered": 8})
    assert receiver.secret not in stderr

"""A billed HTTP endpoint whose SQLite ledger sits on a real filesystem filled to its last
byte: 503 with LEDGER_FULL and ``Retry-After``, and 200 again once there is room, from the
same app and verifier."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest
from sqlalchemy import Engine

from mcpbill_cli.http import IDEMPOTENCY_KEY_HEADER, TOKEN_HEADER
from mcpbill_cli.ledger.credit import IssuedToken
from mcpbill_cli.ledger.engine import make_engine
from mcpbill_cli.ledger.schema import upgrade
from tests.faults.small_disk import SmallDisk, small_disk_in_temp
from tests.verifier.billing_support import USDC

from .conftest import Endpoints, assert_ledger_sound

MAX_REQUESTS = 2000  # a full disk refuses long before this many paid requests


@pytest.fixture
def disk() -> Iterator[SmallDisk]:
    with small_disk_in_temp("16m") as mounted:
        yield mounted


@pytest.fixture
def engine(disk: SmallDisk) -> Iterator[Engine]:
    """This module's ledger: a migrated SQLite file on the small disk."""
    ledger = make_engine(f"sqlite:///{disk.mount / 'ledger.db'}")
    upgrade(ledger)
    yield ledger
    ledger.dispose()


def test_a_full_ledger_disk_is_503_ledger_full_then_200_with_room(
        client: httpx.Client, disk: SmallDisk, engine: Engine, endpoints: Endpoints,
        new_token: Callable[..., IssuedToken]) -> None:
    token = new_token(limit=50 * USDC).token

    def paid(n: int) -> dict[str, str]:
        return {TOKEN_HEADER: token, IDEMPOTENCY_KEY_HEADER: f"report-{n}"}

    assert client.get("/report", headers=paid(0)).status_code == 200
    disk.fill()
    for n in range(1, MAX_REQUESTS):
        response = client.get("/report", headers=paid(n))
        if response.status_code != 200:
            break
    assert response.status_code == 503, response.text
    assert response.json()["code"] == "LEDGER_FULL"
    assert set(response.json()) == {"code", "message"}
    assert str(disk.mount) not in response.text  # the ledger's file is the operator's
    assert response.headers["retry-after"] == "1"
    assert_ledger_sound(engine)

    disk.free()
    again = client.get("/report", headers=paid(MAX_REQUESTS))
    assert again.status_code == 200, again.text
    assert again.json()["run"] == endpoints.runs["report"]  # it ran for this request
    assert_ledger_sound(engine)

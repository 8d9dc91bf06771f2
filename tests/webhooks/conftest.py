"""Fixtures for webhooks: a real HTTP receiver that verifies Standard Webhooks signatures, a
funded ledger, tokens and a verifier (on SQLite and PostgreSQL through ``engine``)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from standardwebhooks import Webhook

from mcpbill_cli.keys import KeyRing, KeySource, init_keyring
from mcpbill_cli.ledger import outbox
from mcpbill_cli.ledger.credit import IssuedToken
from mcpbill_cli.ledger.engine import writing
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.verifier import Verifier
from tests.verifier.billing_support import FakeClock, fund, mint

USDC = 1_000_000
PRICING = {"version": 1, "tools": {"search": {"price": "0.2"}},
           "tenants": {"capped": {"daily_cap": "0.4"}}}


class Receiver:
    """An HTTP server on 127.0.0.1 that verifies each request with the endpoint's secret (the
    ``standardwebhooks`` verifier) and keeps what it got. ``statuses`` answers requests in
    turn (then 200); ``delay`` seconds pass before each answer. ``stop()`` and ``start()``
    take it down and bring it back on the same port."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.secret: str | None = None
        self.received: list[dict[str, Any]] = []
        self.rejected: list[str] = []
        self.statuses: list[int] = []
        self.delay = 0.0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    @property
    def ids(self) -> list[str]:
        with self._lock:
            return [r["id"] for r in self.received]

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["content-length"]))
                time.sleep(receiver.delay)
                status = receiver.take(body, dict(self.headers))
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def take(self, body: bytes, headers: dict[str, str]) -> int:
        assert self.secret is not None
        try:
            event = Webhook(self.secret).verify(body, headers)
        except Exception as exc:  # noqa: BLE001 - a bad signature is what is recorded
            with self._lock:
                self.rejected.append(str(exc))
            return 400
        with self._lock:
            status = self.statuses.pop(0) if self.statuses else 200
            if status == 200:
                self.received.append({"id": headers["webhook-id"], **event})
        return status

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @classmethod
    @contextmanager
    def running(cls) -> Iterator[Receiver]:
        server = cls()
        server.start()
        try:
            yield server
        finally:
            server.stop()

    def wait_for(self, count: int, timeout: float = 20) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(set(self.ids)) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.ids


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver.running() as server:
        yield server


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime.now(UTC))


@pytest.fixture
def keys_dir(tmp_path: Path, clock: FakeClock) -> Path:
    directory = tmp_path / "keys"
    init_keyring(directory, "EdDSA", now=clock(), force=False).save()
    return directory


@pytest.fixture
def funded(engine: Engine, clock: FakeClock) -> Engine:
    fund(engine, "acme", 100 * USDC, now=clock())
    fund(engine, "capped", 100 * USDC, now=clock())
    return engine


@pytest.fixture
def new_token(funded: Engine, keys_dir: Path, clock: FakeClock) -> Callable[..., IssuedToken]:
    def make(**options: Any) -> IssuedToken:
        return mint(funded, KeyRing.load(keys_dir), now=clock(), **options)

    return make


@pytest.fixture
def verifier(funded: Engine, keys_dir: Path, clock: FakeClock) -> Iterator[Verifier]:
    verifier = Verifier(keys=KeySource(directory=keys_dir), engine=funded, clock=clock,
                        pricing=PricingTable.from_document(PRICING))
    yield verifier
    verifier.close()


def add_endpoint(engine: Engine, url: str, types: list[str] | None = None) -> tuple[str, str]:
    """(endpoint id, secret) of a new endpoint listening to ``types`` (all by default)."""
    with writing(engine) as conn:
        endpoint, secret = outbox.add_endpoint(conn, url, types or ["*"],
                                               at=datetime.now(UTC))
    return endpoint.id, secret


def emitted(engine: Engine, type: str | None = None) -> list[dict[str, Any]]:
    """The outbox's events (of ``type``) as {"id", "type", "data"}, oldest first."""
    from sqlalchemy import select

    from mcpbill_cli.ledger.engine import reading
    from mcpbill_cli.ledger.models import webhook_events as e

    with reading(engine) as conn:
        rows = conn.execute(select(e.c.id, e.c.payload).order_by(e.c.created_at, e.c.id)).all()
    events = [{"id": row.id, **json.loads(row.payload)} for row in rows]
    return [ev for ev in events if type is None or ev["type"] == type]

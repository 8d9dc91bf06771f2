"""Shared pieces of the verifier tests: a clock the test moves, the pricing table, token minting.

Kept out of conftest.py so that spawned worker processes (``billing_workers``) can import them.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine

from mcpbill_cli.keys import KeyRing
from mcpbill_cli.ledger.credit import IssuedToken, IssueRequest, fund_demo, issue
from mcpbill_cli.ledger.engine import writing

PRICE = 10_000  # search: 0.01 USDC
USDC = 1_000_000

PRICING_DOC: dict[str, Any] = {
    "version": 1,
    "default_price": "0.01",
    "tools": {
        "search": {"price": "0.01"},
        "translate": {"price": "0.05"},
        "status": {"price": "0"},
        "summarize": {"price_per_unit": "0.00001", "max_price": "0.50"},
    },
    "free_tiers": {"patterns": ["read.*"]},
}


class FakeClock:
    """A tz-aware UTC clock that only moves when the test says so."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = (start or datetime.now(UTC)).replace(microsecond=0)
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        with self._lock:
            self.now += timedelta(seconds=seconds)
        return self.now


def fund(engine: Engine, tenant: str, amount: int, *, now: datetime) -> None:
    with writing(engine) as conn:
        fund_demo(conn, tenant, amount, now=now)


def mint(engine: Engine, ring: KeyRing, *, now: datetime, tenant: str = "acme",
         agent: str = "agent-1", limit: int = USDC, ttl: int = 3600,
         scope: list[str] | None = None, audience: str = "mcpbill", issuer: str = "mcpbill",
         parent: str | None = None) -> IssuedToken:
    """Issue a credit token on the ledger (the tenant must be funded)."""
    request = IssueRequest(tenant=tenant, agent=agent, limit=limit, ttl=ttl, scope=scope,
                           audience=audience, issuer=issuer, parent=parent)
    with writing(engine) as conn:
        return issue(conn, request, signer=ring.signing_key(), ttl_cap=86400, now=now)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_json(value: Any) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def unb64url(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def jwt_parts(token: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(header, payload, signature segment) of a compact JWS, unverified."""
    head, body, signature = token.split(".")
    return json.loads(unb64url(head)), json.loads(unb64url(body)), signature


def run_threads(count: int, work: Callable[[], Any] | Callable[[int], Any], *,
                indexed: bool = False, timeout: float = 120) -> list[Any]:
    """Run ``work`` in ``count`` threads released together; their results, or raise the first.

    With ``indexed``, ``work`` gets the thread's index.
    """
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            barrier.wait(30)
            results[index] = work(index) if indexed else work()  # type: ignore[call-arg]
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    if errors:
        raise errors[0]
    return results

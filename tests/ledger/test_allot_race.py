"""8 threads racing to allot more than a tenant holds never over-allot (both backends)."""

from __future__ import annotations

import threading
from pathlib import Path

from sqlalchemy import Engine

from mcpbill_cli.clock import utcnow
from mcpbill_cli.errors import InsufficientFunds
from mcpbill_cli.keys import init_keyring
from mcpbill_cli.ledger import credit, invariants
from mcpbill_cli.ledger.engine import reading, writing


def test_eight_threads_never_over_allot(engine: Engine, tmp_path: Path) -> None:
    ring = init_keyring(tmp_path / "keys", "EdDSA", now=utcnow(), force=False)
    signer = ring.signing_key()
    with writing(engine) as conn:
        credit.fund_demo(conn, "acme", 10_000_000, now=utcnow())  # room for exactly 10 tokens
    request = credit.IssueRequest(tenant="acme", agent="a", limit=1_000_000, ttl=600,
                                  scope=None, audience="mcpbill", issuer="mcpbill")
    barrier = threading.Barrier(8)
    issued: list[str] = []
    refused: list[int] = []

    def worker() -> None:
        barrier.wait()
        for _ in range(4):
            try:
                with writing(engine) as conn:
                    token = credit.issue(conn, request, signer=signer, ttl_cap=86400,
                                         now=utcnow())
                issued.append(token.claims.jti)
            except InsufficientFunds:
                refused.append(1)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert (len(issued), len(refused)) == (10, 22)
    with reading(engine) as conn:
        balance = credit.tenant_balance(conn, "acme")
        assert (balance.available, balance.allotted) == (0, 10_000_000)
        assert invariants.check(conn) == []
        assert len(credit.list_views(conn, now=utcnow(), tenant="acme")) == 10

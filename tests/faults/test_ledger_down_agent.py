"""The operator's PostgreSQL stops while an MCP server bills calls, as the agent meets it: the
paid call is LEDGER_UNAVAILABLE, nothing billed, and the answer names nothing of the operator's
database (its URL, host, port, name, and the driver's own words are the operator's: they go to
the server's log). Once the database is back, the same call goes through."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import anyio
import pytest
from fastmcp import Client as FastMCPClient
from fastmcp import FastMCP
from fastmcp.exceptions import ToolError
from mcp.client import Client
from mcp_types import CallToolResult

from mcpbill_cli.clock import utcnow
from mcpbill_cli.config import Settings, load_settings
from mcpbill_cli.errors import LedgerUnavailable
from mcpbill_cli.keys import KeyRing
from mcpbill_cli.ledger import credit
from mcpbill_cli.ledger.engine import make_engine, writing
from mcpbill_cli.ledger.schema import upgrade
from mcpbill_cli.mcp import IDEMPOTENCY_KEY_META, TOKEN_META, Billing
from mcpbill_cli.mcp.fastmcp import BillingMiddleware
from mcpbill_cli.setup import initialize
from mcpbill_cli.verifier import Verifier
from tests.mcp.conftest import load_example, receipt_of, refusal_of

from .scratch_postgres import ScratchPostgres


def on_the_cluster(cluster: ScratchPostgres, home: Path) -> tuple[Settings, str]:
    """A demo home whose ledger is ``cluster``, a paid tool ``breaks`` priced beside the
    example's, and a credit token of tenant acme."""
    settings = load_settings(home=home, db_url=cluster.url, mode="demo")
    initialize(settings, alg="EdDSA", mode="demo", force=False)
    engine = make_engine(cluster.url)
    upgrade(engine)
    with writing(engine) as conn:
        credit.fund_demo(conn, "acme", 1_000_000, now=utcnow())
        token = credit.issue(conn, credit.IssueRequest(
            tenant="acme", agent="agent-1", limit=100_000, ttl=3600, scope=None,
            audience=settings.audience, issuer=settings.issuer, demo=True),
            signer=KeyRing.load(settings.keys_dir).signing_key(), ttl_cap=settings.ttl_cap,
            now=utcnow()).token
    engine.dispose()
    settings.pricing_path.write_text(settings.pricing_path.read_text()
                                     + '\n[tools.breaks]\nprice = "0.001"\n')
    return settings, token


def statuses(cluster: ScratchPostgres) -> list[str]:
    engine = make_engine(cluster.url)
    try:
        with engine.connect() as conn:
            return sorted(conn.exec_driver_sql("SELECT status FROM calls").scalars())
    finally:
        engine.dispose()


def test_a_ledger_that_goes_down_is_retryable_and_tells_the_agent_nothing_of_it(
        cluster: ScratchPostgres, isolated_home: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    settings, token = on_the_cluster(cluster, isolated_home)
    verifier = Verifier.from_settings(settings)
    billing = Billing(verifier)
    server = load_example().build_server(billing)

    @billing.tool(server)
    def breaks(q: str) -> str:
        """Held while the ledger was up; the ledger goes down while it runs, then it fails."""
        cluster.stop()
        raise RuntimeError(f"no answer to {q}")
    caplog.set_level(logging.WARNING, logger="mcpbill")

    async def calls() -> list[CallToolResult]:
        results = []
        async with Client(server) as client:
            for n, down in enumerate((False, True, False)):
                if down:
                    cluster.stop()  # demo mode: a crash could take back the last commits
                results.append(await client.call_tool(
                    "search", {"q": "usdc"},
                    meta={TOKEN_META: token, IDEMPOTENCY_KEY_META: f"call-{n}"}))
                if down:
                    cluster.start()
            # Held, then the tool fails while the ledger is down: its void cannot be written.
            results.append(await client.call_tool("breaks", {"q": "usdc"},
                                                  meta={TOKEN_META: token}))
            cluster.start()
        return results

    try:
        before, during, after, broken = anyio.run(calls)
    finally:
        verifier.close()
    receipt_of(before)
    refused = refusal_of(during)
    assert refused["code"] == "LEDGER_UNAVAILABLE"
    for wire in (during.model_dump_json(), broken.model_dump_json()):
        for told in ("127.0.0.1", str(cluster.port), "postgres", "psycopg", "connection"):
            assert told not in wire, told
    assert broken.is_error and broken.content[0].text == "Error executing tool breaks"  # type: ignore[union-attr]
    assert refused == {"code": "LEDGER_UNAVAILABLE", "message": LedgerUnavailable.told}
    # The operator's log says which ledger, and why: of the refusal, and of the void.
    logged = [record.getMessage() for record in caplog.records]
    for what in ("could not record refusal LEDGER_UNAVAILABLE", "void of hold"):
        assert any(what in line and f"127.0.0.1:{cluster.port}" in line for line in logged), \
            logged
    assert receipt_of(after)["amountUsd"] == receipt_of(before)["amountUsd"]
    # The call refused while down held nothing; the tool that failed is held until its hold
    # lapses (it is released then, unbilled).
    assert statuses(cluster) == ["captured", "captured", "held"]


def test_a_fastmcp_void_that_meets_a_ledger_gone_down_answers_the_tools_error(
        cluster: ScratchPostgres, isolated_home: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    settings, token = on_the_cluster(cluster, isolated_home)
    billing = BillingMiddleware.from_settings(settings)
    server: FastMCP[Any] = FastMCP("down")

    @billing.tool(server)
    def breaks(q: str) -> str:
        cluster.stop()
        raise ToolError(f"no answer to {q}")

    caplog.set_level(logging.WARNING, logger="mcpbill")

    async def call() -> CallToolResult:
        async with FastMCPClient(server) as client:
            return await client.call_tool_mcp("breaks", {"q": "usdc"},
                                              meta={TOKEN_META: token})

    try:
        result = anyio.run(call)
    finally:
        cluster.start()
        billing.verifier.close()
    assert result.is_error and result.content[0].text == "no answer to usdc"  # type: ignore[union-attr]
    for told in ("127.0.0.1", str(cluster.port), "postgres", "psycopg", "connection"):
        assert told not in result.model_dump_json(), told
    logged = [record.getMessage() for record in caplog.records]
    assert any("void of hold" in line and f"127.0.0.1:{cluster.port}" in line
               for line in logged), logged
    assert statuses(cluster) == ["held"]  # released when it lapses, unbilled

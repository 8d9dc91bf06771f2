"""``python examples/paid_server.py`` over stdio, launched as an agent host would launch it.

The token is in ``AGENT_CREDIT_JWT``; the server and the test share the home and the ledger.
Each server process costs seconds to start, so one session walks through several behaviours
(each is also tested on its own over the in-memory and HTTP transports in ``test_billing.py``,
on both ledgers), and only that session runs on both ledgers here.
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp_types import CallToolResult
from sqlalchemy import Engine

from mcpbill_cli.config import Settings
from mcpbill_cli.ledger import invariants
from mcpbill_cli.ledger.engine import reading
from mcpbill_cli.mcp import IDEMPOTENCY_KEY_META, PRICE_META, TOKEN_META
from mcpbill_cli.verifier import Verifier

from .conftest import (
    Agent,
    Mint,
    receipt_of,
    refusal_of,
    revoke,
    stdio_agent,
    stdio_parameters,
    token_view,
    usd,
)


def assert_ledger_sound(engine: Engine) -> None:
    with reading(engine) as conn:
        assert invariants.check(conn) == []


def test_an_agent_session_over_stdio(home: Settings, mint: Mint, verifier: Verifier,
                                     engine: Engine, tmp_path: Path) -> None:
    token = mint(limit="0.05")
    key = {IDEMPOTENCY_KEY_META: "stdio-1"}

    async def session() -> dict[str, Any]:
        async with stdio_agent(home, token.token, tmp_path / "server.log") as agent:
            seen: dict[str, Any] = {"tools": await agent.client.list_tools()}
            for name, tool, args in [("paid", "search", {"q": "usdc"}), ("free", "status", {}),
                                     ("words", "summarize", {"text": "one two three"}),
                                     ("raised", "search", {"q": " "})]:
                seen[name] = await agent.call(tool, args)
            seen["first"] = await agent.call("search", {"q": "k"}, **key)
            seen["retried"] = await agent.call("search", {"q": "k"}, **key)
            revoke(engine, token)
            seen["revoked"] = await agent.call("status")
            return seen

    seen = anyio.run(session)
    prices = {tool.name: (tool.meta or {})[PRICE_META]["amountUsd"] for tool in seen["tools"].tools}
    assert prices == {"status": "0.00", "search": "0.002", "summarize": "0.02"}
    assert verifier.verify_receipt(receipt_of(seen["paid"])["jws"]).amount == usd("0.002")
    assert not seen["free"].is_error and "dev.mcpbill/receipt" not in (seen["free"].meta or {})
    assert receipt_of(seen["words"])["amountUsd"] == "0.00003"
    assert seen["raised"].is_error and "dev.mcpbill/receipt" not in (seen["raised"].meta or {})
    assert receipt_of(seen["retried"]) == receipt_of(seen["first"])
    assert refusal_of(seen["revoked"])["code"] == "TOKEN_REVOKED"
    view = token_view(engine, token)
    assert (view.spent, view.held) == (usd("0.002") + usd("0.00003") + usd("0.002"), 0)
    assert_ledger_sound(engine)


SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


@SQLITE_ONLY
def test_refusals_over_stdio(home: Settings, mint: Mint, engine: Engine, tmp_path: Path) -> None:
    budget = mint(limit="0.003")
    scoped = mint(limit="0.05", scope=["status"], agent="agent-2")

    async def session() -> list[CallToolResult]:
        async with stdio_agent(home, budget.token, tmp_path / "server.log") as agent:
            return [await agent.call("search", {"q": "a"}), await agent.call("search", {"q": "b"}),
                    # A token in _meta wins over the server's environment.
                    await agent.call("search", {"q": "c"}, **{TOKEN_META: scoped.token})]

    paid, over_budget, out_of_scope = anyio.run(session)
    receipt_of(paid)
    error = refusal_of(over_budget)
    assert error["code"] == "BUDGET_EXCEEDED" and error["shortfallUsd"] == "0.001"
    assert error["fallback"]["freeTools"][0] == "status"
    assert refusal_of(out_of_scope)["code"] == "SCOPE_DENIED"
    assert (token_view(engine, budget).spent, token_view(engine, scoped).spent) == (
        usd("0.002"), 0)


@pytest.mark.slow
@SQLITE_ONLY
def test_twenty_concurrent_calls_over_stdio_never_overspend(
        home: Settings, mint: Mint, engine: Engine, tmp_path: Path) -> None:
    token = mint(limit="0.01")
    outcomes: list[str] = []

    async def one(agent: Agent, n: int) -> None:
        result = await agent.call("search", {"q": f"q{n}"})
        outcomes.append("paid" if not result.is_error else refusal_of(result)["code"])

    async def session() -> None:
        async with stdio_agent(home, token.token, tmp_path / "server.log") as agent, \
                anyio.create_task_group() as group:
            for n in range(20):
                group.start_soon(one, agent, n)

    anyio.run(session)
    assert Counter(outcomes) == {"paid": 5, "BUDGET_EXCEEDED": 15}
    assert token_view(engine, token).spent == usd("0.01")
    assert_ledger_sound(engine)


class RawStdio:
    """JSON-RPC lines to and from a server process, for what a client library never sends."""

    def __init__(self, command: list[str], env: dict[str, str], errlog: Path) -> None:
        self._log = errlog.open("a")
        self.process = subprocess.Popen(command, env=env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self._log, text=True)
        # A hung server must fail the test, not hang it.
        self._watchdog = threading.Timer(60, self.process.kill)
        self._watchdog.start()

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        self.notify(message)
        while True:
            line = self.process.stdout.readline()  # type: ignore[union-attr]
            assert line, "the server closed its output"
            reply: dict[str, Any] = json.loads(line)
            if reply.get("id") == message["id"]:
                return reply

    def notify(self, message: dict[str, Any]) -> None:
        self.process.stdin.write(json.dumps({"jsonrpc": "2.0", **message}) + "\n")  # type: ignore[union-attr]
        self.process.stdin.flush()  # type: ignore[union-attr]

    def close(self) -> None:
        self.process.stdin.close()  # type: ignore[union-attr]
        self.process.wait(30)
        self.process.stdout.close()  # type: ignore[union-attr]
        self._watchdog.cancel()
        self._log.close()


@SQLITE_ONLY
def test_a_request_resent_with_the_same_or_a_new_jsonrpc_id_is_billed_once(
        home: Settings, mint: Mint, engine: Engine, tmp_path: Path) -> None:
    token = mint(limit="0.05")
    parameters = stdio_parameters(home, token.token)
    env = {**parameters.env, "PATH": "/usr/bin:/bin"}  # type: ignore[dict-item]
    server = RawStdio([parameters.command, *parameters.args], env, tmp_path / "server.log")
    try:
        server.request({"id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {},
            "clientInfo": {"name": "raw", "version": "1"}}})
        server.notify({"method": "notifications/initialized"})
        call = {"id": 7, "method": "tools/call",
                "params": {"name": "search", "arguments": {"q": "lost reply"}}}
        first, resent = server.request(call), server.request(call)
        again = server.request({**call, "id": 8})
        other = server.request({**call, "id": 9, "params": {
            "name": "search", "arguments": {"q": "another query"}}})
    finally:
        server.close()
    receipt = first["result"]["_meta"]["dev.mcpbill/receipt"]
    assert resent["result"]["_meta"]["dev.mcpbill/receipt"] == receipt
    assert again["result"]["_meta"]["dev.mcpbill/receipt"] == receipt
    assert again["result"]["content"] == first["result"]["content"]
    assert other["result"]["_meta"]["dev.mcpbill/receipt"]["receiptId"] != receipt["receiptId"]
    assert token_view(engine, token).spent == 2 * usd("0.002")

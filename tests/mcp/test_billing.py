"""The paid example server, called by the real MCP client, on both ledgers.

Each test runs over the in-memory transport and streamable HTTP, on SQLite and PostgreSQL
(stdio: ``test_stdio.py``). The agent's view is the wire: results, ``_meta`` and the JSON text
of refusals; the operator's view is the ledger.
"""

from __future__ import annotations

from collections import Counter

import anyio
import pytest
from mcp_types import CallToolResult
from sqlalchemy import Engine

from mcpbill_cli.mcp import IDEMPOTENCY_KEY_META, PRICE_META
from mcpbill_cli.verifier import Verifier

from .conftest import (
    Agent,
    Connect,
    Mint,
    assert_ledger_sound,
    assert_paid_search,
    receipt_of,
    refusal_of,
    revoke,
    token_view,
    usd,
)

SEARCH = usd("0.002")


def test_paid_call_returns_a_receipt_that_verifies_and_debits_the_ledger(
        connect: Connect, mint: Mint, verifier: Verifier, engine: Engine) -> None:
    token = mint(limit="0.05")

    async def scenario() -> CallToolResult:
        async with connect(token.token) as agent:
            return await agent.call("search", {"q": "usdc"})

    assert_paid_search(anyio.run(scenario), token, verifier, engine)


def test_free_call_checks_the_token_and_charges_nothing(
        connect: Connect, mint: Mint, engine: Engine) -> None:
    token = mint(limit="0.05")

    async def scenario() -> CallToolResult:
        async with connect(token.token) as agent:
            return await agent.call("status")

    result = anyio.run(scenario)
    assert not result.is_error and result.structured_content == {"status": "ok"}
    view = token_view(engine, token)
    assert (view.spent, view.held, view.remaining) == (0, 0, usd("0.05"))


def test_tool_outside_the_token_scope_is_refused(
        connect: Connect, mint: Mint, engine: Engine) -> None:
    token = mint(limit="0.05", scope=["status"])

    async def scenario() -> tuple[CallToolResult, CallToolResult]:
        async with connect(token.token) as agent:
            return await agent.call("search", {"q": "x"}), await agent.call("status")

    denied, allowed = anyio.run(scenario)
    error = refusal_of(denied)
    assert error["code"] == "SCOPE_DENIED" and error["tool"] == "search"
    assert error["scope"] == ["status"]
    assert not allowed.is_error
    assert token_view(engine, token).spent == 0


def test_budget_exceeded_is_readable_from_the_text_alone(
        connect: Connect, mint: Mint, engine: Engine) -> None:
    token = mint(limit="0.003")

    async def scenario() -> list[CallToolResult]:
        async with connect(token.token) as agent:
            return [await agent.call("search", {"q": "a"}),
                    await agent.call("search", {"q": "b"})]

    paid, refused = anyio.run(scenario)
    receipt_of(paid)
    error = refusal_of(refused)
    assert error["code"] == "BUDGET_EXCEEDED" and error["reason"] == "token_limit"
    assert (error["priceUsd"], error["remainingUsd"], error["shortfallUsd"]) == (
        "0.002", "0.001", "0.001")
    assert error["fallback"]["freeTools"][0] == "status"
    assert error["fallback"]["tools"] == []
    assert "mcpbill token issue" in error["fallback"]["moreCredit"]
    assert token_view(engine, token).spent == SEARCH


def test_token_revoked_mid_session_is_refused_on_its_next_call(
        connect: Connect, mint: Mint, engine: Engine) -> None:
    token = mint(limit="0.05")

    async def scenario() -> list[CallToolResult]:
        async with connect(token.token) as agent:
            before = await agent.call("search", {"q": "a"})
            revoke(engine, token)
            return [before, await agent.call("search", {"q": "b"}), await agent.call("status")]

    before, paid_after, free_after = anyio.run(scenario)
    receipt_of(before)
    assert refusal_of(paid_after)["code"] == "TOKEN_REVOKED"
    assert refusal_of(free_after)["code"] == "TOKEN_REVOKED"  # free tools check the token too
    assert token_view(engine, token).spent == SEARCH
    assert_ledger_sound(engine)


def test_tool_that_raises_is_voided_and_costs_nothing(
        connect: Connect, mint: Mint, engine: Engine) -> None:
    token = mint(limit="0.05")

    async def scenario() -> list[CallToolResult]:
        async with connect(token.token) as agent:
            return [await agent.call("search", {"q": "  "}),
                    await agent.call("summarize", {"text": ""})]

    for failed in anyio.run(scenario):
        assert failed.is_error and "Error executing tool" in failed.content[0].text  # type: ignore[union-attr]
        assert "dev.mcpbill/receipt" not in (failed.meta or {})
    view = token_view(engine, token)
    assert (view.spent, view.held, view.remaining) == (0, 0, usd("0.05"))
    assert_ledger_sound(engine)


def test_the_same_call_retried_with_its_idempotency_key_is_billed_once(
        connect: Connect, mint: Mint, engine: Engine) -> None:
    token = mint(limit="0.05")
    key = {IDEMPOTENCY_KEY_META: "agent-1/search/42"}

    async def scenario() -> list[CallToolResult]:
        async with connect(token.token) as agent:
            first = await agent.call("search", {"q": "a"}, **key)
            return [first, await agent.call("search", {"q": "a"}, **key),
                    await agent.call("search", {"q": "other"}, **key)]

    first, retried, conflicting = anyio.run(scenario)
    assert receipt_of(retried) == receipt_of(first)
    assert receipt_of(first)["idempotencyKey"] == "agent-1/search/42"
    assert refusal_of(conflicting)["code"] == "IDEMPOTENCY_CONFLICT"
    assert token_view(engine, token).spent == SEARCH


def test_the_same_call_on_a_new_connection_is_the_same_call_within_its_window(
        connect: Connect, mint: Mint, engine: Engine) -> None:
    """Keys are never derived from request ids or connections (MCP 2026-07-28 has neither
    sessions nor stable ids across a retry): the same token, tool and arguments within the
    tool's dedupe window is one call, replayed; other arguments are a new call."""
    token = mint(limit="0.05")

    async def scenario() -> list[CallToolResult]:
        results = []
        for query in ("same", "same", "same", "other"):
            async with connect(token.token) as agent:
                results.append(await agent.call("search", {"q": query}))
        return results

    *same, other = anyio.run(scenario)
    assert len({receipt_of(result)["receiptId"] for result in same}) == 1
    assert all(result.structured_content == same[0].structured_content for result in same)
    assert receipt_of(other)["receiptId"] != receipt_of(same[0])["receiptId"]
    assert token_view(engine, token).spent == 2 * SEARCH


def test_per_unit_tool_is_charged_for_the_units_it_reports(
        connect: Connect, mint: Mint, engine: Engine) -> None:
    token = mint(limit="0.05")

    async def scenario() -> CallToolResult:
        async with connect(token.token) as agent:
            return await agent.call("summarize", {"text": "one two three four five"})

    receipt = receipt_of(anyio.run(scenario))
    assert receipt["amountUsd"] == "0.00005"  # 5 words at 0.00001, not the 0.02 it held
    view = token_view(engine, token)
    assert (view.spent, view.held) == (usd("0.00005"), 0)


def test_prices_are_advertised_in_tools_list(connect: Connect, mint: Mint) -> None:
    token = mint()

    async def scenario() -> dict[str, dict[str, object]]:
        async with connect(token.token) as agent:
            listed = await agent.client.list_tools()
        return {tool.name: dict((tool.meta or {})[PRICE_META]) for tool in listed.tools}

    prices = anyio.run(scenario)
    assert prices["search"]["amountUsd"] == "0.002" and prices["search"]["asset"] == "USDC"
    assert prices["status"]["free"] is True
    assert (prices["summarize"]["perUnitUsd"], prices["summarize"]["amountUsd"]) == (
        "0.00001", "0.02")  # per word, and the most one call (2000 words) can cost


@pytest.mark.slow
def test_twenty_concurrent_calls_on_one_token_never_overspend(
        connect: Connect, mint: Mint, engine: Engine) -> None:
    token = mint(limit="0.01")  # five searches
    outcomes: list[str] = []

    async def one(agent: Agent, n: int) -> None:
        result = await agent.call("search", {"q": f"q{n}"})
        outcomes.append("paid" if not result.is_error else refusal_of(result)["code"])

    async def scenario() -> None:
        async with connect(token.token) as agent, anyio.create_task_group() as group:
            for n in range(20):
                group.start_soon(one, agent, n)

    anyio.run(scenario)
    assert Counter(outcomes) == {"paid": 5, "BUDGET_EXCEEDED": 15}
    view = token_view(engine, token)
    assert (view.spent, view.held, view.remaining) == (usd("0.01"), 0, 0)
    assert_ledger_sound(engine)

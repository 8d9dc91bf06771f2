"""Paid calls through the proxy, over a stdio and a streamable HTTP upstream, on SQLite and
PostgreSQL: billed once with receipts, free calls and other methods untouched, every failure
voided."""

from __future__ import annotations

from typing import Any

import anyio
from mcp_types import CallToolResult
from sqlalchemy import Engine

from mcpbill_cli.mcp.wire import PRICE_META, RECEIPT_META, REPLAYED_META
from mcpbill_cli.verifier import Verifier
from tests.mcp.conftest import (
    Mint,
    assert_ledger_sound,
    receipt_of,
    refusal_of,
    revoke,
    token_view,
    usd,
)

from .conftest import Running


def text_of(result: CallToolResult) -> str:
    return str(result.content[0].text)  # type: ignore[union-attr]


def assert_nothing_billed(engine: Engine, token: Any) -> None:
    view = token_view(engine, token)
    assert (view.spent, view.held, view.remaining) == (0, 0, view.limit)
    assert_ledger_sound(engine)


def test_a_paid_call_is_billed_once_with_a_receipt(running: Running, mint: Mint,
                                                   verifier: Verifier, engine: Engine) -> None:
    token = mint()

    async def go() -> CallToolResult:
        async with running.connect(token.token) as agent:
            return await agent.call("echo", {"message": "paid"})

    result = anyio.run(go)
    assert text_of(result) == "Echo: paid"
    receipt = verifier.verify_receipt(receipt_of(result)["jws"])
    assert receipt.claims["tool"] == "echo" and receipt.amount == usd("0.002")
    assert receipt.claims["jti"] == token.claims.jti
    assert receipt.remaining == usd("0.048") == token_view(engine, token).remaining
    assert token_view(engine, token).spent == usd("0.002")
    assert_ledger_sound(engine)


def test_a_retried_call_with_a_new_request_id_is_billed_once(
        running: Running, mint: Mint, engine: Engine) -> None:
    token = mint()

    async def go() -> tuple[CallToolResult, CallToolResult]:
        async with running.connect(token.token) as agent:
            first = await agent.call("echo", {"message": "lost reply"})
        async with running.connect(token.token) as agent:  # a new client: a new request id
            return first, await agent.call("echo", {"message": "lost reply"})

    first, retried = anyio.run(go)
    assert receipt_of(retried) == receipt_of(first)
    assert (retried.meta or {}).get(REPLAYED_META) is True
    assert text_of(retried) == text_of(first) == "Echo: lost reply"
    assert token_view(engine, token).spent == usd("0.002")
    assert_ledger_sound(engine)


def test_free_calls_and_other_methods_pass_through(running: Running, mint: Mint,
                                                   engine: Engine) -> None:
    async def go() -> tuple[Any, ...]:
        async with running.connect() as agent:  # no token at all
            summed = await agent.call("get-sum", {"a": 2, "b": 3})
            tools = await agent.client.list_tools()
            resources = await agent.client.list_resources()
            prompts = await agent.client.list_prompts()
            prompt = await agent.client.get_prompt("simple-prompt")
            return summed, tools, resources, prompts, prompt

    summed, tools, resources, prompts, prompt = anyio.run(go)
    assert not summed.is_error and text_of(summed) == "The sum of 2 and 3 is 5."
    assert RECEIPT_META not in (summed.meta or {})
    prices = {tool.name: (tool.meta or {}).get(PRICE_META) for tool in tools.tools}
    assert prices["echo"]["amountUsd"] == "0.002" and prices["echo"]["free"] is False
    assert prices["trigger-long-running-operation"]["amountUsd"] == "0.005"
    assert prices["get-sum"]["free"] is True
    assert prices["get-env"] is None  # no price, no default_price: its calls are refused
    assert len(resources.resources) > 0 and any(p.name == "simple-prompt"
                                                for p in prompts.prompts)
    assert prompt.messages
    assert_ledger_sound(engine)



def test_refusals_forward_nothing(running: Running, mint: Mint, engine: Engine) -> None:
    revoked = mint()
    revoke(engine, revoked)

    async def go() -> tuple[CallToolResult, ...]:
        async with running.connect() as agent:
            missing = await agent.call("echo", {"message": "no token"})
            unpriced = await agent.call("get-env", {})
        async with running.connect(revoked.token) as agent:
            refused = await agent.call("echo", {"message": "revoked"})
        return missing, unpriced, refused

    missing, unpriced, refused = anyio.run(go)
    assert (refusal_of(missing)["code"], refusal_of(missing)["reason"]) == (
        "INVALID_CREDIT_TOKEN", "missing")
    assert refusal_of(unpriced)["code"] == "PRICE_UNKNOWN"
    assert refusal_of(refused)["code"] == "TOKEN_REVOKED"
    assert token_view(engine, revoked).spent == 0
    assert_ledger_sound(engine)


def test_an_upstream_error_is_voided(running: Running, mint: Mint, engine: Engine) -> None:
    token = mint()

    async def go() -> CallToolResult:
        async with running.connect(token.token) as agent:
            return await agent.call("echo", {"message": 5})  # the upstream refuses the type

    result = anyio.run(go)
    assert result.is_error and "Input validation error" in text_of(result)
    assert RECEIPT_META not in (result.meta or {})
    assert_nothing_billed(engine, token)


def test_progress_is_relayed_in_order_and_the_call_billed(
        running: Running, mint: Mint, engine: Engine) -> None:
    token = mint()
    seen: list[tuple[float, float | None]] = []

    async def progress(done: float, total: float | None, message: str | None) -> None:
        seen.append((done, total))

    async def go() -> CallToolResult:
        async with running.connect(token.token) as agent:
            return await agent.call("trigger-long-running-operation",
                                    {"duration": 0.4, "steps": 4}, progress_callback=progress)

    result = anyio.run(go)
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert receipt_of(result)["amountUsd"] == "0.005"
    assert token_view(engine, token).spent == usd("0.005")
    assert_ledger_sound(engine)

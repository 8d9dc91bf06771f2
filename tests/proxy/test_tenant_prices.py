"""A tenant's own prices through the proxy: a tool free, or without a price, on the table's base
terms is billed at the price of the tenant whose token comes with the call; a call without a
token is priced on the base terms, as the embedded verifier prices it."""

from __future__ import annotations

import anyio
import pytest
from mcp_types import CallToolResult
from sqlalchemy import Engine

from mcpbill_cli.config import Settings
from mcpbill_cli.mcp.wire import RECEIPT_META
from mcpbill_cli.pricing import save_pricing_text
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

from .conftest import PRICING, Running

# get-sum is free for everyone but tenant default (the tokens' tenant), which pays for it;
# get-env has no base price (no default_price) but default has one; get-tiny-image is priced
# only for another tenant.
TENANT_PRICES = PRICING + '''
[tenants.default.tools."get-sum"]
price = "0.001"

[tenants.default.tools."get-env"]
price = "0.004"

[tenants.other.tools."get-tiny-image"]
price = "0.009"
'''


@pytest.fixture
def priced(home: Settings) -> Settings:
    save_pricing_text(home.pricing_path, TENANT_PRICES)
    return home


def test_a_tool_free_on_the_base_terms_is_billed_at_the_tokens_tenant_price(
        running: Running, mint: Mint, verifier: Verifier, engine: Engine) -> None:
    token = mint()

    async def go() -> tuple[CallToolResult, CallToolResult]:
        async with running.connect(token.token) as agent:
            return (await agent.call("get-sum", {"a": 2, "b": 3}),
                    await agent.call("get-env", {}))

    summed, env = anyio.run(go)
    assert not summed.is_error and not env.is_error
    sum_receipt = verifier.verify_receipt(receipt_of(summed)["jws"])
    env_receipt = verifier.verify_receipt(receipt_of(env)["jws"])
    assert (sum_receipt.claims["tool"], sum_receipt.amount) == ("get-sum", usd("0.001"))
    assert (env_receipt.claims["tool"], env_receipt.amount) == ("get-env", usd("0.004"))
    view = token_view(engine, token)
    assert (view.spent, view.held) == (usd("0.005"), 0)
    assert view.remaining == usd("0.045") == env_receipt.remaining
    assert_ledger_sound(engine)


def test_without_a_token_the_base_terms_decide(running: Running, engine: Engine) -> None:
    async def go() -> tuple[CallToolResult, CallToolResult]:
        async with running.connect() as agent:
            return (await agent.call("get-sum", {"a": 2, "b": 3}),
                    await agent.call("get-env", {}))

    summed, env = anyio.run(go)
    assert not summed.is_error and RECEIPT_META not in (summed.meta or {})
    assert refusal_of(env)["code"] == "PRICE_UNKNOWN"
    assert_ledger_sound(engine)


def test_a_token_on_tenant_terms_is_checked_and_another_tenants_price_is_not_charged(
        running: Running, mint: Mint, engine: Engine) -> None:
    revoked, token = mint(), mint()
    revoke(engine, revoked)

    async def go() -> tuple[CallToolResult, CallToolResult]:
        async with running.connect(revoked.token) as agent:
            refused = await agent.call("get-sum", {"a": 2, "b": 3})
        async with running.connect(token.token) as agent:
            return refused, await agent.call("get-tiny-image", {})

    refused, image = anyio.run(go)
    assert refusal_of(refused)["code"] == "TOKEN_REVOKED"  # not passed on free
    assert refusal_of(image)["code"] == "PRICE_UNKNOWN"  # only tenant other has a price
    assert token_view(engine, revoked).spent == token_view(engine, token).spent == 0
    assert_ledger_sound(engine)

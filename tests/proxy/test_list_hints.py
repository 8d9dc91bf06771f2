"""``tools/list`` through the proxy carries ``ttlMs`` and ``cacheScope`` (MCP 2026-07-28), read by
the official ``mcp`` client: ``"private"`` as soon as the pricing table gives a tenant prices of
its own, ``"public"`` while everyone pays the same."""

from __future__ import annotations

import time

import anyio
import pytest
from mcp_types import ListToolsResult

from mcpbill_cli.config import Settings
from mcpbill_cli.mcp.wire import LIST_TTL_MS, PRICE_META
from mcpbill_cli.pricing import save_pricing_text
from mcpbill_cli.pricing.source import RELOAD_INTERVAL
from mcpbill_cli.proxy import Proxy, Upstream, UpstreamTarget
from tests.mcp.conftest import raw_session, reply, rpc

from .conftest import PRICING, Running


@pytest.fixture
def upstream_kind() -> str:
    return "http"  # what is listed does not depend on the upstream's transport


def listing(running: Running) -> ListToolsResult:
    async def go() -> ListToolsResult:
        async with running.connect() as agent:
            return await agent.client.list_tools()

    return anyio.run(go)


def test_tools_list_is_public_while_every_tenant_pays_the_same(running: Running) -> None:
    listed = listing(running)
    assert (listed.ttl_ms, listed.cache_scope) == (LIST_TTL_MS, "public")
    assert any(PRICE_META in (tool.meta or {}) for tool in listed.tools)


def test_a_tenant_price_added_to_the_table_makes_tools_list_private(
        running: Running, priced: Settings) -> None:
    assert listing(running).cache_scope == "public"
    save_pricing_text(priced.pricing_path, PRICING.replace("version = 1", "version = 2") + '''
[tenants.acme.tools.echo]
price = "0.001"
''')
    time.sleep(RELOAD_INTERVAL + 0.2)  # the proxy looks at the file at most this often
    listed = listing(running)
    assert (listed.ttl_ms, listed.cache_scope) == (LIST_TTL_MS, "private")


def test_a_proxy_with_a_list_ttl_of_its_own(priced: Settings, running: Running) -> None:
    proxy = Proxy(running.proxy.verifier, running.proxy.upstream, list_ttl_ms=0)
    assert proxy.list_hints() == {"ttlMs": 0, "cacheScope": "public"}
    with pytest.raises(ValueError, match="list_ttl_ms"):
        Proxy(running.proxy.verifier,
              Upstream(UpstreamTarget.parse(command=None, url="http://127.0.0.1:9/mcp")),
              list_ttl_ms=-5)


def test_an_earlier_protocol_version_gets_no_cache_hints(running: Running) -> None:
    with raw_session(running.url) as web:
        result = reply(rpc(web, running.url, {"id": 2, "method": "tools/list"}))["result"]
    assert "ttlMs" not in result and "cacheScope" not in result
    assert any(PRICE_META in tool.get("_meta", {}) for tool in result["tools"])

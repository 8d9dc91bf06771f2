"""Both protocol eras the SDK serves reach the upstream through the proxy: a 2026-07-28 client
(no handshake) and a client of the initialize handshake (2025-11-25), billed alike."""

from __future__ import annotations

import anyio
import httpx2
import pytest
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import CallToolResult
from sqlalchemy import Engine

from mcpbill_cli.mcp import TOKEN_META
from tests.mcp.conftest import Mint, receipt_of, token_view, usd

from .conftest import Running


@pytest.mark.parametrize("upstream_kind", ["stdio"], indirect=True)
@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
def test_either_protocol_era_is_billed_alike(running: Running, mint: Mint, engine: Engine,
                                             mode: str) -> None:
    token = mint()

    async def go() -> tuple[str, CallToolResult]:
        async with httpx2.AsyncClient(timeout=60) as web, \
                Client(streamable_http_client(running.url, http_client=web), mode=mode,
                       cache=None) as client:
            result = await client.call_tool("echo", {"message": f"era {mode}"},
                                            meta={TOKEN_META: token.token})  # type: ignore[arg-type]
            return str(client.session.protocol_version), result

    version, result = anyio.run(go)
    assert version == ("2025-11-25" if mode == "legacy" else "2026-07-28")
    assert receipt_of(result)["amountUsd"] == "0.002"
    assert result.content[0].text == f"Echo: era {mode}"  # type: ignore[union-attr]
    assert token_view(engine, token).spent == usd("0.002")

"""An agent calling an MCP server through ``mcpbill proxy``: prices from ``tools/list``, a paid
call with its signed receipt, a free call, and a refusal it can read.

    mcpbill init --mode demo && mcpbill wallet fund --demo 10
    npm ci   # the official reference server, @modelcontextprotocol/server-everything
    mcpbill proxy --listen 127.0.0.1:8080 \\
        --upstream-cmd "node node_modules/@modelcontextprotocol/server-everything/dist/index.js"
    export AGENT_CREDIT_JWT=$(mcpbill token issue --limit 0.05)
    python examples/proxy_agent.py http://127.0.0.1:8080/mcp

The token travels in each call's ``_meta["dev.mcpbill/token"]`` (``Authorization: Bearer`` is
read only where the operator made mcpbill the server's authorization); the receipt comes back
in the result's ``_meta``.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import anyio
import httpx2
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client

TOKEN_META = "dev.mcpbill/token"  # noqa: S105 - a _meta key, not a secret


def receipt_of(meta: dict[str, Any] | None) -> dict[str, Any] | None:
    """The receipt in a result's ``_meta``, whatever prefix the server's version uses."""
    for key, value in (meta or {}).items():
        if key.endswith("/receipt"):
            return dict(value)
    return None


async def run(url: str, token: str) -> None:
    async with httpx2.AsyncClient() as web, \
            Client(streamable_http_client(url, http_client=web)) as client:
        listed = await client.list_tools()
        for tool in listed.tools:
            price = next((value for key, value in (tool.meta or {}).items()
                          if key.endswith("/price")), None)
            shown = "no price (refused)" if price is None else f"{price['amountUsd']} USDC"
            print(f"{tool.name:34} {shown}")
        paid = await client.call_tool("echo", {"message": "hello through the proxy"},
                                      meta={TOKEN_META: token})  # type: ignore[arg-type]
        print("echo:", paid.content[0].text)  # type: ignore[union-attr]
        receipt = receipt_of(paid.meta)
        if receipt is not None:
            print("receipt:", receipt["receiptId"], receipt["amountUsd"], "USDC, remaining",
                  receipt["remainingUsd"])
        else:  # a refusal: its code says what to do
            print("refused:", json.dumps(paid.structured_content))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", nargs="?", default="http://127.0.0.1:8080/mcp")
    args = parser.parse_args()
    anyio.run(run, args.url, os.environ["AGENT_CREDIT_JWT"])


if __name__ == "__main__":
    main()

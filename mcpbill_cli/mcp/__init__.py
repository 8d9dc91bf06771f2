"""mcpbill for MCP servers (extra ``mcpbill[mcp]``): bill each tool call of an SDK 2.x server.

    from mcp.server.mcpserver import MCPServer
    from mcpbill_cli.mcp import Billing, report_units

    billing = Billing.from_settings()
    server = MCPServer("paid", extensions=[billing])

    @billing.tool(server)
    async def search(q: str) -> str: ...

This package imports the MCP SDK (about a second); only servers import it, never the CLI's
``--help`` or ``token issue``. See :class:`Billing` for the wire shapes an agent sees.
"""

from __future__ import annotations

from mcpbill_cli.mcp.billing import BilledTool, Billing
from mcpbill_cli.mcp.units import report_units
from mcpbill_cli.mcp.wire import (
    EXTENSION_ID,
    IDEMPOTENCY_KEY_META,
    PRICE_META,
    RECEIPT_META,
    REPLAYED_META,
    TOKEN_META,
)

__all__ = [
    "EXTENSION_ID",
    "IDEMPOTENCY_KEY_META",
    "PRICE_META",
    "RECEIPT_META",
    "REPLAYED_META",
    "TOKEN_META",
    "BilledTool",
    "Billing",
    "report_units",
]

"""mcpbill: sell MCP tool calls to AI agents per call, in USDC.

The public API is small and re-exported here; heavy modules load on first use so that
``import mcpbill_cli`` (and ``mcpbill --help``) stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mcpbill_cli.__about__ import __version__
from mcpbill_cli.errors import BillingError

if TYPE_CHECKING:
    from mcpbill_cli.receipts import Receipt, RefundReceipt
    from mcpbill_cli.verifier import Hold, Quote, Verifier

__all__ = ["BillingError", "Hold", "Quote", "Receipt", "RefundReceipt", "Verifier",
           "__version__"]

_LAZY = {
    "Verifier": "mcpbill_cli.verifier",
    "Quote": "mcpbill_cli.verifier",
    "Hold": "mcpbill_cli.verifier",
    "Receipt": "mcpbill_cli.receipts",
    "RefundReceipt": "mcpbill_cli.receipts",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mcpbill_cli' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)

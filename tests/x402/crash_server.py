"""A billed MCP server in a process of its own that dies in the middle of an x402 settlement.

It is built the way an operator builds one (``Billing.from_settings()`` on a live home that
settles from its keystore), takes one x402 payment through the official MCP client, and
SIGKILLs itself at ``HOOK``:

- ``settling``: the payment is reserved in the ledger, nothing was sent to the chain;
- ``settled``: the transfer is on chain, nothing of it is recorded in the ledger.

    python -m tests.x402.crash_server HOME DB_URL HOOK PAYMENT_JSON_FILE
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import anyio
from mcp.client import Client
from mcp.server.mcpserver import MCPServer

from mcpbill_cli.config import load_settings
from mcpbill_cli.mcp import Billing
from mcpbill_cli.mcp.x402 import PAYMENT_META
from mcpbill_cli.x402.offers import Signed
from mcpbill_cli.x402.settlers import Settler


def die() -> NoReturn:
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable: SIGKILL cannot be caught")


@dataclass
class DiesMidSettlement:
    """The real settler, with a SIGKILL before it sends (``settling``) or after the transfer
    is mined (``settled``)."""

    settler: Settler
    hook: str

    def verify(self, signed: Signed, requirement: Mapping[str, Any]) -> None:
        self.settler.verify(signed, requirement)

    def settle(self, signed: Signed, requirement: Mapping[str, Any]) -> str:
        if self.hook == "settling":
            die()
        self.settler.settle(signed, requirement)
        die()


def main() -> None:
    home, db_url, hook, payment_file = sys.argv[1:5]
    assert hook in ("settling", "settled"), hook
    billing = Billing.from_settings(load_settings(home=Path(home), db_url=db_url))
    assert billing.acceptor is not None, "this home must accept x402"
    billing.acceptor.settler = DiesMidSettlement(billing.acceptor.settler, hook)
    billing.acceptor.settle_margin = 1  # the test's short-lived authorization still verifies
    server: MCPServer = MCPServer("paid", extensions=[billing])
    billing.tool(server, "search")(lambda q: [q])
    payment = json.loads(Path(payment_file).read_text())

    async def pay() -> None:
        async with Client(server) as client:
            await client.call_tool("search", {"q": "crash"}, meta={PAYMENT_META: payment})

    anyio.run(pay)
    raise AssertionError("the call returned: the server should have died in it")


if __name__ == "__main__":
    main()

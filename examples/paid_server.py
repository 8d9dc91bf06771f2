"""A paid MCP server: a free ``status``, a paid ``search`` and a per-word ``summarize``.

    python examples/paid_server.py                         # stdio
    python examples/paid_server.py --http --port 8000      # streamable HTTP on /mcp

Prices, keys and the ledger come from the mcpbill home (``MCPBILL_HOME``, see ``mcpbill init``);
the sample pricing table prices status at 0, search at 0.002 and summarize at 0.00001 a word.
Agents send their credit token in ``_meta["dev.mcpbill/token"]``, or in ``AGENT_CREDIT_JWT``
when they launch this server over stdio; over HTTP also as ``Authorization: Bearer`` where the
home's config.toml makes mcpbill the server's authorization (``[mcp]``, see the README), for
tokens issued to its canonical URI. Each paid result carries its signed receipt in
``_meta["dev.mcpbill/receipt"]``.
"""

from __future__ import annotations

import argparse

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from mcpbill_cli.mcp import Billing, report_units

MAX_WORDS = 2000  # summarize holds 2000 words' worth while it runs, and captures what it used


def build_server(billing: Billing) -> MCPServer:
    """The example server, billed by ``billing``."""
    server: MCPServer = MCPServer("mcpbill-example", extensions=[billing], log_level="WARNING")

    @billing.tool(server)
    def status() -> dict[str, str]:
        """Is the server up? Free, but still needs a valid credit token."""
        return {"status": "ok"}

    @billing.tool(server)
    def search(q: str) -> list[str]:
        """Search a (made-up) index; billed per call."""
        if not q.strip():
            raise ToolError("the query is empty")  # a failed call is voided, not billed
        return [f"{q}: result {n}" for n in range(1, 4)]

    @billing.tool(server, max_units=MAX_WORDS)
    def summarize(text: str) -> str:
        """Summarize a text; billed per word, at most 2000 words."""
        words = text.split()
        if not words or len(words) > MAX_WORDS:
            raise ToolError(f"send 1 to {MAX_WORDS} words, not {len(words)}")
        report_units(len(words))
        return " ".join(words[:12]) + (" ..." if len(words) > 12 else "")

    return server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A paid MCP server (mcpbill example).")
    parser.add_argument("--http", action="store_true", help="serve streamable HTTP, not stdio")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    billing = Billing.from_settings()
    server = build_server(billing)
    try:
        if args.http:
            server.run("streamable-http", host=args.host, port=args.port)
        else:
            server.run("stdio")
    finally:
        billing.verifier.close()  # seals what is left and writes the refusal counts


if __name__ == "__main__":
    main()

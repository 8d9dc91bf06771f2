"""What billing adds to an MCP tool call: a billed trivial tool vs the same tool unbilled.

Both run on one ``MCPServer`` over the SDK's in-memory transport, with the real client, in the
same run: rounds alternate between the two so drift (CPU boost, caches) hits both alike. The
billed tool does the whole path on a SQLite ledger: begin (the token, scope and price checks
and the hold), run, capture, a signed receipt in ``_meta``. Prints the median time per call of
each and their ratio (target <= 1.5x), and, to tell the MCP glue from the ledger, the same
begin (hold) + capture called on the verifier directly (no MCP, no threads) in the same
rounds; the rest is the MCP billing glue, mostly the two worker-thread hops that keep ledger
writes off the event loop.

Usage: python bench/mcp_overhead.py [--calls N] [--rounds R]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, cast

import anyio
from mcp.client import Client
from mcp.server.mcpserver import MCPServer
from mcp_types import RequestParamsMeta

from mcpbill_cli.clock import utcnow
from mcpbill_cli.config import load_settings
from mcpbill_cli.keys import KeyRing
from mcpbill_cli.ledger import credit
from mcpbill_cli.ledger.engine import make_engine, writing
from mcpbill_cli.mcp import TOKEN_META, Billing
from mcpbill_cli.setup import initialize
from mcpbill_cli.verifier import Hold, Verifier

PRICING = """version = 1
[tools.echo]
price = "0.000001"
"""


def make_home(root: Path) -> Any:
    settings = load_settings(home=root, db_url=f"sqlite:///{root / 'ledger.db'}", mode="demo")
    initialize(settings, alg="EdDSA", mode="demo", force=False)
    settings.pricing_path.write_text(PRICING)
    return settings


def issue(settings: Any, limit: int) -> str:
    engine = make_engine(settings.db_url)
    with writing(engine) as conn:
        credit.fund_demo(conn, "bench", limit, now=utcnow())
        token = credit.issue(conn, credit.IssueRequest(
            tenant="bench", agent="bench", limit=limit, ttl=3600, scope=None,
            audience=settings.audience, issuer=settings.issuer, demo=True),
            signer=KeyRing.load(settings.keys_dir).signing_key(), ttl_cap=settings.ttl_cap,
            now=utcnow()).token
    engine.dispose()
    return token


def build_server(billing: Billing) -> MCPServer:
    server: MCPServer = MCPServer("bench", extensions=[billing], log_level="WARNING")

    @billing.tool(server)
    def echo(text: str) -> str:
        return text

    @server.tool()
    def echo_unbilled(text: str) -> str:
        return text

    return server


async def per_call(client: Client, tool: str, meta: RequestParamsMeta, calls: int) -> float:
    """Seconds per call of ``calls`` sequential calls, checking each one succeeded."""
    start = time.perf_counter()
    for n in range(calls):
        result = await client.call_tool(tool, {"text": f"hello {n}"}, meta=meta)
        assert not result.is_error, result
    return (time.perf_counter() - start) / calls


def verifier_alone(verifier: Verifier, token: str, calls: int) -> float:
    """Seconds per call of what billing asks of the verifier, called directly: begin (a hold,
    for this paid tool), then capture."""
    start = time.perf_counter()
    for n in range(calls):
        hold = verifier.begin(token, "echo", args={"text": f"hello {n}"},
                              request_id=uuid.uuid4().hex)
        assert isinstance(hold, Hold)
        verifier.capture(hold)
    return (time.perf_counter() - start) / calls


async def measure(server: MCPServer, verifier: Verifier, token: str, calls: int,
                  rounds: int) -> dict[str, float]:
    meta = cast(RequestParamsMeta, {TOKEN_META: token})
    times: dict[str, list[float]] = {"unbilled": [], "billed": [], "verifier": []}
    async with Client(server) as client:
        await per_call(client, "echo", meta, 20)  # warm up both paths
        await per_call(client, "echo_unbilled", meta, 20)
        for _ in range(rounds):
            times["unbilled"].append(await per_call(client, "echo_unbilled", meta, calls))
            times["billed"].append(await per_call(client, "echo", meta, calls))
            times["verifier"].append(verifier_alone(verifier, token, calls))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description="billed vs unbilled MCP tool call")
    parser.add_argument("--calls", type=int, default=200, help="calls per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mcpbill-bench-") as root:
        settings = make_home(Path(root))
        token = issue(settings, 10_000_000)
        verifier = Verifier.from_settings(settings)
        server = build_server(Billing(verifier))
        median = anyio.run(measure, server, verifier, token, args.calls, args.rounds)
        verifier.close()
    unbilled, billed, ledger = median["unbilled"], median["billed"], median["verifier"]
    print(f"in-memory transport, SQLite ledger, {args.rounds} rounds x {args.calls} calls")
    print(f"unbilled tool call                  {unbilled * 1000:8.3f} ms/call")
    print(f"billed tool call                    {billed * 1000:8.3f} ms/call")
    print(f"ratio billed / unbilled             {billed / unbilled:8.2f}x  (target <= 1.50x)")
    print(f"of which the verifier, called alone {ledger * 1000:8.3f} ms/call "
          "(begin: hold, then capture)")
    print(f"and the MCP billing glue            {(billed - unbilled - ledger) * 1000:8.3f} ms/call")


if __name__ == "__main__":
    main()

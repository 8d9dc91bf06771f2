"""A paid call through ``mcpbill proxy`` against the same call sent straight to the upstream.

The upstream is the official TypeScript reference server (``npm ci`` installs it) over stdio,
its ``echo`` tool. In one run, rounds alternate between:

- direct: the official Python client talking to the reference server it starts over stdio;
- proxied: the same client talking streamable HTTP to ``mcpbill proxy`` (a process of its own,
  started with ``--upstream-cmd`` on the same server), each call a paid call: token checked,
  held, forwarded, captured, a signed receipt in ``_meta`` (SQLite ledger, demo mode);
- free: an unbilled call (``get-sum``, priced 0) through the same proxy: the HTTP hop alone;
- the verifier's floor: the verifier's own begin (hold) + capture called directly in a tight
  loop, on the same ledger: what billing a call costs with no MCP, HTTP or upstream around it.

Prints the median per call of each and proxied / (direct + floor) (goal <= 1.3x), and the
proxy process's own CPU per paid and per free call (its user + system time from ``/proc``
across each round, on Linux): on a machine shared with other work the wall times stretch, its
CPU per call much less. The proxy adds
a whole HTTP hop the direct call does not make, so this ratio also holds the hop's cost; paid
minus free, beside the verifier's floor, is what billing itself adds to a proxied call.

Usage: python bench/proxy.py [--calls N] [--rounds R]
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import anyio
import httpx2
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

from mcpbill_cli.clock import utcnow
from mcpbill_cli.config import ENV_HOME, ENV_MODE, load_settings
from mcpbill_cli.keys import KeyRing
from mcpbill_cli.ledger import credit
from mcpbill_cli.ledger.engine import make_engine, writing
from mcpbill_cli.mcp.wire import TOKEN_META
from mcpbill_cli.setup import initialize
from mcpbill_cli.verifier import Hold, Verifier

ROOT = Path(__file__).resolve().parents[1]
EVERYTHING = (ROOT / "node_modules" / "@modelcontextprotocol" / "server-everything" / "dist"
              / "index.js")
PRICING = """version = 1
dedupe_window = "0s"
[tools.echo]
price = "0.000001"
[tools."get-sum"]
price = "0"
"""
_NUMBERS = itertools.count()  # every call says something new: nothing is a replay


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_proxy(settings: Any, node: str, port: int, log: Any) -> subprocess.Popen[bytes]:
    env = {**os.environ, ENV_HOME: str(settings.home), ENV_MODE: "demo"}
    proxy = subprocess.Popen(
        [sys.executable, "-m", "mcpbill_cli", "proxy", "--listen", f"127.0.0.1:{port}",
         "--upstream-cmd", f"{node} {EVERYTHING} stdio"], env=env, stdout=log, stderr=log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proxy.poll() is not None:
            raise SystemExit("mcpbill proxy exited: see its log")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proxy
        except OSError:
            time.sleep(0.1)
    raise SystemExit("mcpbill proxy did not listen")


async def per_call(client: Client, calls: int, *, token: str | None = None,
                   free: bool = False) -> float:
    """Seconds per call of ``echo`` (paid when a ``token`` rides in ``_meta``, as an agent
    sends it) or of the free ``get-sum``."""
    meta = {TOKEN_META: token} if token else None
    start = time.perf_counter()
    for _ in range(calls):
        number = next(_NUMBERS)
        result = await (client.call_tool("get-sum", {"a": number, "b": 1}) if free
                        else client.call_tool("echo", {"message": f"hello {number}"},
                                              meta=meta))  # type: ignore[arg-type]
        assert not result.is_error, result
        paid = bool(result.meta and any("receipt" in key for key in result.meta))
        assert paid == (token is not None), result
    return (time.perf_counter() - start) / calls


def verifier_floor(verifier: Verifier, token: str, calls: int) -> tuple[float, float]:
    """Seconds per begin + capture, and this process's CPU seconds per pair (the verifier's
    threads', its sealer's, included: in the proxy they count too)."""
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        hold = verifier.begin(token, "echo", args={"message": f"hello {next(_NUMBERS)}"})
        assert isinstance(hold, Hold)
        verifier.capture(hold)
    return (time.perf_counter() - start) / calls, (time.process_time() - cpu) / calls


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process ``pid`` has used so far (NaN without ``/proc``)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def proxy_cpu(pid: int, calls: int, timed: Awaitable[float]) -> tuple[float, float]:
    """Seconds per call of ``timed``, and the proxy's CPU seconds per call meanwhile."""
    before = cpu_seconds(pid)
    seconds = await timed
    return seconds, (cpu_seconds(pid) - before) / calls


async def measure(node: str, url: str, token: str, verifier: Verifier, calls: int,
                  rounds: int, pid: int) -> dict[str, float]:
    times: dict[str, list[float]] = {"direct": [], "proxied": [], "floor": [], "free": [],
                                     "proxied_cpu": [], "free_cpu": [], "floor_cpu": []}
    upstream = StdioServerParameters(command=node, args=[str(EVERYTHING), "stdio"])
    with open(os.devnull, "w") as quiet:
        async with httpx2.AsyncClient() as web, \
                Client(stdio_client(upstream, errlog=quiet), cache=None) as direct, \
                Client(streamable_http_client(url, http_client=web), cache=None) as proxied:
            await per_call(direct, 20)  # warm up both paths
            await per_call(proxied, 20, token=token)
            for _ in range(rounds):
                times["direct"].append(await per_call(direct, calls))
                for name, timed in (("proxied", per_call(proxied, calls, token=token)),
                                    ("free", per_call(proxied, calls, free=True))):
                    seconds, cpu = await proxy_cpu(pid, calls, timed)
                    times[name].append(seconds)
                    times[f"{name}_cpu"].append(cpu)
                seconds, cpu = verifier_floor(verifier, token, calls)
                times["floor"].append(seconds)
                times["floor_cpu"].append(cpu)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description="paid call via mcpbill proxy vs direct")
    parser.add_argument("--calls", type=int, default=100, help="calls per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    node = shutil.which("node")
    if node is None or not EVERYTHING.exists():
        raise SystemExit("needs node and the reference server: run `npm ci`")
    with tempfile.TemporaryDirectory(prefix="mcpbill-bench-") as root:
        settings = make_home(Path(root))
        token = issue(settings, 100_000_000)
        port = free_port()
        with (Path(root) / "proxy.log").open("w") as log:
            proxy = start_proxy(settings, node, port, log)
            verifier = Verifier.from_settings(settings)
            try:
                median = anyio.run(measure, node, f"http://127.0.0.1:{port}/mcp", token,
                                   verifier, args.calls, args.rounds, proxy.pid)
            finally:
                verifier.close()
                proxy.terminate()
                proxy.wait(30)
    direct, proxied, floor = median["direct"], median["proxied"], median["floor"]
    print(f"reference server over stdio, SQLite ledger, {args.rounds} rounds x {args.calls} calls")
    print(f"direct call (client -> upstream)        {direct * 1000:8.3f} ms/call")
    print(f"paid call via mcpbill proxy             {proxied * 1000:8.3f} ms/call")
    print(f"free call via the proxy (the hop alone) {median['free'] * 1000:8.3f} ms/call")
    print(f"verifier floor (begin + capture alone)  {floor * 1000:8.3f} ms/call")
    billing = proxied - median["free"]
    print(f"billing's share (paid - free)           {billing * 1000:8.3f} ms/call "
          f"= {billing / floor:.2f}x the verifier floor")
    print(f"proxy's CPU per paid call               {median['proxied_cpu'] * 1000:8.3f} ms")
    print(f"proxy's CPU per free call               {median['free_cpu'] * 1000:8.3f} ms")
    billing_cpu = median["proxied_cpu"] - median["free_cpu"]
    print(f"billing's CPU share (paid - free)       {billing_cpu * 1000:8.3f} ms "
          f"= {billing_cpu / median['floor_cpu']:.2f}x the verifier floor's CPU "
          f"({median['floor_cpu'] * 1000:.3f} ms)")
    print(f"proxied / direct                        {proxied / direct:8.2f}x")
    print(f"proxied / (direct + floor)              {proxied / (direct + floor):8.2f}x  "
          "(goal <= 1.30x)")


if __name__ == "__main__":
    main()

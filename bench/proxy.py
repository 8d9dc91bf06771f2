"""A paid call through ``mcpbill proxy`` against the same call sent straight to the upstream.

The upstream is the official TypeScript reference server (``npm ci`` installs it), its
``echo`` tool, in two set-ups measured in the same run:

- stdio: the reference server run over stdio; the proxy started with ``--upstream-cmd``;
- HTTP: the reference server run over streamable HTTP; the proxy started with ``--upstream
  URL``. The direct call makes an HTTP request too, so this is the like-for-like hop for
  operators of an HTTP upstream.

In each, rounds alternate between:

- direct: the official Python client talking to the reference server (stdio, or streamable
  HTTP);
- proxied: the same client talking streamable HTTP to ``mcpbill proxy`` (a process of its own),
  each call a paid call: token checked, held, forwarded, captured, a signed receipt in
  ``_meta`` (SQLite ledger, demo mode);
- free: an unbilled call (``get-sum``, priced 0) through the same proxy: the HTTP hop alone;
- the verifier's floor: the verifier's own begin (hold) + capture called directly in a tight
  loop, on the same ledger: what billing a call costs with no MCP, HTTP or upstream around it.

Prints the median per call of each and proxied / (direct + floor) (goal <= 1.3x), the proxy
process's own CPU per paid and per free call (its user + system time from ``/proc`` across each
round, on Linux), and this process's CPU per call, the client's: on a machine shared with other
work the wall times stretch, CPU per call much less. Over stdio the proxy adds a whole HTTP hop
the direct call does not make, so that ratio also holds the hop's cost, on both sides of it: the
client's streamable HTTP transport costs it more CPU per call than stdio, and that is the
client's, not the proxy's. Paid minus free, beside the verifier's floor, is what billing itself
adds to a proxied call.

Usage: python bench/proxy.py [--calls N] [--rounds R]
"""

from __future__ import annotations

import argparse
import collections
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
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Setup:
    """One way to reach the upstream: ``name`` as printed, the direct client's transport, and
    the proxy's upstream options."""

    name: str
    direct: Callable[[], Any]
    upstream: list[str]


def start_proxy(settings: Any, upstream: list[str], port: int, log: Any
                ) -> subprocess.Popen[bytes]:
    env = {**os.environ, ENV_HOME: str(settings.home), ENV_MODE: "demo"}
    proxy = subprocess.Popen(
        [sys.executable, "-m", "mcpbill_cli", "proxy", "--listen", f"127.0.0.1:{port}",
         *upstream], env=env, stdout=log, stderr=log)
    wait_for(port, proxy, "mcpbill proxy")
    return proxy


def start_http_upstream(node: str, port: int) -> subprocess.Popen[bytes]:
    """The reference server over streamable HTTP on ``port``."""
    server = subprocess.Popen([node, str(EVERYTHING), "streamableHttp"],
                              env={**os.environ, "PORT": str(port)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(port, server, "the reference server")
    return server


def wait_for(port: int, process: subprocess.Popen[bytes], name: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{name} exited: see its log")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{name} did not listen")


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


async def cpu_per_call(pid: int, calls: int, timed: Awaitable[float]
                       ) -> tuple[float, float, float]:
    """Seconds per call of ``timed``, and the CPU seconds per call meanwhile of the proxy and of
    this process (the client's)."""
    before, client = cpu_seconds(pid), time.process_time()
    seconds = await timed
    return (seconds, (cpu_seconds(pid) - before) / calls,
            (time.process_time() - client) / calls)


@asynccontextmanager
async def clients(setup: Setup, url: str, web: httpx2.AsyncClient
                  ) -> AsyncIterator[tuple[Client, Client]]:
    """The direct client of ``setup`` and a client of its proxy at ``url``."""
    async with Client(setup.direct(), cache=None) as direct, \
            Client(streamable_http_client(url, http_client=web), cache=None) as proxied:
        yield direct, proxied


async def one_round(times: dict[str, list[float]], name: str, direct: Client, proxied: Client,
                    token: str, calls: int, pid: int) -> None:
    """A round of direct, paid and free calls of one setup, into ``times`` under ``name``."""
    seconds, _, client = await cpu_per_call(pid, calls, per_call(direct, calls))
    times[f"{name} direct"].append(seconds)
    times[f"{name} direct client_cpu"].append(client)
    for kind, timed in (("proxied", per_call(proxied, calls, token=token)),
                        ("free", per_call(proxied, calls, free=True))):
        seconds, cpu, client = await cpu_per_call(pid, calls, timed)
        times[f"{name} {kind}"].append(seconds)
        times[f"{name} {kind}_cpu"].append(cpu)
        times[f"{name} {kind} client_cpu"].append(client)


async def measure(setups: list[tuple[Setup, str, int]], token: str, verifier: Verifier,
                  calls: int, rounds: int) -> dict[str, float]:
    """Medians per call of every setup's rounds (each setup: its proxy's URL and pid) and of
    the verifier's floor."""
    times: dict[str, list[float]] = collections.defaultdict(list)
    async with httpx2.AsyncClient() as web, AsyncExitStack() as stack:
        opened = []
        for setup, url, pid in setups:
            direct, proxied = await stack.enter_async_context(clients(setup, url, web))
            await per_call(direct, 20)  # warm up both paths
            await per_call(proxied, 20, token=token)
            opened.append((setup.name, direct, proxied, pid))
        for _ in range(rounds):
            for name, direct, proxied, pid in opened:
                await one_round(times, name, direct, proxied, token, calls, pid)
            seconds, cpu = verifier_floor(verifier, token, calls)
            times["floor"].append(seconds)
            times["floor_cpu"].append(cpu)
    return {name: statistics.median(values) for name, values in times.items()}


def report(name: str, median: dict[str, float]) -> None:
    """The figures of one setup, its ratio against the direct call plus the verifier's floor."""
    direct, proxied, free = (median[f"{name} {kind}"] for kind in ("direct", "proxied", "free"))
    floor = median["floor"]
    print(f"-- upstream over {name}")
    print(f"direct call (client -> upstream)        {direct * 1000:8.3f} ms/call")
    print(f"paid call via mcpbill proxy             {proxied * 1000:8.3f} ms/call")
    print(f"free call via the proxy (the hop alone) {free * 1000:8.3f} ms/call")
    print(f"verifier floor (begin + capture alone)  {floor * 1000:8.3f} ms/call")
    billing = proxied - free
    print(f"billing's share (paid - free)           {billing * 1000:8.3f} ms/call "
          f"= {billing / floor:.2f}x the verifier floor")
    print(f"proxy's CPU per paid call               {median[f'{name} proxied_cpu'] * 1000:8.3f} ms")
    print(f"proxy's CPU per free call               {median[f'{name} free_cpu'] * 1000:8.3f} ms")
    billing_cpu = median[f"{name} proxied_cpu"] - median[f"{name} free_cpu"]
    print(f"billing's CPU share (paid - free)       {billing_cpu * 1000:8.3f} ms "
          f"= {billing_cpu / median['floor_cpu']:.2f}x the verifier floor's CPU "
          f"({median['floor_cpu'] * 1000:.3f} ms)")
    print("client's CPU per call: direct "
          f"{median[f'{name} direct client_cpu'] * 1000:.3f} ms, paid via the proxy "
          f"{median[f'{name} proxied client_cpu'] * 1000:.3f} ms, free via the proxy "
          f"{median[f'{name} free client_cpu'] * 1000:.3f} ms")
    print(f"proxied / direct                        {proxied / direct:8.2f}x")
    print(f"proxied / (direct + floor)              {proxied / (direct + floor):8.2f}x  "
          "(goal <= 1.30x)")


def main() -> None:
    parser = argparse.ArgumentParser(description="paid call via mcpbill proxy vs direct")
    parser.add_argument("--calls", type=int, default=100, help="calls per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    node = shutil.which("node")
    if node is None or not EVERYTHING.exists():
        raise SystemExit("needs node and the reference server: run `npm ci`")
    with tempfile.TemporaryDirectory(prefix="mcpbill-bench-") as root, \
            open(os.devnull, "w") as quiet, (Path(root) / "proxy.log").open("w") as log:
        settings = make_home(Path(root))
        token = issue(settings, 100_000_000)
        upstream_port = free_port()
        upstream_url = f"http://127.0.0.1:{upstream_port}/mcp"
        setups = [
            Setup("stdio", lambda: stdio_client(StdioServerParameters(
                command=node, args=[str(EVERYTHING), "stdio"]), errlog=quiet),
                ["--upstream-cmd", f"{node} {EVERYTHING} stdio"]),
            Setup("HTTP", lambda: streamable_http_client(upstream_url),
                  ["--upstream", upstream_url])]
        processes = [start_http_upstream(node, upstream_port)]
        verifier = Verifier.from_settings(settings)
        try:
            running = []
            for setup in setups:
                port = free_port()
                processes.append(start_proxy(settings, setup.upstream, port, log))
                running.append((setup, f"http://127.0.0.1:{port}/mcp", processes[-1].pid))
            median = anyio.run(measure, running, token, verifier, args.calls, args.rounds)
        finally:
            verifier.close()
            for process in reversed(processes):
                process.terminate()
                process.wait(30)
    print(f"reference server, SQLite ledger, {args.rounds} rounds x {args.calls} calls")
    for setup in setups:
        report(setup.name, median)


if __name__ == "__main__":
    main()

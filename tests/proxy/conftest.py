"""Fixtures for the proxy tests: ``mcpbill proxy`` in front of the official TypeScript reference
server (``@modelcontextprotocol/server-everything`` from npm), driven by the official Python
``mcp`` client over streamable HTTP, billing on a real ledger (SQLite and PostgreSQL).

- the proxy runs in process under uvicorn in a thread (its verifier is this test's);
- ``stdio``: the proxy starts the reference server itself (``--upstream-cmd``), one child per
  agent session, through ``sh`` so a test can read the latest child's pid and kill it mid-call;
- ``http``: the reference server over streamable HTTP, started once per test session.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import CallToolResult

from mcpbill_cli.config import Settings
from mcpbill_cli.mcp import TOKEN_META
from mcpbill_cli.pricing import save_pricing_text
from mcpbill_cli.proxy import Limits, Proxy, Upstream, UpstreamTarget, build_app
from mcpbill_cli.proxy.upstream import MAX_SESSIONS
from mcpbill_cli.verifier import Verifier
from tests.mcp import conftest as mcp_fixtures
from tests.mcp.conftest import serve
from tests.mcp.test_http import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[2]
EVERYTHING = (ROOT / "node_modules" / "@modelcontextprotocol" / "server-everything" / "dist"
              / "index.js")
NODE = shutil.which("node")

PRICING = '''\
version = 1
currency = "USDC"
dedupe_window = "10s"

[tools.echo]
price = "0.002"

[tools."trigger-long-running-operation"]
price = "0.005"

[tools."get-sum"]
price = "0"

[tools."trigger-sampling-request"]
price = "0.003"

[tools."trigger-elicitation-request"]
price = "0"

[tools."get-roots-list"]
price = "0"

[tools."toggle-subscriber-updates"]
price = "0"

[tools."toggle-simulated-logging"]
price = "0"

[tools."gzip-file-as-resource"]
price = "0"
'''

# The MCP tests' fixtures: an initialized demo home on this test's ledger, tokens, a verifier.
home = mcp_fixtures.home
mint = mcp_fixtures.mint
verifier = mcp_fixtures.verifier

if NODE is None or not EVERYTHING.exists():
    pytest.skip("the reference server is not installed: run `npm ci`", allow_module_level=True)


@dataclass
class Agent:
    """An MCP client connected to the proxy; ``meta`` goes with every call."""

    client: Client
    meta: dict[str, Any] = field(default_factory=dict)

    async def call(self, tool: str, args: dict[str, Any] | None = None,
                   **kw: Any) -> CallToolResult:
        meta = {**self.meta, **kw.pop("meta", {})} or None
        return await self.client.call_tool(tool, args or {}, meta=meta, **kw)  # type: ignore[arg-type]


Connect = Callable[..., AbstractAsyncContextManager[Agent]]


@dataclass
class Running:
    """A proxy serving on ``url``; ``pidfile`` names the stdio upstream's pid (stdio only)."""

    proxy: Proxy
    url: str
    pidfile: Path | None

    def connect(self, token: str | None = None) -> AbstractAsyncContextManager[Agent]:
        return agent(self.url, token)


@asynccontextmanager
async def agent(url: str, token: str | None) -> AsyncIterator[Agent]:
    """The official client on the proxy, ``token`` in each call's ``_meta``."""
    async with httpx2.AsyncClient(timeout=60) as web, \
            Client(streamable_http_client(url, http_client=web), cache=None) as client:
        yield Agent(client, {TOKEN_META: token} if token else {})


@pytest.fixture
def priced(home: Settings) -> Settings:
    """The home with the proxy tests' pricing table (echo paid, get-sum free, no default)."""
    save_pricing_text(home.pricing_path, PRICING)
    return home


@pytest.fixture(scope="session")
def everything_http() -> Iterator[str]:
    """The reference server over streamable HTTP, for the whole session."""
    port = free_port()
    server = subprocess.Popen([str(NODE), str(EVERYTHING), "streamableHttp"],
                              env={"PATH": "/usr/bin:/bin", "PORT": str(port)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, server)  # type: ignore[arg-type]
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        server.terminate()
        server.wait(30)


def stdio_target(pidfile: Path) -> UpstreamTarget:
    command = f'sh -c \'echo $$ > "{pidfile}"; exec "{NODE}" "{EVERYTHING}" stdio\''
    return UpstreamTarget.parse(command=command, url=None)


@pytest.fixture(params=["stdio", "http"])
def upstream_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def limits() -> Limits:
    return Limits(call_timeout=30.0, max_concurrent=8, max_request_bytes=64 * 1024)


@pytest.fixture
def max_sessions() -> int:
    """Upstream sessions open at once (parametrize to change)."""
    return MAX_SESSIONS


@pytest.fixture
def running(priced: Settings, verifier: Verifier, limits: Limits, upstream_kind: str,
            max_sessions: int, request: pytest.FixtureRequest,
            tmp_path: Path) -> Iterator[Running]:
    """The proxy on this test's ledger, in front of the reference server."""
    pidfile = tmp_path / "upstream.pid" if upstream_kind == "stdio" else None
    target = (stdio_target(pidfile) if pidfile is not None
              else UpstreamTarget.parse(command=None,
                                        url=request.getfixturevalue("everything_http")))
    with (tmp_path / "upstream.log").open("w") as errlog:
        upstream = Upstream(target, connect_timeout=30, max_sessions=max_sessions, errlog=errlog)
        proxy = Proxy(verifier, upstream, limits)
        with serve(build_app(proxy)) as url:
            yield Running(proxy, url, pidfile)

"""Fixtures for the MCP tests: the example server, billed by a real verifier on a real ledger,
reached by the real MCP client over each transport.

- ``memory``: ``Client(server)`` in process; the token travels in ``_meta["dev.mcpbill/token"]``;
- ``http``: the server's streamable HTTP app under uvicorn in a thread, on 127.0.0.1 and an
  ephemeral port; the token travels in ``_meta`` too (``Authorization: Bearer`` is read only
  where mcpbill is configured as the server's authorization: ``test_authorization.py``);
- ``stdio``: ``python examples/paid_server.py`` as a subprocess on the same home and ledger;
  the token travels in ``AGENT_CREDIT_JWT``, as an agent host would launch it. A server process
  takes seconds to start (it imports the MCP SDK), so stdio has its own, fewer tests.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx2
import pytest
import uvicorn
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import MCPServer
from mcp_types import CallToolResult
from sqlalchemy import Engine

from mcpbill_cli.clock import utcnow
from mcpbill_cli.config import ENV_DB_URL, ENV_HOME, ENV_MODE, ENV_TOKEN, Settings, load_settings
from mcpbill_cli.keys import KeyRing
from mcpbill_cli.ledger import credit, invariants
from mcpbill_cli.ledger.credit import IssuedToken, TokenView
from mcpbill_cli.ledger.engine import reading, writing
from mcpbill_cli.mcp import RECEIPT_META, TOKEN_META, Billing
from mcpbill_cli.money import parse_usd
from mcpbill_cli.setup import initialize
from mcpbill_cli.verifier import Verifier

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "paid_server.py"
TRANSPORTS = ["memory", "http"]
TENANT_FUNDS = 10_000_000

Mint = Callable[..., IssuedToken]


def load_example() -> ModuleType:
    """examples/paid_server.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("paid_server_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Agent:
    """An MCP client as an agent uses it: every call carries ``meta`` (the token, in process)."""

    client: Client
    meta: dict[str, Any] = field(default_factory=dict)

    async def call(self, tool: str, args: dict[str, Any] | None = None,
                   **meta: Any) -> CallToolResult:
        sent = {**self.meta, **meta}
        return await self.client.call_tool(tool, args or {}, meta=sent or None)  # type: ignore[arg-type]


Connect = Callable[[str], AbstractAsyncContextManager[Agent]]


def receipt_of(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, result
    assert result.meta is not None and RECEIPT_META in result.meta, result
    return dict(result.meta[RECEIPT_META])


def forged_token(token: str) -> str:
    """``token`` with one character of its signature changed, in the middle: the last characters
    of an Ed25519 signature carry few bits (S < 2**253, and the last character has spare bits),
    so a change there can decode to the very same signature."""
    middle = len(token) - 40
    return token[:middle] + ("A" if token[middle] != "A" else "B") + token[middle + 1:]


def refusal_of(result: CallToolResult) -> dict[str, Any]:
    """The error object an agent reads from ``content[0].text`` alone (checked against the rest)."""
    assert result.is_error, result
    body: dict[str, Any] = json.loads(result.content[0].text)  # type: ignore[union-attr]
    assert result.structured_content == body
    assert RECEIPT_META not in (result.meta or {})
    return body


def usd(text: str) -> int:
    return parse_usd(text, allow_zero=True)


# --- the home, the ledger and tokens ---------------------------------------------------------


@pytest.fixture
def home(isolated_home: Path, db_url: str, engine: Engine) -> Settings:
    """An initialized demo-mode home on this test's ledger (SQLite or PostgreSQL)."""
    settings = load_settings(home=isolated_home, db_url=db_url, mode="demo")
    initialize(settings, alg="EdDSA", mode="demo", force=False)
    with writing(engine) as conn:
        credit.fund_demo(conn, "default", TENANT_FUNDS, now=utcnow())
    return settings


@pytest.fixture
def mint(home: Settings, engine: Engine) -> Mint:
    """``mint(limit="0.05", scope=None)``: a credit token of tenant ``default``."""
    signer = KeyRing.load(home.keys_dir).signing_key()

    def issue(limit: str = "0.05", scope: list[str] | None = None,
              agent: str = "agent-1") -> IssuedToken:
        request = credit.IssueRequest(tenant="default", agent=agent, limit=usd(limit), ttl=3600,
                                      scope=scope, audience=home.audience, issuer=home.issuer,
                                      demo=True)
        with writing(engine) as conn:
            return credit.issue(conn, request, signer=signer, ttl_cap=home.ttl_cap,
                                now=utcnow())

    return issue


def token_view(engine: Engine, token: IssuedToken) -> TokenView:
    with reading(engine) as conn:
        return credit.show(conn, token.claims.jti, now=utcnow())


def assert_ledger_sound(engine: Engine) -> None:
    with reading(engine) as conn:
        assert invariants.check(conn) == []


def assert_paid_search(result: CallToolResult, token: IssuedToken, verifier: Verifier,
                       engine: Engine) -> None:
    """A first paid ``search`` of "usdc" on a 0.05 token: its results, a receipt that verifies,
    the token debited once, the ledger sound."""
    assert result.structured_content == {"result": ["usdc: result 1", "usdc: result 2",
                                                    "usdc: result 3"]}
    receipt = verifier.verify_receipt(receipt_of(result)["jws"])
    assert receipt.claims["tool"] == "search" and receipt.amount == usd("0.002")
    assert receipt.claims["jti"] == token.claims.jti
    assert receipt.remaining == usd("0.048") == token_view(engine, token).remaining
    assert token_view(engine, token).spent == usd("0.002")
    assert_ledger_sound(engine)


def revoke(engine: Engine, token: IssuedToken) -> None:
    with writing(engine) as conn:
        credit.revoke(conn, [token.claims.jti], reason="test", clock=utcnow)


@pytest.fixture
def verifier(home: Settings, engine: Engine) -> Iterator[Verifier]:
    verifier = Verifier.from_settings(home, engine=engine)
    yield verifier
    verifier.close()


@pytest.fixture
def server(verifier: Verifier) -> MCPServer:
    server: MCPServer = load_example().build_server(Billing(verifier))
    return server


# --- transports --------------------------------------------------------------------------------


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """``app``'s streamable HTTP endpoint, served by uvicorn in a thread until the block ends."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    runner = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=runner.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not runner.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/mcp"
    finally:
        runner.should_exit = True
        thread.join(10)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"


@pytest.fixture
def http_url(server: MCPServer) -> Iterator[str]:
    """The server's streamable HTTP endpoint, served by uvicorn in a thread until teardown."""
    with serve(server.streamable_http_app()) as url:
        yield url


MCP_HEADERS = {"Accept": "application/json, text/event-stream",
               "Content-Type": "application/json"}


def rpc(web: httpx2.Client, url: str, message: dict[str, Any]) -> httpx2.Response:
    return web.post(url, json={"jsonrpc": "2.0", **message})


def reply(response: httpx2.Response) -> dict[str, Any]:
    """The JSON-RPC reply in a JSON or an SSE response body."""
    assert response.status_code == 200, response.text
    if response.headers["content-type"].startswith("application/json"):
        return dict(response.json())
    data = [line[5:] for line in response.text.splitlines() if line.startswith("data:")]
    return dict(json.loads(data[-1]))


def tool_call(number: int, tool: str, args: dict[str, Any], token: str) -> dict[str, Any]:
    """A ``tools/call`` request, as a raw JSON-RPC message, carrying ``token`` in ``_meta``."""
    return {"id": number, "method": "tools/call",
            "params": {"name": tool, "arguments": args, "_meta": {TOKEN_META: token}}}


@contextmanager
def raw_session(url: str, headers: dict[str, str] | None = None) -> Iterator[httpx2.Client]:
    """A streamable HTTP session opened by hand (so a test can resend a JSON-RPC id), with
    ``headers`` on every request; closed when the block ends."""
    with httpx2.Client(headers={**MCP_HEADERS, **(headers or {})}, timeout=30) as web:
        opened = rpc(web, url, {"id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {},
            "clientInfo": {"name": "raw", "version": "1"}}})
        web.headers.update({"mcp-session-id": opened.headers["mcp-session-id"],
                            "mcp-protocol-version": "2025-11-25"})
        rpc(web, url, {"method": "notifications/initialized"})
        yield web
        web.delete(url)


def stdio_parameters(home: Settings, token: str | None) -> StdioServerParameters:
    env = {ENV_HOME: str(home.home), ENV_DB_URL: home.db_url, ENV_MODE: "demo",
           "PYTHONPATH": str(ROOT)}
    if token is not None:
        env[ENV_TOKEN] = token
    return StdioServerParameters(command=sys.executable, args=[str(EXAMPLE)], env=env)


@asynccontextmanager
async def stdio_agent(home: Settings, token: str | None, errlog: Path) -> AsyncIterator[Agent]:
    """A session with a fresh ``examples/paid_server.py`` subprocess (``token`` in its env)."""
    with errlog.open("a") as log:
        async with Client(stdio_client(stdio_parameters(home, token), errlog=log),
                          read_timeout_seconds=60) as client:
            yield Agent(client)


@pytest.fixture(params=TRANSPORTS)
def connect(request: pytest.FixtureRequest) -> Connect:
    """``async with connect(token) as agent``: an MCP session over this test's transport."""
    transport: str = request.param

    @asynccontextmanager
    async def memory(token: str) -> AsyncIterator[Agent]:
        async with Client(request.getfixturevalue("server")) as client:
            yield Agent(client, {TOKEN_META: token})

    @asynccontextmanager
    async def http(token: str) -> AsyncIterator[Agent]:
        url = request.getfixturevalue("http_url")
        async with httpx2.AsyncClient() as web:
            async with Client(streamable_http_client(url, http_client=web)) as client:
                yield Agent(client, {TOKEN_META: token})

    return {"memory": memory, "http": http}[transport]

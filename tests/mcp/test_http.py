"""Streamable HTTP specifics: where the token comes from, and a resent request in a session."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import CallToolResult
from sqlalchemy import Engine

from mcpbill_cli.config import ENV_TOKEN, Settings
from mcpbill_cli.mcp import TOKEN_META

from .conftest import (
    EXAMPLE,
    Mint,
    raw_session,
    receipt_of,
    refusal_of,
    reply,
    rpc,
    stdio_parameters,
    token_view,
    tool_call,
    usd,
)


async def call(url: str, headers: dict[str, str], tool: str, args: dict[str, Any],
               meta: dict[str, Any] | None = None) -> CallToolResult:
    async with httpx2.AsyncClient(headers=headers) as web, \
            Client(streamable_http_client(url, http_client=web)) as client:
        return await client.call_tool(tool, args, meta=meta)  # type: ignore[arg-type]


def test_an_http_server_never_bills_its_own_environment_token(
        http_url: str, mint: Mint, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    token = mint()
    monkeypatch.setenv(ENV_TOKEN, token.token)  # the server process's env, not the caller's
    refused = anyio.run(call, http_url, {}, "search", {"q": "free ride?"})
    error = refusal_of(refused)
    assert (error["code"], error["reason"]) == ("INVALID_CREDIT_TOKEN", "missing")
    assert token_view(engine, token).spent == 0


def test_a_request_resent_in_the_same_session_is_billed_once(
        http_url: str, mint: Mint, engine: Engine) -> None:
    token = mint()
    with raw_session(http_url) as web:
        search = tool_call(7, "search", {"q": "lost reply"}, token.token)
        first, resent = reply(rpc(web, http_url, search)), reply(rpc(web, http_url, search))
    receipt = first["result"]["_meta"]["dev.mcpbill/receipt"]
    assert resent["result"]["_meta"]["dev.mcpbill/receipt"] == receipt
    assert token_view(engine, token).spent == usd("0.002")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the subprocess is what is new
def test_the_example_serves_streamable_http_from_the_command_line(
        home: Settings, mint: Mint, engine: Engine, tmp_path: Path) -> None:
    token = mint()
    port = free_port()
    parameters = stdio_parameters(home, None)
    env = {**parameters.env, "PATH": "/usr/bin:/bin"}  # type: ignore[dict-item]
    with (tmp_path / "server.log").open("w") as log:
        server = subprocess.Popen([sys.executable, str(EXAMPLE), "--http", "--port", str(port)],
                                  env=env, stdout=log, stderr=log)
        try:
            url = f"http://127.0.0.1:{port}/mcp"
            wait_for_port(port, server)
            result = anyio.run(call, url, {}, "search", {"q": "over http"},
                               {TOKEN_META: token.token})
        finally:
            server.terminate()
            server.wait(30)
    assert receipt_of(result)["amountUsd"] == "0.002"
    assert token_view(engine, token).spent == usd("0.002")


def wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, "the example server exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on port {port}")

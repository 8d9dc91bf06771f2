"""`mcpbill proxy --trace` as an operator runs it: spans exported as the standard OTEL_*
variables say (here the SDK's console exporter, on the proxy's stdout), joined to the trace
the agent sent in ``_meta["traceparent"]``."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import Engine
from typer.testing import CliRunner

from mcpbill_cli.cli import app
from mcpbill_cli.config import ENV_DB_URL, ENV_HOME, ENV_MODE, Settings
from tests.mcp.conftest import Mint, receipt_of, token_view, usd
from tests.mcp.test_http import free_port, wait_for_port

from .conftest import EVERYTHING, NODE, agent
from .test_tracing import CLIENT_SPAN, TRACE_ID, TRACEPARENT


def exported_spans(text: str) -> list[dict[str, Any]]:
    """The spans the console exporter printed: JSON objects, one after another."""
    decoder = json.JSONDecoder()
    spans, at = [], text.find("{")
    while at != -1:
        span, end = decoder.raw_decode(text, at)
        spans.append(span)
        at = text.find("{", end)
    return spans


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # tracing is what is new
def test_trace_exports_spans_that_join_the_agents_trace(priced: Settings, mint: Mint,
                                                        engine: Engine, tmp_path: Path) -> None:
    token = mint()
    port = free_port()
    env = {ENV_HOME: str(priced.home), ENV_DB_URL: priced.db_url, ENV_MODE: "demo",
           "PATH": "/usr/bin:/bin", "OTEL_TRACES_EXPORTER": "console"}
    with (tmp_path / "proxy.log").open("w") as log, (tmp_path / "spans.json").open("w") as out:
        proxy = subprocess.Popen(
            [sys.executable, "-m", "mcpbill_cli", "proxy", "--listen", f"127.0.0.1:{port}",
             "--upstream-cmd", f"{NODE} {EVERYTHING} stdio", "--trace"],
            env=env, stdout=out, stderr=log)
        try:
            wait_for_port(port, proxy)
            anyio.run(call_traced, f"http://127.0.0.1:{port}/mcp", token.token)
            proxy.send_signal(signal.SIGTERM)
            assert proxy.wait(30) == 0, (tmp_path / "proxy.log").read_text()
        finally:
            proxy.kill()
            proxy.wait(30)
    assert token_view(engine, token).spent == usd("0.002")
    spans = exported_spans((tmp_path / "spans.json").read_text())
    [call] = [span for span in spans if span["name"] == "mcpbill.call"]
    assert call["context"]["trace_id"] == f"0x{TRACE_ID}"
    assert call["attributes"] == {"mcpbill.tool": "echo", "mcpbill.outcome": "captured",
                                  "mcpbill.amount": usd("0.002")}
    assert call["resource"]["attributes"]["service.name"] == "mcpbill-proxy"
    by_id = {span["context"]["span_id"]: span for span in spans}
    parent = by_id[call["parent_id"]]  # the SDK's server span, the child of the agent's
    assert parent["context"]["trace_id"] == f"0x{TRACE_ID}"
    assert parent["parent_id"] == f"0x{CLIENT_SPAN}"
    steps = {span["name"] for span in spans if span["parent_id"] == call["context"]["span_id"]}
    # The hold, the forward to the upstream (the SDK client's span) and the capture.
    assert {"mcpbill.hold", "MCP send tools/call echo", "mcpbill.capture"} <= steps


async def call_traced(url: str, token: str) -> None:
    async with agent(url, token) as client:
        assert receipt_of(await client.call("echo", {"message": "traced"},
                                            meta={"traceparent": TRACEPARENT}))


def test_an_exporter_nobody_installed_is_refused_with_a_code(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin_json")
    result = CliRunner().invoke(app, ["proxy", "--json", "--trace", "--upstream-cmd",
                                      "node x.js", "--listen", f"127.0.0.1:{free_port()}"])
    assert result.exit_code == 10, result.output
    [error] = json.loads(result.stdout)["errors"]
    assert (error["code"], error["field"]) == ("CONFIG_INVALID", "OTEL_TRACES_EXPORTER")
    assert "zipkin_json" in error["message"]

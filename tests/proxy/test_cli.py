"""`mcpbill proxy` as an operator runs it: a process in front of the reference server, stopped
with SIGTERM while a paid call is in flight (the call's hold is voided)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from sqlalchemy import Engine
from typer.testing import CliRunner

from mcpbill_cli.cli import app
from mcpbill_cli.config import ENV_DB_URL, ENV_HOME, ENV_MODE, Settings
from tests.cli.data_contract import assert_contract
from tests.mcp.conftest import Mint, assert_ledger_sound, receipt_of, refusal_of, token_view, usd
from tests.mcp.test_http import free_port, wait_for_port

from .conftest import EVERYTHING, NODE, ROOT, Running, agent
from .test_metrics import scrape

EXAMPLE = ROOT / "examples" / "proxy_agent.py"


@pytest.mark.parametrize(("args", "field"), [
    ([], "upstream"),
    (["--upstream", "http://127.0.0.1:1/mcp", "--upstream-cmd", "node x.js"], "upstream"),
    (["--upstream", "ftp://example.com/mcp"], "upstream"),
    (["--upstream", "http://[::1/mcp"], "upstream"),  # an unclosed IPv6 address
    (["--upstream", "http://"], "upstream"),  # no host
    (["--upstream", "http://127.0.0.1:99999/mcp"], "upstream"),
    (["--upstream", "http://127.0.0.1:0/mcp"], "upstream"),
    (["--upstream-cmd", "node x.js", "--listen", "8080"], "listen"),
    (["--upstream-cmd", "node x.js", "--metrics", "9090"], "metrics"),
    (["--upstream-cmd", "no-such-program-7f3a --stdio"], "upstream-cmd"),
    (["--upstream-cmd", "/dev/null"], "upstream-cmd"),  # there, but not a program
    (["--upstream-cmd", "node 'unterminated"], "upstream-cmd"),  # no closing quote
    (["--upstream-cmd", "node x.js", "--call-timeout", "nan"], "call-timeout"),
    (["--upstream-cmd", "node x.js", "--call-timeout", "inf"], "call-timeout"),
    (["--upstream-cmd", "node x.js", "--session-idle-timeout", "nan"], "session-idle-timeout"),
    (["--upstream-cmd", "node x.js", "--session-idle-timeout", "inf"], "session-idle-timeout"),
])
def test_a_bad_command_line_is_refused_with_a_code(args: list[str], field: str) -> None:
    result = CliRunner().invoke(app, ["proxy", "--json", *args])
    assert result.exit_code == 3, result.output
    document = json.loads(result.stdout)
    assert document["errors"][0]["code"] == "INVALID_INPUT"
    assert document["errors"][0]["field"] == field


def run_proxy(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """``mcpbill proxy`` run as an operator runs it, to its end."""
    env = {ENV_HOME: str(settings.home), ENV_DB_URL: settings.db_url, ENV_MODE: "demo",
           "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "mcpbill_cli", "proxy", *args], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("option", ["listen", "metrics"])
def test_a_port_taken_is_refused_before_the_proxy_says_it_serves(priced: Settings,
                                                                   option: str) -> None:
    """A port another process listens on: one JSON document, the refusal naming the option
    and the address (never a document saying the proxy serves, then uvicorn's own error),
    exit 3, and the proxy's other port is let go."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port, other = taken.getsockname()[1], free_port()
        ports = {option: port, "metrics" if option == "listen" else "listen": other}
        ran = run_proxy(priced, "--json", "--listen", f"127.0.0.1:{ports['listen']}",
                        "--metrics", f"127.0.0.1:{ports['metrics']}",
                        "--upstream-cmd", f"{NODE} {EVERYTHING} stdio")
    assert ran.returncode == 3, ran.stderr
    document = json.loads(ran.stdout)  # the whole of stdout: one document
    assert (document["status"], document["data"]) == ("error", None)
    error = document["errors"][0]
    assert (error["code"], error["field"]) == ("INVALID_INPUT", option)
    assert f"--{option} 127.0.0.1:{port}: cannot listen there" in error["message"]
    assert "Traceback" not in ran.stderr and "ERROR" not in ran.stderr, ran.stderr
    with socket.socket() as again:
        again.bind(("127.0.0.1", other))  # not held by the proxy that refused to start


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("agents_host", ["127.0.0.1", "0.0.0.0"])  # noqa: S104
def test_metrics_on_the_agents_own_address_is_refused_before_the_proxy_says_it_serves(
        priced: Settings, agents_host: str) -> None:
    port = free_port()
    ran = run_proxy(priced, "--json", "--listen", f"{agents_host}:{port}", "--metrics",
                    f"127.0.0.1:{port}", "--upstream-cmd", f"{NODE} {EVERYTHING} stdio")
    assert ran.returncode == 3, ran.stderr
    document = json.loads(ran.stdout)  # the whole of stdout: one document
    assert (document["status"], document["errors"][0]["code"]) == ("error", "INVALID_INPUT")
    assert document["errors"][0]["field"] == "metrics"
    assert "Traceback" not in ran.stderr, ran.stderr
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))  # let go


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_port_taken_is_said_on_stderr_with_nothing_on_stdout(priced: Settings) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ran = run_proxy(priced, "--listen", f"127.0.0.1:{port}",
                        "--upstream-cmd", f"{NODE} {EVERYTHING} stdio")
    assert (ran.returncode, ran.stdout) == (3, ""), ran.stderr
    assert ran.stderr.startswith(f"error INVALID_INPUT: --listen 127.0.0.1:{port}: cannot "
                                 "listen there (Address already in use)"), ran.stderr


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["sqlite", "postgres"], indirect=True)
def test_the_proxy_bills_and_a_sigterm_voids_the_call_in_flight(
        priced: Settings, mint: Mint, engine: Engine, tmp_path: Path) -> None:
    paid, cut = mint(), mint(agent="agent-2")
    port, metrics_port = free_port(), free_port()
    env = {ENV_HOME: str(priced.home), ENV_DB_URL: priced.db_url, ENV_MODE: "demo",
           "PATH": "/usr/bin:/bin"}
    with (tmp_path / "proxy.log").open("w") as log, (tmp_path / "proxy.json").open("w") as out:
        proxy = subprocess.Popen(
            [sys.executable, "-m", "mcpbill_cli", "proxy", "--listen", f"127.0.0.1:{port}",
             "--upstream-cmd", f"{NODE} {EVERYTHING} stdio", "--json",
             "--metrics", f"127.0.0.1:{metrics_port}", "--max-response-bytes", "16384"],
            env=env, stdout=out, stderr=log)
        try:
            wait_for_port(port, proxy)
            where = json.loads((tmp_path / "proxy.json").read_text())["data"]  # set up first
            assert_contract(("proxy",), where)
            assert where["url"] == f"http://127.0.0.1:{port}/mcp"
            assert where["metrics_url"] == f"http://127.0.0.1:{metrics_port}/metrics"
            anyio.run(call_then_stop, where["url"], paid.token, cut.token, proxy,
                      where["metrics_url"])
            assert proxy.wait(30) == 0
        finally:
            proxy.kill()
            proxy.wait(30)
    assert token_view(engine, paid).spent == usd("0.002")
    assert (token_view(engine, cut).spent, token_view(engine, cut).held) == (0, 0)
    assert_ledger_sound(engine)
    logged = (tmp_path / "proxy.log").read_text()
    # The call cut off is a warning that says what became of it, not an error with a traceback.
    assert "call(s) still running after the grace period (5s) are cut off" in logged, logged
    assert "Traceback" not in logged and "ERROR" not in logged, logged


async def call_then_stop(url: str, paid: str, cut: str, proxy: subprocess.Popen[bytes],
                         metrics_url: str) -> None:
    async with agent(url, paid) as client:
        assert receipt_of(await client.call("echo", {"message": "via the CLI"}))["amountUsd"] \
            == "0.002"
        too_large = refusal_of(await client.call("echo", {"message": "x" * 20000}))
        assert (too_large["code"], too_large["limitBytes"]) == ("RESPONSE_TOO_LARGE", 16384)
    charged = ("mcpbill_charged_micro_usdc_total", (("tool", "echo"),))
    assert scrape(metrics_url)[charged] == usd("0.002")
    stopped = anyio.Event()

    async def progress(done: float, total: float | None, message: str | None) -> None:
        if not stopped.is_set():  # the paid call is running upstream: stop the proxy
            proxy.send_signal(signal.SIGTERM)
            stopped.set()

    with pytest.raises(Exception):  # noqa: B017, PT011 - the proxy went away mid-call
        async with agent(url, cut) as client:
            await client.call("trigger-long-running-operation", {"duration": 30, "steps": 30},
                              progress_callback=progress)
    assert stopped.is_set()


@pytest.mark.parametrize("upstream_kind", ["stdio"], indirect=True)
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the example is what is new
def test_the_example_agent_reads_prices_and_its_receipt(running: Running, mint: Mint,
                                                        engine: Engine) -> None:
    token = mint()
    ran = subprocess.run([sys.executable, str(EXAMPLE), running.url], capture_output=True,
                         text=True, timeout=120, check=False,
                         env={"PATH": "/usr/bin:/bin", "AGENT_CREDIT_JWT": token.token})
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    assert any(line.split() == ["echo", "0.002", "USDC"] for line in lines), ran.stdout
    assert any(line.split()[:2] == ["get-env", "no"] for line in lines), ran.stdout
    assert "echo: Echo: hello through the proxy" in lines
    assert any(line.startswith("receipt: ") and " 0.002 USDC, remaining 0.048" in line
               for line in lines), ran.stdout
    assert token_view(engine, token).spent == usd("0.002")

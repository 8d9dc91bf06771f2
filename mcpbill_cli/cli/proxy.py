"""`mcpbill proxy`: bill the tools of any MCP server by standing in front of it."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from mcpbill_cli.cli.output import JsonOption, envelope, handles_errors, print_json, say
from mcpbill_cli.cli.state import state


@handles_errors
def proxy(
    ctx: typer.Context,
    upstream: Annotated[str | None, typer.Option(
        "--upstream", metavar="URL",
        help="The MCP server to bill, over streamable HTTP, e.g. http://127.0.0.1:3001/mcp.")
    ] = None,
    upstream_cmd: Annotated[str | None, typer.Option(
        "--upstream-cmd", metavar="\"CMD ARGS\"",
        help="The MCP server to bill, over stdio: started and restarted by the proxy.")
    ] = None,
    listen: Annotated[str, typer.Option(
        "--listen", metavar="HOST:PORT", help="Where agents reach the proxy (path /mcp).")
    ] = "127.0.0.1:8080",
    call_timeout: Annotated[float, typer.Option(
        "--call-timeout", min=0.1, help="Seconds an upstream call may take; a call past it "
                                        "is voided (UPSTREAM_TIMEOUT).")] = 60.0,
    max_concurrent: Annotated[int, typer.Option(
        "--max-concurrent", min=1, help="Tool calls in flight at once; more are refused "
                                        "(PROXY_BUSY).")] = 64,
    max_request_bytes: Annotated[int, typer.Option(
        "--max-request-bytes", min=1024, help="The largest request body; larger ones are "
                                              "refused (REQUEST_TOO_LARGE).")] = 1024 * 1024,
    max_response_bytes: Annotated[int, typer.Option(
        "--max-response-bytes", min=1024,
        help="The largest upstream result relayed (its JSON); a larger one is not relayed, and "
             "a paid call is voided and refused (RESPONSE_TOO_LARGE).")] = 4 * 1024 * 1024,
    max_sessions: Annotated[int, typer.Option(
        "--max-sessions", min=1,
        help="Agent sessions served at once, each with an upstream session of its own (a child "
             "process with --upstream-cmd); the next is refused (PROXY_SESSIONS_FULL).")] = 64,
    session_idle_timeout: Annotated[float, typer.Option(
        "--session-idle-timeout", min=1.0,
        help="Seconds an agent session may sit idle before it ends, and its upstream session "
             "with it.")] = 30 * 60.0,
    metrics: Annotated[str | None, typer.Option(
        "--metrics", metavar="HOST:PORT",
        help="Serve Prometheus metrics at http://HOST:PORT/metrics: calls and refusals by tool "
             "and code, amount charged, holds open, hold-to-capture latency.")] = None,
    trace: Annotated[bool, typer.Option(
        "--trace", help="OpenTelemetry spans of each tool call, joined to the agent's trace "
                        "(_meta traceparent), exported as the OTEL_* variables say (default "
                        "OTLP over HTTP to localhost:4318). Needs mcpbill\\[otel].")] = False,
    as_json: JsonOption = False,
) -> None:
    """Serve an MCP endpoint that forwards to an upstream MCP server and bills its tool calls.

    Each tools/call is priced by the pricing table: a paid call needs a credit token
    (_meta "dev.mcpbill/token"; Authorization: Bearer only with \\[mcp] authorization = "bearer"
    in config.toml, for tokens issued to its resource), is held before it is forwarded, captured
    with a signed receipt when the upstream succeeds, and voided when it errs, times out or
    fails. Free tools and every other request pass through, each agent session to an upstream
    session of its own. Ctrl-C voids calls in flight.

    Example: mcpbill proxy --upstream-cmd "npx @modelcontextprotocol/server-everything"
    --listen 127.0.0.1:8080

    Needs the MCP SDK: pip install 'mcpbill\\[proxy]'.
    """
    from mcpbill_cli.proxy.run import ProxyOptions, serve

    host, port = _host_port(listen, "listen")
    options = ProxyOptions(upstream=upstream, upstream_cmd=upstream_cmd, host=host, port=port,
                           call_timeout=call_timeout, max_concurrent=max_concurrent,
                           max_request_bytes=max_request_bytes,
                           max_response_bytes=max_response_bytes, max_sessions=max_sessions,
                           session_idle_timeout=session_idle_timeout,
                           metrics=_host_port(metrics, "metrics") if metrics else None,
                           trace=trace)

    def announce(where: dict[str, str | None]) -> None:
        if as_json:  # the one document, printed once the proxy is set up
            print_json(envelope(where))
            sys.stdout.flush()
            return
        metrics_at = f"; metrics at {where['metrics_url']}" if where["metrics_url"] else ""
        say(f"mcpbill proxy: {where['url']} -> {where['upstream']}{metrics_at}")

    serve(state(ctx).settings, options, announce=announce)


def _host_port(value: str, option: str) -> tuple[str, int]:
    from mcpbill_cli.errors import InvalidInput

    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInput(f"--{option} must be HOST:PORT, e.g. 127.0.0.1:8080, not {value!r}",
                           field=option)
    return host.strip("[]"), int(port)

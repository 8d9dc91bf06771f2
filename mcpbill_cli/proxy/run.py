"""Run the proxy as a process: what ``mcpbill proxy`` starts (uvicorn, until a signal)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mcpbill_cli.config import Settings
from mcpbill_cli.proxy.billing import Limits
from mcpbill_cli.proxy.server import Proxy, build_app
from mcpbill_cli.proxy.upstream import Upstream, UpstreamTarget
from mcpbill_cli.verifier import Verifier

__all__ = ["ProxyOptions", "serve"]


@dataclass(frozen=True)
class ProxyOptions:
    """The command line of ``mcpbill proxy``."""

    upstream: str | None
    upstream_cmd: str | None
    host: str = "127.0.0.1"
    port: int = 8080
    call_timeout: float = 60.0
    max_concurrent: int = 64
    max_request_bytes: int = 1024 * 1024


def serve(settings: Settings, options: ProxyOptions,
          announce: Callable[[str], None] = print) -> None:
    """Serve until SIGINT or SIGTERM; on the way out, void the holds of calls cut off."""
    import uvicorn

    target = UpstreamTarget.parse(command=options.upstream_cmd, url=options.upstream)
    limits = Limits(call_timeout=options.call_timeout, max_concurrent=options.max_concurrent,
                    max_request_bytes=options.max_request_bytes)
    verifier = Verifier.from_settings(settings)
    try:
        proxy = Proxy(verifier, Upstream(target), limits)
        app = build_app(proxy, host=options.host)
        announce(f"mcpbill proxy: http://{options.host}:{options.port}/mcp -> "
                 f"{target.describe()}")
        uvicorn.run(app, host=options.host, port=options.port, log_level="warning",
                    timeout_graceful_shutdown=5)
    finally:
        verifier.close()

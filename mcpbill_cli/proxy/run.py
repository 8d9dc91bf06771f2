"""Run the proxy as a process: what ``mcpbill proxy`` starts (uvicorn, until a signal)."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from mcpbill_cli import metrics as prometheus
from mcpbill_cli import tracing
from mcpbill_cli.config import Settings
from mcpbill_cli.errors import InvalidInput
from mcpbill_cli.mcp.wire import authorization_resource
from mcpbill_cli.proxy.billing import Limits
from mcpbill_cli.proxy.server import Proxy, build_app
from mcpbill_cli.proxy.upstream import MAX_SESSIONS, Upstream, UpstreamTarget
from mcpbill_cli.verifier import Verifier
from mcpbill_cli.x402.accept import Acceptor, Unavailable

__all__ = ["ProxyOptions", "serve"]

log = logging.getLogger("mcpbill.proxy")

GRACE_SECONDS = 5  # on SIGTERM, calls in flight get this long to finish; the rest are voided


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
    max_response_bytes: int = 4 * 1024 * 1024
    max_sessions: int = MAX_SESSIONS
    session_idle_timeout: float = 30 * 60.0
    metrics: tuple[str, int] | None = None  # where to serve Prometheus metrics
    trace: bool = False  # OpenTelemetry spans, exported as the OTEL_* variables say


def serve(settings: Settings, options: ProxyOptions,
          announce: Callable[[dict[str, str | None]], None] = print) -> None:
    """Serve until SIGINT or SIGTERM; on the way out, void the holds of calls cut off.

    ``announce`` is told where the proxy serves (``url``, ``upstream``, ``metrics_url``)."""
    import uvicorn

    target = UpstreamTarget.parse(command=options.upstream_cmd, url=options.upstream)
    target.check_runnable()
    limits = Limits(call_timeout=options.call_timeout, max_concurrent=options.max_concurrent,
                    max_request_bytes=options.max_request_bytes,
                    max_response_bytes=options.max_response_bytes,
                    session_idle_timeout=options.session_idle_timeout)
    if options.metrics is not None:
        _apart(options.metrics, (options.host, options.port))
    listening = listen_on(options.host, options.port, "listen")  # taken before it is announced
    spans = verifier = scraper = None
    try:
        spans = tracing.export("mcpbill-proxy") if options.trace else None
        verifier = Verifier.from_settings(settings)
        metrics_url = None
        if options.metrics is not None:
            host, port = options.metrics
            scraper = _serve_metrics(verifier, host, port)
            metrics_url = f"http://{_url_host(host)}:{port}/metrics"
        proxy = Proxy(verifier, Upstream(target, max_sessions=options.max_sessions), limits,
                      resource=authorization_resource(settings), tracing=options.trace,
                      acceptor=_acceptor(verifier, settings))
        app = build_app(proxy, host=options.host)
        announce({"url": f"http://{_url_host(options.host)}:{options.port}/mcp",
                  "upstream": target.describe(), "metrics_url": metrics_url})
        server = uvicorn.Server(uvicorn.Config(
            app, log_level="warning",
            access_log=False,  # a line per request, below log_level all the same
            timeout_graceful_shutdown=GRACE_SECONDS))
        with _stopped_cleanly(), _cut_off_quietly():
            server.run(sockets=[listening])
    finally:
        listening.close()
        if scraper is not None:
            prometheus.stop(scraper)
        if verifier is not None:
            verifier.close()  # seals the last calls' events
        if spans is not None:
            spans.shutdown()  # sends the spans still queued


def listen_on(host: str, port: int, option: str) -> socket.socket:
    """A TCP socket bound to ``host:port`` (as uvicorn binds one); INVALID_INPUT naming
    ``--option`` when it cannot be (the port is taken, the address is not this machine's)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise _unavailable(option, host, port, error) from None
    return sock


def _apart(metrics: tuple[str, int], listen: tuple[str, int]) -> None:
    """INVALID_INPUT when ``--metrics`` is the agents' own address (the same port, on the same
    or on every interface). Both sockets allow their address's reuse, as servers do: binding
    the second would not fail, only the agents' socket once uvicorn listens on it, after the
    proxy said it serves."""
    (host, port), (agents_host, agents_port) = metrics, listen
    if port != agents_port or not _overlap(host, agents_host, port):
        return
    raise InvalidInput(f"--metrics {_url_host(host)}:{port} is where agents reach the proxy "
                       f"(--listen {_url_host(agents_host)}:{agents_port}); give metrics a port "
                       "of their own", field="metrics")


def _overlap(one: str, other: str, port: int) -> bool:
    """Whether two hosts name a common address on this machine: the same, or either every
    interface (``0.0.0.0``, ``::``)."""
    def addresses(host: str) -> set[str]:
        try:
            return {str(info[4][0])
                    for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
        except OSError:  # unresolvable: the bind says why
            return {host}

    mine, theirs = addresses(one), addresses(other)
    return bool(mine & theirs) or bool((mine | theirs) & {"0.0.0.0", "::"})  # noqa: S104


def _serve_metrics(verifier: Verifier, host: str, port: int) -> Any:
    try:
        return prometheus.serve(verifier.enable_metrics(), host, port)
    except OSError as error:
        raise _unavailable("metrics", host, port, error) from None


def _unavailable(option: str, host: str, port: int, error: OSError) -> InvalidInput:
    reason = error.strerror or str(error)
    return InvalidInput(f"--{option} {_url_host(host)}:{port}: cannot listen there ({reason}); "
                        "choose another address or port", field=option, reason=reason)


def _acceptor(verifier: Verifier, settings: Settings) -> Acceptor | None:
    """x402 payments where pricing.toml's ``[x402]`` and the chain settings allow them, as
    ``Billing.from_settings()`` takes them."""
    acceptor = Acceptor.from_settings(verifier, settings)
    if isinstance(acceptor, Unavailable):
        if verifier.pricing_table().x402 is not None:
            log.warning("x402 payments are not offered: %s", acceptor.reason)
        return None
    return acceptor


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class _CutOff(logging.Filter):
    """uvicorn's ERRORs for what a shutdown does on purpose: the calls still running
    ``GRACE_SECONDS`` after the signal are cancelled ("Cancel N running task(s)..."), and each
    then ends in "Exception in ASGI application" with a CancelledError traceback. The first
    becomes a WARNING that says what happens to them; the tracebacks of the cancelled calls are
    dropped (their holds are voided, and logged so). Any other error stays as it is."""

    cutting = False

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Cancel %s running task(s)"):
            self.cutting = True
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg = ("shutdown: %s call(s) still running after the grace period (%ss) are "
                          "cut off; their holds are voided")
            record.args = (*(record.args or ()), GRACE_SECONDS)
            return True
        cancelled = isinstance(record.exc_info[1] if record.exc_info else None,
                               asyncio.CancelledError)
        return not (self.cutting and cancelled)


@contextmanager
def _cut_off_quietly() -> Iterator[None]:
    uvicorn_log = logging.getLogger("uvicorn.error")
    quiet = _CutOff()
    uvicorn_log.addFilter(quiet)
    try:
        yield
    finally:
        uvicorn_log.removeFilter(quiet)


@contextmanager
def _stopped_cleanly() -> Iterator[None]:
    """uvicorn re-raises the SIGINT or SIGTERM it stopped on once it has shut down, which would
    kill the process before the verifier is closed: the proxy's own handlers take that signal
    (the shutdown is done), and the command exits 0 after its cleanup."""
    handled = (signal.SIGINT, signal.SIGTERM)
    before = {sig: signal.signal(sig, lambda *_: None) for sig in handled}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)

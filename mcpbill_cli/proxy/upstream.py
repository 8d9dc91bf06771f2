"""The MCP server behind the proxy: one client connection, kept open and reopened when it breaks.

A stdio upstream is a child process the proxy starts (``--upstream-cmd``); an HTTP upstream is a
streamable HTTP URL (``--upstream``). :meth:`Upstream.run` owns the connection in one task (the
SDK's client must be entered and left in the same task) and reconnects, restarting a stdio
child, whenever a call reports the connection broken or the client itself fails. Handlers get
the live client from :meth:`Upstream.client`, waiting for a reconnect at most ``connect_timeout``
seconds.
"""

from __future__ import annotations

import logging
import shlex
import sys
from dataclasses import dataclass
from typing import Any, TextIO

import anyio
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters, stdio_client

from mcpbill_cli.errors import InvalidInput, UpstreamUnavailable

__all__ = ["Upstream", "UpstreamTarget"]

log = logging.getLogger("mcpbill.proxy")

RECONNECT_DELAYS = (0.0, 0.2, 0.5, 1.0, 2.0, 5.0)  # seconds before each reconnect, then the last


@dataclass(frozen=True)
class UpstreamTarget:
    """Where the upstream is: a command line to run over stdio, or a streamable HTTP URL."""

    command: tuple[str, ...] = ()
    url: str | None = None
    env: dict[str, str] | None = None

    @classmethod
    def parse(cls, *, command: str | None, url: str | None,
              env: dict[str, str] | None = None) -> UpstreamTarget:
        """Exactly one of ``command`` (split like a shell would) and ``url``."""
        if (command is None) == (url is None):
            raise InvalidInput("give exactly one upstream: --upstream URL (streamable HTTP) or "
                               "--upstream-cmd \"CMD ARGS\" (a stdio server to run)",
                               field="upstream")
        if url is not None:
            if not url.startswith(("http://", "https://")):
                raise InvalidInput(f"--upstream must be an http(s) URL, not {url!r}",
                                   field="upstream")
            return cls(url=url)
        words = tuple(shlex.split(command or ""))
        if not words:
            raise InvalidInput("--upstream-cmd is empty", field="upstream-cmd")
        return cls(command=words, env=env)

    def describe(self) -> str:
        return self.url if self.url is not None else shlex.join(self.command)


class Upstream:
    """One connection to the upstream, supervised: see the module docstring."""

    def __init__(self, target: UpstreamTarget, *, connect_timeout: float = 30.0,
                 errlog: TextIO | None = None) -> None:
        self.target = target
        self.connect_timeout = connect_timeout
        self.connects = 0  # connections opened so far (a restart is the second and later)
        self._errlog = errlog
        self.client_options: dict[str, Any] = {}  # the client's callbacks (the proxy's relay)
        self._client: Client | None = None
        self._connected = anyio.Event()
        self._broken = anyio.Event()

    async def run(self) -> None:
        """Keep a connection open until cancelled; reconnect (with a growing delay) when it
        breaks or cannot be opened."""
        failures = 0
        while True:
            delay = RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS) - 1)]
            await anyio.sleep(delay)
            try:
                async with self._open() as client:
                    self._broken = anyio.Event()
                    self._client = client
                    self.connects += 1
                    failures = 0
                    self._connected.set()
                    await self._broken.wait()
            except Exception as error:  # noqa: BLE001 - any failure of the link means reconnect
                failures += 1
                log.warning("upstream %s failed: %s", self.target.describe(), error)
            finally:
                self._drop()

    async def client(self) -> Client:
        """The live client, waiting for a (re)connect; UPSTREAM_UNAVAILABLE after
        ``connect_timeout`` seconds without one."""
        with anyio.move_on_after(self.connect_timeout):
            while (client := self._client) is None:
                await self._connected.wait()
            return client
        raise UpstreamUnavailable(
            f"the upstream {self.target.describe()} is not reachable (no connection within "
            f"{self.connect_timeout:g} s)", upstream=self.target.describe())

    def broken(self, client: Client) -> None:
        """A call found ``client``'s connection broken: drop it and reconnect (once, however
        many calls report it)."""
        if client is self._client:
            self._drop()  # calls from now on wait for the new connection
            self._broken.set()

    def _drop(self) -> None:
        if self._client is not None:
            self._connected = anyio.Event()  # before _client is cleared: waiters wait anew
            self._client = None

    def _open(self) -> Client:
        # A proxy relays listings, never caches them.
        options: dict[str, Any] = {"cache": None, **self.client_options}
        if self.target.url is not None:
            return Client(self.target.url, **options)
        parameters = StdioServerParameters(command=self.target.command[0],
                                           args=list(self.target.command[1:]),
                                           env=self.target.env)
        return Client(stdio_client(parameters, errlog=self._errlog or sys.stderr), **options)

"""Automatic recovery of x402 payments a crashed server left between "settling" and "settled".

A server reserves a payment, settles it on chain, then records it; one that dies in between
leaves the payment ``reserved``. :meth:`~mcpbill_cli.x402.accept.Acceptor.recover` resolves
such payments from the chain (recorded when the authorization was used, released once it can
no longer be); :class:`Recovery` runs it for the operator: once when a server starts, then
every ``interval`` seconds, from a daemon thread, like the verifier's sealer. Any number of
replicas may run one: each resolution is a guarded UPDATE of the payment's row inside the
transaction that books it, so a payment is recorded or released exactly once.

config.toml tunes it (both durations, like ``90s`` or ``2m``)::

    [x402]
    recover_after = "2m"       # a reservation older than this belongs to a dead server
    recover_interval = "30s"   # how often to look
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import DBAPIError

from mcpbill_cli.durations import parse_duration
from mcpbill_cli.errors import BillingError, ConfigInvalid

if TYPE_CHECKING:
    from mcpbill_cli.x402.accept import Acceptor

__all__ = ["RECOVER_AFTER", "RECOVER_INTERVAL", "Recovery", "recovery_times"]

logger = logging.getLogger("mcpbill")

RECOVER_AFTER = 120  # seconds: a payment reserved longer than this belongs to a dead server
RECOVER_INTERVAL = 30.0  # seconds between two looks; each is one indexed query when all is well


@dataclass
class Recovery:
    """Runs ``acceptor.recover(older_than=...)`` at start and every ``interval`` seconds."""

    acceptor: Acceptor
    older_than: int = RECOVER_AFTER
    interval: float = RECOVER_INTERVAL
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the thread; its first turn runs at once (a server starting after a crash
        resolves what the crash left, without waiting an interval)."""
        if self._thread is None and not self._stop.is_set():
            self._thread = threading.Thread(target=self._run, name="mcpbill-x402-recovery",
                                            daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the thread (a turn under way finishes first)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def turn(self) -> int:
        """One look: the payments resolved (recorded or released)."""
        resolved = self.acceptor.recover(older_than=self.older_than)
        for payment in resolved:
            logger.info("x402 payment %s left %s by a stopped server: resolved", payment.id,
                        payment.status)
        return len(resolved)

    def _run(self) -> None:
        while True:
            try:
                self.turn()
            except BillingError as exc:  # the chain or the ledger is down: next turn
                logger.warning("x402 payment recovery: %s", exc.message)
            except DBAPIError as exc:  # the thread must outlive any one bad turn
                logger.error("x402 payment recovery failed (%s); trying again next turn",
                             type(exc.orig).__name__)
            if self._stop.wait(self.interval):
                return


def recovery_times(file: Mapping[str, Any]) -> tuple[int, float]:
    """``[x402] recover_after`` and ``recover_interval`` of config.toml, in seconds."""
    section = file.get("x402", {})
    if not isinstance(section, Mapping):
        raise ConfigInvalid("config [x402] must be a table")
    return (_seconds(section, "recover_after", RECOVER_AFTER),
            float(_seconds(section, "recover_interval", int(RECOVER_INTERVAL))))


def _seconds(section: Mapping[str, Any], key: str, default: int) -> int:
    value = section.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise ConfigInvalid(f'config [x402] {key} must be a duration like "90s" or "2m"')
    try:
        return parse_duration(value, field=f"[x402] {key}")
    except BillingError as error:
        raise ConfigInvalid(f"config {error.message}") from None

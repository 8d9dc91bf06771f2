"""Keeping the holds of calls that are still running from lapsing.

A hold voids itself ``hold_timeout`` seconds after it was taken, so that a server that died
mid-call gives the money back. A tool that runs longer than that is not dead, though: while
it runs, this keeper moves its hold's timeout forward, well before it lapses. One daemon
thread per verifier, started with the first hold it keeps; it wakes every quarter of the
timeout (at most every few seconds), and extends, in one transaction, every kept hold that is
past half its time. A process that dies stops extending, so its holds lapse as before.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta

logger = logging.getLogger("mcpbill")

MAX_WAKE_SECONDS = 5.0

# extend(call ids, until, now) -> the ids still held and now extended
Extend = Callable[[list[str], datetime, datetime], set[str]]


class HoldKeeper:
    """Extends the holds it was asked to keep until they are forgotten (captured or voided)."""

    def __init__(self, extend: Extend, *, hold_timeout: float,
                 clock: Callable[[], datetime]) -> None:
        self._extend = extend
        self._timeout = timedelta(seconds=hold_timeout)
        self._clock = clock
        self._kept: dict[str, datetime] = {}  # call id -> its hold's current timeout
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake = min(hold_timeout / 4, MAX_WAKE_SECONDS)

    def keep(self, call_id: str, timeout_at: datetime) -> None:
        with self._lock:
            self._kept[call_id] = timeout_at
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mcpbill-hold-keeper",
                                                daemon=True)
                self._thread.start()

    def forget(self, call_id: str) -> None:
        with self._lock:
            self._kept.pop(call_id, None)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def extend_due(self) -> int:
        """Extend every kept hold past half its time; returns how many were extended.

        With no hold kept it does not read the clock: the thread of a verifier left open
        (never closed, its ledger gone with its process) asks the ledger nothing."""
        with self._lock:
            kept = list(self._kept.items())
        if not kept:
            return 0
        now = self._clock()
        due = [i for i, timeout in kept if timeout - now < self._timeout / 2]
        if not due:
            return 0
        until = now + self._timeout
        live = self._extend(due, until, now)
        with self._lock:
            for call_id in due:
                if call_id not in self._kept:
                    continue  # settled meanwhile
                if call_id in live:
                    self._kept[call_id] = until
                else:  # lapsed or resolved elsewhere: its capture will say so
                    del self._kept[call_id]
        return len(live)

    def _run(self) -> None:
        from mcpbill_cli.errors import BillingError

        while not self._stop.wait(self._wake):
            try:
                self.extend_due()
            except BillingError as exc:  # the ledger is down: try again at the next wake
                logger.warning("could not extend running calls' holds: %s", exc.message)

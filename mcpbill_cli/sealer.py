"""A verifier's background writer: it seals the audit trail and writes the refusal counts.

Both are the writes a paid call must not wait for. Every ``SEAL_INTERVAL`` the thread seals
whatever is committed and unsealed (``ledger.seals.seal_pending``; replicas take turns, so any
number of them may run one) and adds the refusals counted in memory since its last turn to
``refusal_counts``. ``close()`` does a last turn. A process that dies loses at most the counts
of its last interval; its events are sealed by the next sealer anywhere.
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from mcpbill_cli.errors import BillingError
from mcpbill_cli.ledger import rates, refusals
from mcpbill_cli.ledger.engine import writing
from mcpbill_cli.ledger.sealing import seal_all
from mcpbill_cli.ledger.seals import SEAL_INTERVAL, Sign

logger = logging.getLogger("mcpbill")


@dataclass
class Sealer:
    """Seals (when it has a signing key) and flushes refusal counts, from one daemon thread."""

    engine: Engine
    sign: Sign | None
    clock: Callable[[], datetime]
    interval: float = SEAL_INTERVAL
    counts: refusals.Counter = field(default_factory=refusals.Counter)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _swept_at: datetime | None = None  # when this sealer last swept old rate limit windows

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the thread; a process that exits normally without ``close()`` still gets a
        last turn (``atexit``), so a short-lived server leaves nothing unsealed."""
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name="mcpbill-sealer",
                                                daemon=True)
                self._thread.start()
                atexit.register(self._at_exit)

    def _at_exit(self) -> None:
        if not self._stop.is_set():
            self.close()

    def close(self) -> None:
        """Stop the thread, then a last turn (the ledger down: what is left stays for the
        next sealer, the counts of this turn are lost and said so)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            self.turn()
        except BillingError as exc:
            logger.warning("could not seal or write refusal counts on close: %s", exc.message)
        except DBAPIError as exc:
            logger.warning("could not seal or write refusal counts on close: %s",
                           type(exc.orig).__name__)

    def turn(self) -> int:
        """One turn: flush the counts, then seal until nothing is left; returns the events
        sealed."""
        self._flush()
        self._sweep_rates()
        if self.sign is None:
            return 0
        return sum(seal.count for seal in seal_all(self.engine, self.sign, clock=self.clock))

    def _flush(self) -> None:
        taken = self.counts.take()
        if not taken:
            return
        try:
            with writing(self.engine) as conn:
                refusals.add(conn, taken)
        except (BillingError, DBAPIError):
            self.counts.give_back(taken)  # written at a later turn
            raise

    def _sweep_rates(self) -> None:
        """Delete rate limit windows that are over, once a minute at most."""
        now = self.clock()
        if self._swept_at is not None and (now - self._swept_at).total_seconds() < 60:
            return
        with writing(self.engine) as conn:
            rates.sweep(conn, now=now)
        self._swept_at = now

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.turn()
            except BillingError as exc:  # the ledger is down: try again next turn
                logger.warning("could not seal the audit trail: %s", exc.message)
            except DBAPIError as exc:  # the thread must outlive any one bad turn
                logger.error("sealing failed (%s); trying again next turn",
                             type(exc.orig).__name__)

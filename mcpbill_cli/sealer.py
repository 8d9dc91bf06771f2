"""A verifier's background writer: it seals the audit trail and writes the refusal counts.

Both are the writes a paid call must not wait for. Every ``SEAL_INTERVAL`` the thread seals
whatever is committed and unsealed (``ledger.seals.seal_pending``; replicas take turns, so any
number of them may run one, and while one seals the others' threads skip theirs) and adds
the refusals counted in memory since its last turn to ``refusal_counts``. ``close()`` does a
last turn. A process that dies loses at most the counts of its last interval; its events are
sealed by the next sealer anywhere.
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
from mcpbill_cli.ledger.engine import reading, writing
from mcpbill_cli.ledger.sealing import seal_all
from mcpbill_cli.ledger.seals import SEAL_INTERVAL, Sign, last_seal_number

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
    _seen_seal: int | None = None  # the newest seal number at this sealer's last turn

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

    def turn(self, *, yield_to_others: bool = False) -> int:
        """One turn: flush the counts, then seal what is waiting; returns the events sealed.

        ``yield_to_others`` (the thread's turns): no sealing when another sealer sealed since
        this one's last turn, so a deployment makes one seal a second however many replicas
        it runs. Each sealing turn reads and hashes the new events, signs and writes a seal (a
        few ms of CPU): every replica doing that each second multiplied it by the replicas,
        beside paid calls that are CPU bound from 4 replicas on 2 cores (bench/scaleout.py).
        A replica that stops sealing is taken over at the next turn of another, so the
        unsealed window stays within 3 turns.
        """
        self._flush()
        self._sweep_rates()
        if self.sign is None or (yield_to_others and self._another_sealed()):
            return 0
        made = seal_all(self.engine, self.sign, clock=self.clock)
        if made:
            self._seen_seal = made[-1].number
        return sum(seal.count for seal in made)

    def _another_sealed(self) -> bool:
        with reading(self.engine) as conn:
            newest = last_seal_number(conn)
        seen, self._seen_seal = self._seen_seal, newest
        return seen is not None and newest != seen

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
                self.turn(yield_to_others=True)
            except BillingError as exc:  # the ledger is down: try again next turn
                logger.warning("could not seal the audit trail: %s", exc.message)
            except DBAPIError as exc:  # the thread must outlive any one bad turn
                logger.error("sealing failed (%s); trying again next turn",
                             type(exc.orig).__name__)

"""The ledger's time: PostgreSQL's clock, read without a round trip per call.

Replicas of a verifier share one PostgreSQL ledger, and their own wall clocks disagree (NTP
keeps them close, not equal). Every time the ledger's statements compare (a token's expiry,
a hold's timeout, the UTC day a budget counts in) is therefore taken from the one clock they
share, the database server's. Asking it on every call would cost a round trip, so
:class:`DatabaseClock` asks it now and then and counts the time in between on this process's
monotonic clock, which NTP may slew but never steps, and which no one sets by hand.

SQLite has no server: the database is a file on this host, and the host's clock is its clock,
so :func:`ledger_clock` gives SQLite ledgers the process clock.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, event, text
from sqlalchemy.exc import DBAPIError

from mcpbill_cli.clock import Clock, utcnow
from mcpbill_cli.errors import LedgerUnavailable
from mcpbill_cli.ledger.engine import unavailable

logger = logging.getLogger("mcpbill")

RESAMPLE_SECONDS = 30.0  # how long one sample of the server's clock is trusted
RETRY_SECONDS = 1.0  # after a failed sample: how soon to ask again, keeping the last one
# How fast a monotonic clock may run apart from the server's: NTP slews a clock by at most
# 500 parts per million, and the server's own clock is slewed as well.
DRIFT = 2 * 500e-6


@dataclass(frozen=True)
class Anchor:
    """One reading of the server's clock, as seconds since the epoch: the server's time is
    ``offset`` plus this process's monotonic time, give or take ``uncertainty`` seconds (half
    the round trip that read it, at monotonic ``mono``), and no answer goes below ``floor``
    (the last answer of the reading before)."""

    offset: float
    mono: float
    uncertainty: float
    floor: float


class DatabaseClock:
    """A :data:`~mcpbill_cli.clock.Clock` that follows ``engine``'s server (PostgreSQL).

    Each call answers the last sample's server time plus the monotonic time elapsed since.
    The call that finds the sample older than ``resample`` seconds samples again first (one
    ``SELECT clock_timestamp()`` per process every ``resample`` seconds, and none on the
    other calls); while one call samples, others answer from the sample they have. A sample
    that fails keeps the one before (the call goes on to meet the ledger's own error) and is
    retried a second later; only a clock that has never reached its server raises
    :class:`~mcpbill_cli.errors.LedgerUnavailable`. Answers never go backwards: a new sample
    behind the last answer holds the time there until it catches up. (Without a lock on the
    way, a call that read the old sample just as a new one replaced it may answer later than
    the calls after it, by at most the moment its thread was paused between two lines.)

    A pooled connection found broken (a call's error the driver calls a disconnect, or a
    failed pre-ping) makes the next call read the server again, however recent the last
    reading: after a failover the new primary's clock decides from the first call that
    reaches it, not up to ``resample`` seconds later (the two servers' clocks may disagree as
    much as any two hosts').

    ``monotonic`` is the local time source (tests drive it); the wall clock plays no part.
    Times are kept as float seconds since the epoch (a resolution of 0.25 us today), which
    makes a reading about as cheap as :func:`~mcpbill_cli.clock.utcnow`.
    """

    def __init__(self, engine: Engine, *, resample: float = RESAMPLE_SECONDS,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._engine = engine
        self._resample = resample
        self._monotonic = monotonic
        self._anchor: Anchor | None = None
        self._due = -math.inf  # the monotonic time of the next sample
        self._sampling = threading.Lock()
        _resample_on_reconnect(self, engine)

    def __call__(self) -> datetime:
        mono = self._monotonic()
        anchor = self._anchor
        if anchor is None or mono >= self._due:
            anchor = self._sample()
            mono = self._monotonic()
        return datetime.fromtimestamp(max(anchor.offset + mono, anchor.floor), UTC)

    def error_bound(self) -> float | None:
        """How far, in seconds, an answer now may be from the server's clock: half the
        round trip of the last sample plus the drift since; ``None`` before any sample."""
        anchor = self._anchor
        if anchor is None:
            return None
        return anchor.uncertainty + DRIFT * (self._monotonic() - anchor.mono)

    def _sample(self) -> Anchor:
        """The anchor to answer from: a new reading, or the one in hand while another call
        reads or the server cannot be reached."""
        if not self._sampling.acquire(blocking=self._anchor is None):
            return self._held()  # another call is sampling
        try:
            if self._anchor is None or self._monotonic() >= self._due:
                self._anchor = self._read(self._anchor)
                self._due = self._anchor.mono + self._resample
        except LedgerUnavailable:
            if self._anchor is None:
                raise
            logger.warning("could not read the ledger's clock; keeping the last reading")
            self._due = self._monotonic() + RETRY_SECONDS
        finally:
            self._sampling.release()
        return self._held()

    def _held(self) -> Anchor:
        anchor = self._anchor
        assert anchor is not None  # noqa: S101 - set before any call answers
        return anchor

    def _read(self, previous: Anchor | None) -> Anchor:
        """The server's clock, read in autocommit (no BEGIN inside the timed round trip)."""
        try:
            with self._engine.connect() as conn:
                conn = conn.execution_options(isolation_level="AUTOCOMMIT")
                before = self._monotonic()
                server = conn.execute(text("SELECT clock_timestamp()")).scalar_one()
                after = self._monotonic()
        except DBAPIError as exc:
            raise unavailable(self._engine, exc) from None
        mono = (before + after) / 2
        offset = server.timestamp() - mono
        # what the reading before answers now: no answer of this one may go below it
        floor = (0.0 if previous is None
                 else max(previous.offset + self._monotonic(), previous.floor))
        return Anchor(offset=offset, mono=mono, uncertainty=(after - before) / 2, floor=floor)


def _resample_on_reconnect(clock: DatabaseClock, engine: Engine) -> None:
    """Make ``clock`` read the server at its next call whenever ``engine``'s pool throws a
    connection away as broken (a weak reference: the engine's listeners do not keep the clock
    alive). Not on every connection opened: a pool that grows under load would read the clock
    again for nothing."""
    ref = weakref.ref(clock)

    def resample(*_: Any) -> None:
        if (alive := ref()) is not None:
            alive._due = -math.inf

    event.listen(engine, "invalidate", resample)


def ledger_clock(engine: Engine | None) -> Clock:
    """The clock that decides for ``engine``'s ledger: the server's for PostgreSQL, this
    host's (the database file's host) for SQLite and for no ledger at all."""
    if engine is not None and engine.dialect.name == "postgresql":
        return DatabaseClock(engine)
    return utcnow

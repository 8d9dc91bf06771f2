"""Checkpoint a SQLite ledger's write-ahead log from a thread of its own, off the call path.

SQLite checkpoints inside whichever commit pushes the log past ``wal_autocheckpoint`` pages,
and a checkpoint syncs the log and the database file to disk: 10 to 25 ms, paid by one unlucky
tool call every few dozen (a billed call commits twice and writes about 17 pages each time).
A long-lived verifier instead raises its own connections' threshold to :data:`BACKSTOP_PAGES`
and runs a :class:`WalCheckpointer`, which checkpoints every ``interval`` seconds in
``PASSIVE`` mode: it never waits for a writer and never blocks one, so a busy moment only
defers it to the next tick. If the thread cannot keep up, the backstop makes commits checkpoint
again, as SQLite does by default. Short-lived CLI commands keep SQLite's default threshold.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy import Engine

log = logging.getLogger(__name__)

BACKSTOP_PAGES = 8000  # about 32 MiB of log at 4 KiB pages; SQLite's default is 1000
INTERVAL = 0.1  # seconds between checkpoints


@dataclass(frozen=True)
class Checkpoint:
    """What one ``PRAGMA wal_checkpoint(PASSIVE)`` reported, in frames (pages) of the log."""

    busy: bool
    logged: int
    copied: int


class WalCheckpointer:
    """A daemon thread that checkpoints the WAL of the SQLite file at ``path``; :meth:`close`
    stops it. It holds its own connection, and no lock the ledger's writers wait for."""

    def __init__(self, path: str, *, interval: float = INTERVAL) -> None:
        self.path = path
        self.interval = interval
        self._stop = threading.Event()
        self._conn = sqlite3.connect(path, timeout=0, check_same_thread=False,
                                     isolation_level=None)
        self._lock = threading.Lock()  # one checkpoint at a time on this connection
        self.last: Checkpoint | None = None  # what the latest checkpoint reported
        self._thread = threading.Thread(target=self._run, name="mcpbill-wal-checkpoint",
                                        daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def checkpoint(self) -> Checkpoint:
        """Copy what the log holds into the database now, as far as readers allow."""
        with self._lock:
            busy, logged, copied = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            self.last = Checkpoint(bool(busy), logged, copied)
            return self.last

    def close(self) -> None:
        """Stop the thread (after a last checkpoint) and close its connection. Idempotent."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            self._conn.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._tick()
        self._tick()

    def _tick(self) -> None:
        try:
            self.checkpoint()
        except sqlite3.Error as exc:  # a locked or vanished file: the backstop still holds
            log.debug("WAL checkpoint of %s skipped: %s", self.path, exc)


def background_checkpointer(engine: Engine) -> WalCheckpointer | None:
    """A checkpointer for ``engine``'s file, if it is a SQLite file (else ``None``)."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        return None
    return WalCheckpointer(database)

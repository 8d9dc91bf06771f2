"""The table in force for a long-running verifier, re-read when the file changes."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from mcpbill_cli.errors import PricingInvalid
from mcpbill_cli.pricing.parsing import load_pricing
from mcpbill_cli.pricing.table import PricingTable

RELOAD_INTERVAL = 0.5  # seconds between two stat() calls of a watched pricing file

logger = logging.getLogger("mcpbill")


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


class PricingSource:
    """The current table for a long-running verifier; picks up edits without a restart.

    ``current()`` costs one ``os.stat`` at most every ``check_interval`` seconds and re-reads
    the file only when its (mtime, size, inode) changed. A broken file keeps the last good
    table in force (rather than charging wrong prices or refusing every call), records the
    error in ``last_error`` and logs a warning; a broken file at construction raises.
    """

    def __init__(
        self, source: Path | str | PricingTable, *, check_interval: float = RELOAD_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.last_error: PricingInvalid | None = None
        self.path: Path | None = None if isinstance(source, PricingTable) else Path(source)
        self._interval = check_interval
        self._clock = clock
        self._reloading = threading.Lock()
        if isinstance(source, PricingTable):
            self._stamp, self._table = None, source
        else:
            # Stamp before reading: a change made while we read is then seen on the next check.
            self._stamp = _stamp(Path(source))
            self._table = load_pricing(Path(source))
        self._next_check = clock() + check_interval

    def current(self) -> PricingTable:
        """The table in force now."""
        if self.path is None or self._clock() < self._next_check:
            return self._table
        # One thread re-checks; the others keep serving the table they already have.
        if self._reloading.acquire(blocking=False):
            try:
                self._next_check = self._clock() + self._interval
                self._refresh(self.path)
            finally:
                self._reloading.release()
        return self._table

    def _refresh(self, path: Path) -> None:
        stamp = _stamp(path)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            table = load_pricing(path)
        except PricingInvalid as exc:
            self.last_error = exc
            logger.warning("pricing table %s is invalid; still charging version %d: %s",
                           path, self._table.version, exc.message)
        else:
            self.last_error = None
            _warn_if_unbumped(path, self._table, table)
            self._table = table


def _warn_if_unbumped(path: Path, before: PricingTable, after: PricingTable) -> None:
    # Receipts name a version to mean one set of prices; the ledger keeps them apart by digest.
    if after.version == before.version and after.digest != before.digest:
        logger.warning(
            "pricing table %s changed without a version bump: version %d now has other prices. "
            "They are in force anyway, and the ledger records them under a new version number; "
            "bump `version` in the file, or edit it with `mcpbill pricing set`, which bumps it",
            path, after.version)

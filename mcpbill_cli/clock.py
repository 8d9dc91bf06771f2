"""Time, in one place, so tests and the verifier can move it.

Which clock decides: the ledger's. Every time a call depends on is read once, from one clock,
and the ledger's conditional statements keep the answer whole:

- token times (``exp``, ``nbf``, ``iat``), with ``leeway``: a token is expired, on every
  replica, once the ledger's clock is past ``exp + leeway``, and no charge is stamped after it.
- hold timeouts: stamped ``hold_timeout`` after the hold by that clock; capture, extension and
  the expiry sweep each compare the stamp with it in one conditional UPDATE of a ``held`` call,
  so a hold is captured or expired, never both, and a lapsed hold is never billed.
- budget caps: a call counts against the UTC day (and month) that clock says when it was held
  or charged, and a void or partial capture gives it back to those same windows.

On PostgreSQL the ledger's clock is the database server's. A verifier, and the CLI's commands
that write or judge token times, follow it with
:class:`~mcpbill_cli.ledger.clock.DatabaseClock`: it reads the server's clock every 30 seconds
and counts the time in between on the process's monotonic clock, so the replicas' own wall
clocks play no part; an answer is within half a sample's round trip plus
the monotonic clock's drift since (at most 1 ms a second) of the server's. On SQLite the
database is a file on this host and the host's clock, :func:`utcnow`, is its clock. A clock
given explicitly (``Verifier(clock=...)``) wins over both; replicas given their own must keep
them within the leeway of each other: a larger skew moves when tokens stop working and holds
lapse, by that skew, and never spends money twice.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


def aware(value: datetime) -> datetime:
    """SQLite hands back naive datetimes for timezone-aware columns; they are UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def rfc3339(moment: datetime) -> str:
    """``2026-12-05T16:46:14.123456Z``: the one form of every timestamp the CLI prints or
    exports. Always UTC and six fractional digits, so sorting the text sorts the times."""
    return aware(moment).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def rfc3339_text(text: str) -> str:
    """An ISO 8601 time stored as text (``...+00:00``, ``...Z``, whole seconds) in
    :func:`rfc3339` form."""
    return rfc3339(datetime.fromisoformat(text))

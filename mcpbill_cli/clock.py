"""Time, in one place, so tests and the verifier can move it.

Which clock decides: the clock of the process serving the call (a verifier's ``clock``, the
CLI's for its commands), never the database's. SQLite has no server clock, and asking
PostgreSQL for its time would cost a round trip per call; instead every time a call depends on
is read once, from that clock, and the ledger's conditional statements keep the answer whole:

- token times (``exp``, ``nbf``, ``iat``): the serving replica's clock, with ``leeway``. A
  replica whose clock is ahead refuses a token early; one behind accepts it until its own
  ``exp + leeway``: every charge is stamped (``calls.created_at``) before that, by its replica.
- hold timeouts: stamped by the replica that took the hold (its clock + ``hold_timeout``);
  capture, extension and the expiry sweep each compare that stamp with their own clock in one
  conditional UPDATE of a ``held`` call, so a hold is captured or expired, never both, and a
  hold some sweeper found lapsed is never billed (HOLD_NOT_ACTIVE).
- budget caps: a call counts against the UTC day (and month) of its replica's clock when it
  was held or charged, and a void or partial capture gives it back to those same windows.

Replicas should keep their clocks within the leeway of each other (NTP); a skew beyond it only
moves when tokens stop working and holds lapse, by that skew. It never spends money twice.
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

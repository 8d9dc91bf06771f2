"""Time, in one place, so tests and the verifier can move it."""

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

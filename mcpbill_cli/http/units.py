"""How a per-unit endpoint tells billing how much it used: ``report_units(n)`` inside it.

The middleware opens a :class:`Meter` around each billed request in a context variable. Sync
endpoints run in a worker thread with a copy of the context, so the meter is a mutable object
shared by both copies rather than a value the endpoint would set in its own copy.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass
class Meter:
    """The units one billed request has reported so far (``None``: none reported)."""

    units: int | None = None


_current: ContextVar[Meter | None] = ContextVar("mcpbill_http_meter", default=None)


def report_units(units: int) -> None:
    """Report how many units (words, rows...) this request to a per-unit route used.

    It is captured at ``units`` times the unit price, never above what was held for it; a
    per-unit route that reports nothing is charged its whole hold. Outside a billed request
    this does nothing.
    """
    if isinstance(units, bool) or not isinstance(units, int) or units < 0:
        raise ValueError(f"units must be a whole number, 0 or more, not {units!r}")
    meter = _current.get()
    if meter is not None:
        meter.units = units


@contextmanager
def metering() -> Iterator[Meter]:
    meter = Meter()
    token = _current.set(meter)
    try:
        yield meter
    finally:
        _current.reset(token)

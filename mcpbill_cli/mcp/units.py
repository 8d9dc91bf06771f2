"""How a per-unit tool tells billing how much it used: ``report_units(n)`` from inside the tool.

The billing interceptor opens a :class:`Meter` around each billed call in a context variable.
Sync tools run in a worker thread with a copy of the context, so the meter is a mutable
object shared by both copies rather than a value the tool would set in its own copy.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass
class Meter:
    """The units one billed call has reported so far (``None``: none reported)."""

    tool: str
    units: int | None = None


_current: ContextVar[Meter | None] = ContextVar("mcpbill_meter", default=None)


def report_units(units: int) -> None:
    """Report how many units (words, tokens, rows...) this call of a per-unit tool used.

    The call is captured at ``units`` times the unit price, never above what was held for it.
    A per-unit tool that reports nothing is charged its whole hold. Outside a billed call
    (a tool function called directly, e.g. in a unit test) this does nothing.
    """
    if isinstance(units, bool) or not isinstance(units, int) or units < 0:
        raise ValueError(f"units must be a whole number, 0 or more, not {units!r}")
    meter = _current.get()
    if meter is not None:
        meter.units = units


def current_meter() -> Meter | None:
    """The meter of the billed call running in this context, if any."""
    return _current.get()


@contextmanager
def metering(tool: str) -> Iterator[Meter]:
    """Open a meter for one call of ``tool`` for the duration of the block."""
    meter = Meter(tool)
    token = _current.set(meter)
    try:
        yield meter
    finally:
        _current.reset(token)

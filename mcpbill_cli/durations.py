"""Durations typed by people: ``90s``, ``15m``, ``24h``, ``2d``."""

from __future__ import annotations

import re

from mcpbill_cli.errors import InvalidInput

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(?P<n>[0-9]{1,9})(?P<unit>[smhd])")


def parse_duration(text: str, *, field: str = "duration") -> int:
    """Seconds in ``text`` (``90s``, ``15m``, ``24h``, ``2d``); refuses 0, negatives and words."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise InvalidInput(
            f"{field} {text!r} is not a duration: use a whole number and a unit, "
            "like 90s, 15m, 24h or 2d",
            field=field,
        )
    seconds = int(match["n"]) * _UNITS[match["unit"]]
    if seconds == 0:
        raise InvalidInput(f"{field} must be more than 0", field=field)
    return seconds


def format_duration(seconds: int) -> str:
    """The largest whole unit that divides ``seconds``: 86400 -> ``1d``, 5400 -> ``90m``."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"

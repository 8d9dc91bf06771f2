"""Exact money: integers of micro-USDC, parsed from and formatted to decimal strings.

1 USDC = 1_000_000 micro-USDC, the token's own six decimals. No float ever touches an amount.
"""

from __future__ import annotations

import re

from mcpbill_cli.errors import InvalidInput

MICRO_PER_USDC = 1_000_000
DECIMALS = 6
# The ledger stores amounts as signed 64-bit integers; leave headroom for sums of many amounts.
MAX_MICRO = 10**15  # one billion USDC


def whole_micro(amount: object, what: str) -> int:
    """``amount`` when it is a whole number of micro-USDC from 1 to :data:`MAX_MICRO` (a
    ``bool`` is not one), else INVALID_INPUT (``field``: ``amount``) naming ``what`` (``"a
    refund amount"``): the ledger's 64-bit columns would refuse a larger one only as a
    database error, and a sum of large ones could overflow."""
    if isinstance(amount, bool) or not isinstance(amount, int) or not 0 < amount <= MAX_MICRO:
        raise InvalidInput(f"{what} is a whole number of micro-USDC from 1 to {MAX_MICRO} "
                           f"({format_usd(MAX_MICRO)} USDC), not {amount!r}", field="amount")
    return amount


_AMOUNT = re.compile(r"\$?(?P<whole>[0-9]*)(?:\.(?P<frac>[0-9]*))?")


def parse_usd(text: str, *, allow_zero: bool = False, field: str = "amount") -> int:
    """Parse ``"5"``, ``"5.00"``, ``"$5"`` or ``"0.000001"`` into micro-USDC.

    Refuses negatives, NaN, exponents, thousands separators, more than six decimals and
    zero (unless ``allow_zero``), each with a message that says what to type instead.
    """
    raw = text.strip()
    match = _AMOUNT.fullmatch(raw)
    if match is None or not (match["whole"] or match["frac"]):
        raise InvalidInput(
            f"{field} {_shown(text)} is not an amount: use digits with at most {DECIMALS} "
            "decimals, like 5, 5.00, $5 or 0.000001",
            field=field,
        )
    frac = match["frac"] or ""
    if len(frac) > DECIMALS:
        raise InvalidInput(
            f"{field} {_shown(text)} has more than {DECIMALS} decimals; USDC's smallest unit is "
            "0.000001",
            field=field,
        )
    whole = match["whole"].lstrip("0")
    # int() of thousands of digits raises ValueError (and costs time): too large anyway
    too_long = len(whole) > len(str(MAX_MICRO // MICRO_PER_USDC))
    micro = 0 if too_long else int(whole or "0") * MICRO_PER_USDC + int(frac.ljust(DECIMALS, "0"))
    if too_long or micro > MAX_MICRO:
        raise InvalidInput(f"{field} {_shown(text)} is too large (at most {format_usd(MAX_MICRO)})",
                           field=field)
    if micro == 0 and not allow_zero:
        raise InvalidInput(f"{field} must be more than 0", field=field)
    return micro


def _shown(text: str) -> str:
    """``text`` quoted for a message, cut short: an error should not echo 5,000 digits."""
    return repr(text) if len(text) <= 40 else f"{text[:24]!r}... ({len(text)} characters)"


def format_usd(micro: int) -> str:
    """Format micro-USDC as a decimal string with at least two decimals: ``"5.00"``, ``"0.002"``."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), MICRO_PER_USDC)
    digits = f"{frac:06d}".rstrip("0").ljust(2, "0")
    return f"{sign}{whole}.{digits}"

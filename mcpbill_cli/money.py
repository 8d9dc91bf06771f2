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
            f"{field} {text!r} is not an amount: use digits with at most {DECIMALS} decimals, "
            "like 5, 5.00, $5 or 0.000001",
            field=field,
        )
    frac = match["frac"] or ""
    if len(frac) > DECIMALS:
        raise InvalidInput(
            f"{field} {text!r} has more than {DECIMALS} decimals; USDC's smallest unit is 0.000001",
            field=field,
        )
    micro = int(match["whole"] or "0") * MICRO_PER_USDC + int(frac.ljust(DECIMALS, "0") or "0")
    if micro > MAX_MICRO:
        raise InvalidInput(f"{field} {text!r} is too large (at most {format_usd(MAX_MICRO)})",
                           field=field)
    if micro == 0 and not allow_zero:
        raise InvalidInput(f"{field} must be more than 0", field=field)
    return micro


def format_usd(micro: int) -> str:
    """Format micro-USDC as a decimal string with at least two decimals: ``"5.00"``, ``"0.002"``."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), MICRO_PER_USDC)
    digits = f"{frac:06d}".rstrip("0").ljust(2, "0")
    return f"{sign}{whole}.{digits}"

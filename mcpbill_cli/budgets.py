"""Budgets over time: spend caps per UTC day and per calendar month (UTC).

A cap belongs to a scope: a tenant (all its agents together), an agent of a tenant (each of
them alone: the token's ``sub``), or one token. Tenant and agent caps come from pricing.toml
(``daily_cap``, ``monthly_cap``, ``agent_daily_cap``, ``agent_monthly_cap``); a token's from
its ledger row (``token issue --daily --monthly``). The ledger counts each paid call into the
window of every cap that applies (``ledger.budgets``); this module only names them and says
where windows start and end.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from mcpbill_cli.clock import aware
from mcpbill_cli.money import format_usd, parse_usd

Scope = Literal["tenant", "agent", "token"]
Period = Literal["day", "month"]
SCOPES: tuple[Scope, ...] = ("tenant", "agent", "token")
PERIODS: tuple[Period, ...] = ("day", "month")


@dataclass(frozen=True)
class Budget:
    """At most ``cap`` micro-USDC per ``period`` for ``scope``."""

    scope: Scope
    period: Period
    cap: int

    @property
    def name(self) -> str:
        """``tenant.day``, ``agent.month``...: how a call row lists the windows it counts in."""
        return f"{self.scope}.{self.period}"


# A token's terms as its JWT carries them, in the ``budget`` claim (decimal USDC strings).
_CLAIM_KEYS = ("dailyCapUsd", "monthlyCapUsd", "topupBelowUsd", "topupToUsd")


@dataclass(frozen=True)
class TokenTerms:
    """A token's own caps and auto top-up (micro-USDC; None: not set), fixed at issue.

    Kept in the token's ledger row (``token show``) and signed into its JWT (claim ``budget``),
    so the verifier counts a call against them without reading the row.
    """

    daily_cap: int | None = None
    monthly_cap: int | None = None
    topup_below: int | None = None
    topup_to: int | None = None

    @property
    def budgets(self) -> tuple[Budget, ...]:
        caps = (("day", self.daily_cap), ("month", self.monthly_cap))
        return tuple(Budget("token", period, cap) for period, cap in caps  # type: ignore[arg-type]
                     if cap is not None)

    def wants_topup(self, available: int) -> bool:
        """Whether a token left with ``available`` is to be topped up."""
        return self.topup_below is not None and available < self.topup_below

    def to_claim(self) -> dict[str, str] | None:
        """The JWT's ``budget`` claim: the terms that are set; None when none is."""
        claim = {key: format_usd(value) for key, value in zip(_CLAIM_KEYS, astuple(self),
                                                               strict=True)
                 if value is not None}
        return claim or None

    @classmethod
    def from_claim(cls, claim: Any) -> TokenTerms:
        """The terms of a ``budget`` claim (absent: none); ValueError when malformed."""
        if claim is None:
            return cls()
        if not isinstance(claim, dict) or not set(claim) <= set(_CLAIM_KEYS):
            raise ValueError("budget claim")
        return cls(*(None if claim.get(key) is None else parse_usd(claim[key])
                     for key in _CLAIM_KEYS))


def window_start(period: Period, at: datetime) -> datetime:
    """Midnight UTC of ``at``'s day, or of the first day of its month."""
    moment = aware(at).astimezone(UTC)
    day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    return day if period == "day" else day.replace(day=1)


def window_key(period: Period, at: datetime) -> str:
    """The window's start as the ledger keys it: ``YYYY-MM-DD``."""
    return window_start(period, at).strftime("%Y-%m-%d")


def resets_at(period: Period, at: datetime) -> datetime:
    """The start of the window after ``at``'s: when a cap reached at ``at`` allows spend again."""
    start = window_start(period, at)
    if period == "day":
        return start.fromordinal(start.toordinal() + 1).replace(tzinfo=UTC)
    year, month = (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
    return start.replace(year=year, month=month)


def check_caps(daily: int | None, monthly: int | None) -> str | None:
    """What is wrong with a pair of caps, or None: each above zero, a month not below a day."""
    for name, cap in (("daily", daily), ("monthly", monthly)):
        if cap is not None and cap <= 0:
            return f"the {name} cap must be above zero (leave it out for no cap)"
    if daily is not None and monthly is not None and monthly < daily:
        return "the monthly cap is below the daily cap; a month holds every day of it"
    return None

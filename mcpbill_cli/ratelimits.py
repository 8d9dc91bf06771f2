"""Loop protection: rate limits on calls and on spend, per token and per agent.

A rate is a count per window: ``"10/s"`` (calls per second), ``"100/m"`` (calls per minute),
or, for spend, an amount of USDC per window (``"1.50/m"``). Windows are fixed: the second or
the minute of the clock a call falls in. Rates come from two places, and all of them apply:

- ``pricing.toml``: ``[limits]`` for every tenant, ``[tenants.T.limits]`` to replace a key of
  it for one tenant. Keys: ``token_calls``, ``token_spend`` (each token), ``agent_calls``,
  ``agent_spend`` (each agent: a token's ``sub`` within its tenant, over all its tokens);
- the token itself, at issue time (``mcpbill token issue --rate 10/s --spend-rate 1/m``),
  signed into its ``rateLimits`` claim.

Two rates on one window and scope are one counter: the lower limit wins. A rate limit is a
guard against an agent stuck in a loop, not a budget: a refused call holds nothing and moves
no money, and only calls that pass every other check count. Spend counts what a call holds
(a per-unit tool: its maximum). The first call of a window always fits, even one priced over
a spend rate, so a rate never walls a tool off for good.

This module is pure: what the rates are and which counters a call takes. The counting is the
ledger's (:mod:`mcpbill_cli.ledger.rates`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from mcpbill_cli.errors import InvalidInput
from mcpbill_cli.money import format_usd, parse_usd

WINDOWS = {"s": 1, "m": 60}  # the unit after the slash, in seconds
WINDOW_NAMES = {1: "second", 60: "minute"}
NO_LIMIT = 2**62  # a counter's limit on what the rates leave unlimited
MAX_CALLS = 1_000_000_000
LIMIT_KEYS = ("token_calls", "token_spend", "agent_calls", "agent_spend")
CLAIM = "rateLimits"

Scope = Literal["token", "agent"]
_RATE = re.compile(r"\s*([0-9][0-9._]*)\s*/\s*([a-z]+)\s*")
_UNITS = {"s": "s", "sec": "s", "second": "s", "m": "m", "min": "m", "minute": "m"}


@dataclass(frozen=True)
class Rate:
    """``amount`` calls (``spend``: micro-USDC) per ``window`` seconds."""

    amount: int
    window: int
    spend: bool = False

    def render(self) -> str:
        """``"10/s"``, ``"1.50/m"``: the form it is written in."""
        unit = next(name for name, seconds in WINDOWS.items() if seconds == self.window)
        count = format_usd(self.amount) if self.spend else str(self.amount)
        return f"{count}/{unit}"


def parse_rate(text: Any, *, spend: bool, field: str) -> Rate:
    """``"10/s"`` or ``"100/m"`` (calls), ``"1.50/m"`` (USDC); INVALID_INPUT otherwise."""
    example = "1.50/m" if spend else "10/s"
    found = _RATE.fullmatch(text.lower()) if isinstance(text, str) else None
    unit = _UNITS.get(found.group(2)) if found else None
    if found is None or unit is None:
        raise InvalidInput(f"{field} {text!r} is not a rate: write an amount, a slash and s or "
                           f"m, e.g. {example}", field=field)
    return Rate(_rate_amount(found.group(1), spend=spend, field=field), WINDOWS[unit], spend)


def _rate_amount(count: str, *, spend: bool, field: str) -> int:
    if spend:
        return parse_usd(count, field=field)  # positive, at most 6 decimals
    if not count.isdigit() or not 0 < int(count) <= MAX_CALLS:
        raise InvalidInput(f"{field}: a call rate is a whole number of calls from 1 to "
                           f"{MAX_CALLS}, not {count!r}", field=field)
    return int(count)


def parse_rates(texts: Iterable[Any], *, spend: bool, field: str) -> tuple[Rate, ...]:
    """Several rates, at most one per window."""
    rates = tuple(parse_rate(text, spend=spend, field=field) for text in texts)
    windows = [rate.window for rate in rates]
    if len(set(windows)) != len(windows):
        raise InvalidInput(f"{field} names the same window twice; give one rate per window "
                           "(s, m)", field=field)
    return rates


@dataclass(frozen=True)
class LimitSet:
    """What ``[limits]`` (or a tenant's ``[tenants.T.limits]``) says; ``None``: not set."""

    token_calls: tuple[Rate, ...] | None = None
    token_spend: tuple[Rate, ...] | None = None
    agent_calls: tuple[Rate, ...] | None = None
    agent_spend: tuple[Rate, ...] | None = None

    @property
    def empty(self) -> bool:
        return all(getattr(self, key) is None for key in LIMIT_KEYS)

    def under(self, tenant: LimitSet | None) -> LimitSet:
        """These limits with each key the tenant sets replaced by the tenant's."""
        if tenant is None:
            return self
        return LimitSet(*(getattr(tenant, key) if getattr(tenant, key) is not None
                          else getattr(self, key) for key in LIMIT_KEYS))

    def to_document(self) -> dict[str, list[str]]:
        return {key: [rate.render() for rate in rates] for key in LIMIT_KEYS
                if (rates := getattr(self, key)) is not None}


def limit_set(document: dict[str, Any], *, path: str) -> LimitSet:
    """A ``[limits]`` table of pricing.toml (the keys checked by the caller); a rate that is
    not one raises INVALID_INPUT naming ``path.key``."""
    def rates(key: str) -> tuple[Rate, ...] | None:
        if key not in document:
            return None
        value = document[key]
        texts = value if isinstance(value, list) else [value]
        return parse_rates(texts, spend=key.endswith("_spend"), field=f"{path}.{key}")

    return LimitSet(*(rates(key) for key in LIMIT_KEYS))


@dataclass(frozen=True)
class Counter:
    """One window of one scope that a call counts in, with its limits (:data:`NO_LIMIT`
    where no rate says)."""

    scope: Scope
    key: str
    window: int
    calls: int = NO_LIMIT
    spend: int = NO_LIMIT

    def limit_of(self, kind: Literal["calls", "spend"]) -> str:
        """The limit that refused, in the form it is written in (``"10/s"``, ``"1.50/m"``)."""
        spend = kind == "spend"
        return Rate(self.spend if spend else self.calls, self.window, spend).render()


def counters(*, jti: str, tenant: str, agent: str, own: Sequence[Rate],
             table: LimitSet | None) -> tuple[Counter, ...]:
    """The counters a call takes: the token's (its own rates and the table's token rates)
    and its agent's (the table's agent rates), in a fixed order (rows lock in that order)."""
    limits = table or LimitSet()
    of_token = [*own, *(limits.token_calls or ()), *(limits.token_spend or ())]
    return (*_merged("token", jti, of_token), *agent_counters(tenant, agent, limits))


def agent_counters(tenant: str, agent: str, table: LimitSet | None) -> tuple[Counter, ...]:
    """The counters of the agent alone (the table's agent rates): what a call paid with x402
    takes, its payer (or the agent of the credit token sent with it) being its agent."""
    limits = table or LimitSet()
    of_agent = [*(limits.agent_calls or ()), *(limits.agent_spend or ())]
    return tuple(_merged("agent", agent_key(tenant, agent), of_agent))


def agent_key(tenant: str, agent: str) -> str:
    """An agent's counter key: its tenant's and its own name, the tenant's length first, so
    that no two agents share one (``a`` + ``b/c`` and ``a/b`` + ``c``: names may hold "/")."""
    return f"{len(tenant)}:{tenant}/{agent}"


def _merged(scope: Scope, key: str, rates: Sequence[Rate]) -> list[Counter]:
    """One counter per window, each with the lowest call and spend limit given for it."""
    merged: list[Counter] = []
    for window in sorted({rate.window for rate in rates}):
        calls = [r.amount for r in rates if r.window == window and not r.spend]
        spend = [r.amount for r in rates if r.window == window and r.spend]
        merged.append(Counter(scope, key, window, min(calls, default=NO_LIMIT),
                              min(spend, default=NO_LIMIT)))
    return merged


def rates_claim(rates: Sequence[Rate]) -> dict[str, list[str]]:
    """The ``rateLimits`` claim of a token's own rates."""
    return {"calls": [r.render() for r in rates if not r.spend],
            "spendUsd": [r.render() for r in rates if r.spend]}


def rates_from_claim(value: Any) -> tuple[Rate, ...]:
    """A token's own rates from its ``rateLimits`` claim (ValueError when malformed)."""
    if not isinstance(value, dict) or set(value) - {"calls", "spendUsd"}:
        raise ValueError("rateLimits is not an object of calls and spendUsd")
    try:
        return (*parse_rates(value.get("calls", []), spend=False, field="calls"),
                *parse_rates(value.get("spendUsd", []), spend=True, field="spendUsd"))
    except (InvalidInput, TypeError):
        raise ValueError("rateLimits holds a rate that is not one") from None

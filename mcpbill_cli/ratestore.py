"""Rate limit counters in Redis, through the ``limits`` package (extra ``[redis]``).

Chosen by ``[limits] storage = "redis://HOST:PORT/DB"`` in config.toml (or
``MCPBILL_LIMITS_STORAGE``, or ``Verifier(limits_storage=...)``); without it the ledger counts
(:mod:`mcpbill_cli.ledger.rates`), which is what a deployment on one PostgreSQL ledger needs.
Redis takes that load off the ledger for many replicas.

Each counter's calls and spend are ``limits`` fixed windows (``FixedWindowRateLimiter``): an
atomic INCRBY with the window's expiry, in Redis. A call takes its hits one by one; a hit that
passes the limit, and every hit before it, are given back (INCRBY of the negative cost), so a
refused call counts nowhere and a limit is never passed, though a call racing a refusal may
see its count for that instant and be refused too. The verifier gives a call's hits back when
the ledger then refuses it or finds it a replay. Unlike the ledger's windows, a Redis window
starts at its first hit (``limits``' fixed window) and runs on Redis's clock; a cost above a
spend rate counts as the rate, so a window's first call always fits, as in the ledger.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

from mcpbill_cli.errors import ConfigInvalid, LedgerUnavailable
from mcpbill_cli.ledger.rates import Limited
from mcpbill_cli.ratelimits import NO_LIMIT, Counter

SCHEMES = ("redis", "rediss", "redis+unix")
KEY_PREFIX = "mcpbill"


@dataclass(frozen=True)
class Hit:
    """What one counter took for a call: given back when the call does not go through."""

    item: Any  # a limits.RateLimitItem
    identifiers: tuple[str, ...]
    cost: int


def check_storage(uri: str) -> str:
    """``uri`` when it names Redis; CONFIG_INVALID otherwise."""
    if uri.partition("://")[0] not in SCHEMES:
        raise ConfigInvalid(f"[limits] storage must be a Redis URL ({', '.join(SCHEMES)}://...)"
                            ", or unset to count in the ledger")
    return uri


class RedisCounters:
    """Rate limit counters in Redis: :meth:`take` before the ledger, :meth:`give_back` after
    a call that did not go through."""

    def __init__(self, uri: str) -> None:
        try:
            from limits import storage, strategies
        except ImportError:
            raise ConfigInvalid("[limits] storage names Redis, which needs the redis extra: "
                                "pip install 'mcpbill[redis]'") from None
        self.storage = storage.storage_from_string(check_storage(uri), key_prefix=KEY_PREFIX)
        self.limiter = strategies.FixedWindowRateLimiter(self.storage)

    def take(self, counters: Sequence[Counter], amount: int) -> list[Hit] | Limited:
        """Count one call of ``amount`` micro-USDC in every counter, or in none and say which
        is full."""
        hits: list[Hit] = []
        for counter in counters:
            for kind, limit, cost in _steps(counter, amount):
                hit = self._hit(counter, kind, limit, cost)
                if isinstance(hit, Hit):
                    hits.append(hit)
                    continue
                self.give_back(hits)
                return Limited(counter, kind, hit)
        return hits

    def full(self, counters: Sequence[Counter], amount: int) -> Limited | None:
        """The first of ``counters`` that a call of ``amount`` would not fit in now, taking
        nothing (a preflight)."""
        for counter in counters:
            for kind, limit, cost in _steps(counter, amount):
                item, ids = _item(limit, counter.window), (counter.scope, counter.key, kind)
                if not self._redis(partial(self.limiter.test, item, *ids, cost=cost)):
                    return Limited(counter, kind, self._reset_ms(item, ids))
        return None

    def give_back(self, hits: Sequence[Hit]) -> None:
        for hit in hits:
            self._redis(lambda hit=hit: self.storage.incr(
                hit.item.key_for(*hit.identifiers), hit.item.get_expiry(), amount=-hit.cost))

    def _hit(self, counter: Counter, kind: Literal["calls", "spend"], limit: int,
             cost: int) -> Hit | int:
        """The hit, or the milliseconds until the counter's window ends."""
        item = _item(limit, counter.window)
        ids = (counter.scope, counter.key, kind)
        if self._redis(lambda: self.limiter.hit(item, *ids, cost=cost)):
            return Hit(item, ids, cost)
        self._redis(lambda: self.storage.incr(item.key_for(*ids), item.get_expiry(),
                                              amount=-cost))
        return self._reset_ms(item, ids)

    def _reset_ms(self, item: Any, ids: tuple[str, ...]) -> int:
        """The milliseconds until the window of ``item`` for ``ids`` ends."""
        reset: float = self._redis(lambda: self.limiter.get_window_stats(item, *ids).reset_time)
        return max(math.ceil((reset - time.time()) * 1000), 1)

    def _redis(self, step: Any) -> Any:
        """``step()``; Redis down is LEDGER_UNAVAILABLE, the counting store being out."""
        try:
            return step()
        except self.storage.base_exceptions as exc:
            raise LedgerUnavailable(f"the rate limit store (Redis) is unavailable: "
                                    f"{type(exc).__name__}") from None


def _steps(counter: Counter, amount: int
           ) -> Iterator[tuple[Literal["calls", "spend"], int, int]]:
    """What a call of ``amount`` costs in each limit ``counter`` has: its kind, the limit and
    the cost (a cost above a spend rate counts as the rate: a window's first call fits)."""
    if counter.calls != NO_LIMIT:
        yield "calls", counter.calls, 1
    if counter.spend != NO_LIMIT and amount != 0:
        yield "spend", counter.spend, min(amount, counter.spend)


def _item(limit: int, window: int) -> Any:
    from limits import RateLimitItemPerMinute, RateLimitItemPerSecond

    return (RateLimitItemPerSecond if window == 1 else RateLimitItemPerMinute)(limit)

"""Totals per tenant, agent, tool and token, summed from the grouped calls, the refusals (in
the audit trail, and counted in ``refusal_counts``) and the deposits; each total is a frozen
:class:`Totals` at the end."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from sqlalchemy import Connection, func, select

from mcpbill_cli.ledger import refusals
from mcpbill_cli.ledger.models import calls, events, refunds
from mcpbill_cli.reconcile.calls_pass import CallGroup
from mcpbill_cli.reconcile.model import DIMENSIONS, Filters, Totals, Window

e = events.c
STATUS_FIELDS = {"captured": "captured", "voided": "voided", "expired": "expired",
                 "held": "held"}


@dataclass
class _Counter:
    calls: int = 0
    captured: int = 0
    charged: int = 0
    voided: int = 0
    expired: int = 0
    held: int = 0
    refusals: dict[str, int] = field(default_factory=dict)
    deposits: int = 0
    deposited: int = 0
    refunds: int = 0
    refunded: int = 0

    def frozen(self) -> Totals:
        return Totals(self.calls, self.captured, self.charged, self.voided, self.expired,
                      self.held, dict(sorted(self.refusals.items())), self.deposits,
                      self.deposited, self.refunds, self.refunded)


class TotalsBuilder:
    """Adds calls, refusals and deposits into the summary and each dimension's totals.

    Calls are first summed per (tenant, agent, tool, token, status), one dictionary update
    per group, and rolled up into the dimensions once, in :meth:`frozen`.
    """

    def __init__(self) -> None:
        self.summary = _Counter()
        self.by: dict[str, dict[str, _Counter]] = {d: {} for d in DIMENSIONS}
        self._calls: dict[tuple[str, str, str, str, str], list[int]] = {}

    def add_calls(self, group: CallGroup) -> None:
        key = (group.tenant, group.agent, group.tool, group.jti, group.status)
        sums = self._calls.get(key)
        if sums is None:
            sums = self._calls[key] = [0, 0]
        sums[0] += group.calls
        sums[1] += group.charged

    def add_refusals(self, conn: Connection, window: Window, filters: Filters) -> None:
        """Refusals of valid tokens (events, by tenant, agent, tool and token) and, unfiltered
        only, those counted by the minute (garbage tokens: no tenant, agent, tool or token;
        the minutes that start in the window)."""
        query = (select(e.jti, e.tenant, e.agent, e.tool, e.code, func.count())
                 .where(e.at >= window.start, e.at < window.end, e.kind == "refusal")
                 .group_by(e.jti, e.tenant, e.agent, e.tool, e.code))
        for jti, tenant, agent, tool, code, count in conn.execute(query):
            if not filters.admits(tenant, agent, tool):
                continue
            for counter in self._counters(tenant, agent, tool, jti):
                counter.refusals[code or "?"] = counter.refusals.get(code or "?", 0) + count
        if filters == Filters():
            for code, count in refusals.counted(conn, window.start, window.end):
                self.summary.refusals[code] = self.summary.refusals.get(code, 0) + count

    def add_refunds(self, conn: Connection, window: Window, filters: Filters) -> None:
        """The window's refunds (by when they were made), by the tenant, agent, tool and
        token of the call refunded."""
        r, c = refunds.c, calls.c
        query = (select(r.tenant, c.agent, c.tool, r.jti, func.count(), func.sum(r.amount))
                 .join(calls, c.id == r.call_id)
                 .where(r.created_at >= window.start, r.created_at < window.end)
                 .group_by(r.tenant, c.agent, c.tool, r.jti))
        for tenant, agent, tool, jti, count, amount in conn.execute(query):
            if not filters.admits(tenant, agent, tool):
                continue
            for counter in self._counters(tenant, agent, tool, jti):
                counter.refunds += int(count)
                counter.refunded += int(amount or 0)

    def add_deposit(self, tenant: str, count: int, amount: int) -> None:
        for counter in self._counters(tenant, None, None, None):
            counter.deposits += count
            counter.deposited += amount

    def frozen(self) -> tuple[Totals, dict[str, dict[str, Totals]]]:
        for (tenant, agent, tool, jti, status), (count, charged) in self._calls.items():
            field_name = STATUS_FIELDS.get(status)
            for counter in self._counters(tenant, agent, tool, jti):
                counter.calls += count
                counter.charged += charged
                if field_name is not None:
                    setattr(counter, field_name, getattr(counter, field_name) + count)
        self._calls = {}
        totals = {dimension: {key: counter.frozen() for key, counter in sorted(keyed.items())}
                  for dimension, keyed in self.by.items()}
        return self.summary.frozen(), totals

    def _counters(self, tenant: str | None, agent: str | None, tool: str | None,
                  jti: str | None) -> Iterator[_Counter]:
        yield self.summary
        keys = {"tenant": tenant, "agent": f"{tenant}/{agent}" if tenant and agent else None,
                "tool": tool, "token": jti}
        for dimension, key in keys.items():
            if key is not None:
                yield self.by[dimension].setdefault(key, _Counter())

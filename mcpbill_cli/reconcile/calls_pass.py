"""One pass over the window's calls, grouped in SQL: every per-call check reads these groups.

The groups are keyed by what a check needs (token, tool, outcome, pricing version, units,
amounts), so their number follows tokens, tools and distinct prices, never the row count.
They stream (``yield_per``) and each consumer keeps per-token or per-key state only.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

from sqlalchemy import Connection, case, func, literal, select

from mcpbill_cli.ledger.models import calls
from mcpbill_cli.reconcile.model import Window

c = calls.c
BATCH = 2000
CHARGE_PREFIX = "charge:"


class CallGroup(NamedTuple):
    """Calls alike in everything reconcile checks. ``kind`` is ``charge`` (charged at once) or
    ``hold`` (held, then captured, voided or expired). Units and the held amount are kept for
    captured calls only (they decide the price); ``held_total`` sums every call's hold.
    ``last_at`` is the latest call's ``created_at`` as the driver returns it."""

    jti: str
    tenant: str
    agent: str
    tool: str
    status: str
    kind: str
    pricing_version: int
    units: int | None
    amount_held: int | None
    amount: int | None
    calls: int
    held_total: int
    last_at: datetime

    @property
    def charged(self) -> int:
        return (self.amount or 0) * self.calls


def call_groups(conn: Connection, window: Window) -> Iterator[CallGroup]:
    """The window's calls (by ``created_at``), grouped; one scan, streamed."""
    captured = c.status == "captured"
    kind = case((c.transfer_id.like(CHARGE_PREFIX + "%"), literal("charge")),
                else_=literal("hold")).label("kind")
    units = case((captured, c.units)).label("units")
    held = case((captured, c.amount_held)).label("amount_held")
    keys = (c.jti, c.tenant, c.agent, c.tool, c.status, kind, c.pricing_version, units, held,
            c.amount)
    query = (select(*keys, func.count(), func.coalesce(func.sum(c.amount_held), 0),
                    func.max(c.created_at))
             .where(c.created_at >= window.start, c.created_at < window.end)
             .group_by(*keys)
             .execution_options(yield_per=BATCH))
    for row in conn.execute(query):
        yield CallGroup._make(row)


@dataclass
class TokenTally:
    """What one token's calls in the window add up to, for the control totals against the
    transfers: charged at once, held (by outcome), captured from holds."""

    tenant: str
    agent: str
    charges: list[int] = field(default_factory=lambda: [0, 0])  # count, amount
    captures: list[int] = field(default_factory=lambda: [0, 0])
    holds: dict[str, list[int]] = field(default_factory=dict)  # hold status -> count, amount
    last_charged_at: datetime | None = None

    def add(self, group: CallGroup) -> None:
        if group.status == "captured":
            totals = self.charges if group.kind == "charge" else self.captures
            totals[0] += group.calls
            totals[1] += group.charged
            if self.last_charged_at is None or group.last_at > self.last_charged_at:
                self.last_charged_at = group.last_at
        if group.kind == "hold":
            status = HOLD_STATUS_OF_CALL.get(group.status, group.status)
            hold = self.holds.setdefault(status, [0, 0])
            hold[0] += group.calls
            hold[1] += group.held_total


# A held call's status, as its pending transfer's status says it.
HOLD_STATUS_OF_CALL = {"held": "pending", "captured": "posted", "voided": "voided",
                       "expired": "expired"}

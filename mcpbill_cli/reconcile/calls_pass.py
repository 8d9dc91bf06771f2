"""One pass over the window's calls, grouped in SQL: every per-call check reads these groups.

The groups are keyed by what a check needs (token, tool, outcome, pricing version, amounts;
per-unit prices are checked in the scan itself, see ``metered``), so their number follows
tokens, tools and prices, never the row count.
They stream (``yield_per``) and each consumer keeps per-token or per-key state only.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

from sqlalchemy import (
    Connection,
    and_,
    case,
    false,
    func,
    literal,
    literal_column,
    not_,
    null,
    or_,
    select,
)

from mcpbill_cli.ledger.models import calls
from mcpbill_cli.reconcile.metered import MeteredTerms, price_ok_column
from mcpbill_cli.reconcile.model import Window

c = calls.c
BATCH = 2000
CHARGE_PREFIX = "charge:"
# The price rules pricing.quote writes; any other (e.g. "x402") was priced outside the table.
TABLE_RULES = ("tools.", "tenant.", "free_tiers:", "default_price")


class CallGroup(NamedTuple):
    """Calls alike in everything reconcile checks. ``kind`` is ``charge`` (charged at once) or
    ``hold`` (held, then captured, voided or expired). ``external`` is 1 for captured calls
    priced outside the pricing table (an x402 downstream payment's price: not re-priced). For a
    captured call priced per unit,
    ``price_ok`` says (1 or 0) whether SQL found its amounts right; any other captured call
    keeps its held and charged amounts in the key, to be priced in Python. ``charged`` and
    ``held_total`` sum the group's calls; ``last_at`` is the latest ``created_at`` as the
    driver returns it; ``refunded`` counts its calls with something refunded."""

    jti: str
    tenant: str
    agent: str
    tool: str
    status: str
    pricing_version: int
    kind: str
    external: int
    amount_held: int | None
    amount: int | None
    price_ok: int | None
    calls: int
    charged: int
    held_total: int
    last_at: datetime
    refunded: int


def call_groups(conn: Connection, window: Window,
                terms: list[MeteredTerms]) -> Iterator[CallGroup]:
    """The window's calls (by ``created_at``), grouped; one scan, streamed."""
    kind = case((c.transfer_id.like(CHARGE_PREFIX + "%"), literal("charge")),
                else_=literal("hold"))
    table_priced = or_(*(c.price_rule.like(prefix + "%") for prefix in TABLE_RULES))
    source, metered, price_ok = (price_ok_column(terms, kind, table_priced) if terms
                                 else (calls, false(), null()))
    captured = c.status == "captured"
    priced_later = and_(captured, table_priced, not_(metered))
    keys = (c.jti, c.tenant, c.agent, c.tool, c.status, c.pricing_version)  # CallGroup's order
    # Grouped by output name: the big price_ok expression is written (and JIT-compiled) once.
    named = {"kind": kind, "external": case((and_(captured, not_(table_priced)), 1), else_=0),
             "held_key": case((priced_later, c.amount_held)),
             "amount_key": case((priced_later, c.amount)), "price_ok": price_ok}
    query = (select(*keys, *(expr.label(name) for name, expr in named.items()),
                    func.count(), func.coalesce(func.sum(c.amount), 0),
                    func.coalesce(func.sum(c.amount_held), 0), func.max(c.created_at),
                    func.count(case((c.refunded != 0, 1))))
             .select_from(source)
             .where(c.created_at >= window.start, c.created_at < window.end)
             .group_by(*keys, *(literal_column(name) for name in named))
             .execution_options(yield_per=BATCH))
    for row in conn.execute(query):
        *key, count, charged, held_total, last_at, refunded = row
        yield CallGroup._make((*key, int(count), int(charged), int(held_total), last_at,
                               int(refunded)))


@dataclass
class TokenTally:
    """What one token's calls in the window add up to, for the control totals against the
    transfers: charged at once, held (by outcome), captured from holds; and how many have
    something refunded (for the refunds check)."""

    tenant: str
    agent: str
    charges: list[int] = field(default_factory=lambda: [0, 0])  # count, amount
    captures: list[int] = field(default_factory=lambda: [0, 0])
    holds: dict[str, list[int]] = field(default_factory=dict)  # hold status -> count, amount
    last_charged_at: datetime | None = None
    refunded: int = 0

    def add(self, group: CallGroup) -> None:
        self.refunded += group.refunded
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

"""Checks on the window's charges: against their token (revoked? expired?) and against the
price their recorded pricing version gives.

Both read the grouped calls; only a group that fails is looked up row by row, by token.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import Connection, select

from mcpbill_cli.clock import aware, rfc3339
from mcpbill_cli.errors import BillingError
from mcpbill_cli.ledger.models import calls, pricing_versions, tokens
from mcpbill_cli.money import format_usd
from mcpbill_cli.pricing import Price, PricingTable, quote
from mcpbill_cli.reconcile.calls_pass import CallGroup, TokenTally
from mcpbill_cli.reconcile.collect import Findings
from mcpbill_cli.reconcile.metered import MeteredTerms, metered_terms
from mcpbill_cli.reconcile.model import Filters, Row, Window

c = calls.c
tk = tokens.c
IN_CHUNKS = 500
VERDICT_CACHE = 100_000  # priced group shapes remembered (per-unit tools make many)


def check_token_validity(conn: Connection, window: Window, tallies: Mapping[str, TokenTally],
                         leeway: int, filters: Filters, found: Findings) -> None:
    """No call charged after its token was revoked, or expired beyond the leeway."""
    charged = [jti for jti, tally in tallies.items() if tally.last_charged_at is not None]
    for token in _tokens(conn, charged):
        last = aware(tallies[token.jti].last_charged_at)  # type: ignore[arg-type]
        if token.revoked_at is not None and last > aware(token.revoked_at):
            _list_charges_after(conn, window, token.jti, aware(token.revoked_at), filters,
                                "charge_after_revocation", "revoked", found)
        expiry = aware(token.expires_at) + timedelta(seconds=leeway)
        if last > expiry:
            _list_charges_after(conn, window, token.jti, expiry, filters,
                                "charge_after_expiry", "expired (with leeway)", found)


def _tokens(conn: Connection, jtis: list[str]) -> Iterable[Any]:
    for start in range(0, len(jtis), IN_CHUNKS):
        chunk = jtis[start:start + IN_CHUNKS]
        yield from conn.execute(select(tk.jti, tk.revoked_at, tk.expires_at)
                                .where(tk.jti.in_(chunk)))


def _list_charges_after(conn: Connection, window: Window, jti: str, moment: datetime,
                        filters: Filters, name: str, what: str, found: Findings) -> None:
    query = _filtered(select(c.id, c.created_at).where(
        c.jti == jti, c.status == "captured", c.created_at > moment,
        c.created_at >= window.start, c.created_at < window.end), filters
    ).order_by(c.created_at, c.id)
    for row in conn.execute(query):
        found.add(name, Row("calls", row.id, f"charged at {rfc3339(row.created_at)}, "
                                             f"token {jti} {what} at {rfc3339(moment)}"))


def _filtered(query: Any, filters: Filters) -> Any:
    for column, value in ((c.tenant, filters.tenant), (c.agent, filters.agent),
                          (c.tool, filters.tool)):
        if value is not None:
            query = query.where(column == value)
    return query


class Charge(NamedTuple):
    """What decides whether a captured call was priced right."""

    tool: str
    tenant: str
    kind: str
    units: int | None
    amount_held: int | None
    amount: int | None


class PriceCheck:
    """Re-price the captured calls with their recorded pricing versions: per-unit calls in SQL
    (:meth:`terms` feeds the scan), the others here, group by group. Failing groups are counted
    at once and their calls named (by token) in :meth:`list_rows`, after the scan."""

    def __init__(self, conn: Connection, window: Window, found: Findings) -> None:
        self.conn = conn
        self.window = window
        self.found = found
        self.tables = {int(version): PricingTable.from_document(json.loads(document))
                       for version, document in conn.execute(select(
                           pricing_versions.c.version, pricing_versions.c.document))}
        self._verdicts: dict[tuple[Any, ...], tuple[str, str] | None] = {}
        self._failed: list[tuple[str, CallGroup, str]] = []

    def terms(self) -> list[MeteredTerms]:
        return metered_terms(self.tables)

    def check(self, group: CallGroup) -> None:
        if group.status != "captured" or group.price_ok == 1 or group.external:
            return
        key = (group.tenant, group.tool, group.kind, group.pricing_version, group.amount_held,
               group.amount, group.price_ok)
        if key not in self._verdicts:
            if len(self._verdicts) > VERDICT_CACHE:
                self._verdicts = {}
            self._verdicts[key] = self._verdict(group)
        verdict = self._verdicts[key]
        if verdict is not None:
            self._fail(*verdict, group)

    def _verdict(self, group: CallGroup) -> tuple[str, str] | None:
        table = self.tables.get(group.pricing_version)
        if table is None:
            return ("pricing_version_unrecorded",
                    f"pricing version {group.pricing_version} is not recorded")
        if group.price_ok == 0:
            return "charge_price_mismatch", ""  # per-unit: the detail depends on each call
        problem = price_problem(table, Charge(group.tool, group.tenant, group.kind, None,
                                              group.amount_held, group.amount))
        return None if problem is None else ("charge_price_mismatch", problem)

    def list_rows(self) -> None:
        """Name the calls of the failing groups, as many as the findings may list."""
        for name, group, detail in self._failed:
            if self.found.full(name):
                continue
            query = select(c.id, c.units, c.amount_held, c.amount).where(
                c.jti == group.jti, c.tool == group.tool, c.status == "captured",
                c.pricing_version == group.pricing_version,
                c.created_at >= self.window.start, c.created_at < self.window.end)
            if group.price_ok is None:
                query = query.where(_same(c.amount_held, group.amount_held),
                                    _same(c.amount, group.amount)).limit(self.found.max_rows)
            for row in self.conn.execute(query.order_by(c.created_at, c.id)):
                problem = detail or self._row_problem(group, row)
                if problem is not None:
                    self.found.show(name, Row("calls", row.id, problem))

    def _row_problem(self, group: CallGroup, row: Any) -> str | None:
        charge = Charge(group.tool, group.tenant, group.kind, row.units, row.amount_held,
                        row.amount)
        return price_problem(self.tables[group.pricing_version], charge)

    def _fail(self, name: str, detail: str, group: CallGroup) -> None:
        self.found.note(name, group.calls)
        if sum(1 for failed in self._failed if failed[0] == name) < self.found.max_rows:
            self._failed.append((name, group, detail))


def _same(column: Any, value: Any) -> Any:
    return column.is_(None) if value is None else column == value


def price_problem(table: PricingTable, charge: Charge) -> str | None:
    """Why this captured call's amounts are not what ``table`` prices, or None if they are."""
    try:
        price = quote(table, charge.tool, tenant=charge.tenant)
    except BillingError as exc:
        return f"charged {format_usd(charge.amount or 0)}: {exc.message}"
    expected_held, expected = _expected(price, charge)
    if charge.amount != expected:
        return (f"charged {format_usd(charge.amount or 0)}, version {table.version} prices it "
                f"{format_usd(expected)} ({price.rule})")
    if charge.amount_held != expected_held and not _within_hold(price, charge):
        return (f"held {format_usd(charge.amount_held or 0)}, version {table.version} holds "
                f"{format_usd(expected_held)} for {charge.tool}")
    return None


def _expected(price: Price, charge: Charge) -> tuple[int, int]:
    """(the hold, the charge) this price gives the call: a charge holds what it posts; a hold
    holds the price (per-unit tools: at most the maximum) and posts what the units reported
    cost, capped by the hold (no units reported: the whole hold)."""
    held = charge.amount_held or 0
    if charge.kind == "charge":
        amount = price.amount if charge.units is None else price.for_units(charge.units)
        return amount, amount
    if price.per_unit is None:
        return price.amount, price.amount
    if charge.units is None:
        return price.amount, held
    return price.amount, min(price.for_units(charge.units), held)


def _within_hold(price: Price, charge: Charge) -> bool:
    """A per-unit hold may be smaller than the maximum (``max_units`` was given)."""
    return (charge.kind != "charge" and price.per_unit is not None
            and 0 <= (charge.amount_held or 0) <= price.amount)

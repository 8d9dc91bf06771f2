"""Edits of a table in memory: each returns a new table, its version bumped."""

from __future__ import annotations

from dataclasses import replace

from mcpbill_cli.errors import InvalidInput, NotFound
from mcpbill_cli.pricing.table import PricingTable, TenantPricing, ToolPrice, name_problem


def set_price(
    table: PricingTable, tool: str, price: int, *, tenant: str | None = None,
    per_unit: bool = False, max_amount: int | None = None,
) -> PricingTable:
    """A new table (version + 1) where ``tool`` costs ``price`` (per unit, capped, if asked).

    With ``tenant``, the price is that tenant's own, which its discount does not touch. A tool
    listed already keeps its dedupe window and its ``x402`` choice (a per-unit price drops an
    x402 opt-in: ``exact`` cannot pay a price known only after the call).
    """
    entry = _new_entry(price, per_unit=per_unit, max_amount=max_amount)
    _require_name(tool, "tool")
    if tenant is None:
        listed = table.tools.get(tool)
        if listed is not None:  # a new price, not new terms: the tool keeps its dedupe window
            x402 = listed.x402 if entry.price is not None or not listed.x402 else None
            entry = replace(entry, dedupe_window=listed.dedupe_window, x402=x402)
        return replace(table, version=table.version + 1, tools={**table.tools, tool: entry})
    _require_name(tenant, "tenant")
    terms = table.tenants.get(tenant, TenantPricing())
    terms = replace(terms, tools={**terms.tools, tool: entry})
    return replace(table, version=table.version + 1, tenants={**table.tenants, tenant: terms})


def unset_price(table: PricingTable, tool: str, *, tenant: str | None = None) -> PricingTable:
    """A new table (version + 1) without ``tool``'s own price; :class:`NotFound` if it had none.

    A tenant left with no overrides, discount or cap is dropped from the table.
    """
    if tenant is None:
        if tool not in table.tools:
            raise NotFound(f"tool {tool!r} has no price of its own; see `mcpbill pricing show`",
                           tool=tool)
        tools = {name: entry for name, entry in table.tools.items() if name != tool}
        return replace(table, version=table.version + 1, tools=tools)
    terms = table.tenants.get(tenant)
    if terms is None or tool not in terms.tools:
        raise NotFound(f"tenant {tenant!r} has no price of its own for {tool!r}; "
                       f"see `mcpbill pricing show --tenant {tenant}`", tool=tool, tenant=tenant)
    terms = replace(terms, tools={name: e for name, e in terms.tools.items() if name != tool})
    tenants = {name: t for name, t in table.tenants.items() if name != tenant}
    if not terms.empty:
        tenants[tenant] = terms
    return replace(table, version=table.version + 1, tenants=tenants)


def _new_entry(price: int, *, per_unit: bool, max_amount: int | None) -> ToolPrice:
    if price < 0 or (max_amount is not None and max_amount < 0):
        raise InvalidInput("prices are 0 or more", field="price")
    if per_unit and max_amount is None:
        raise InvalidInput("a per-unit price needs a maximum per call (--max): "
                           "it is what a call holds before the tool reports its units",
                           field="max")
    if max_amount is not None and not per_unit:
        raise InvalidInput("a maximum (--max) only applies to a per-unit price (--per-unit)",
                           field="max")
    if per_unit:
        return ToolPrice(per_unit=price, max_price=max_amount)
    return ToolPrice(price=price)


def _require_name(name: str, what: str) -> None:
    problem = name_problem(name, what)
    if problem is not None:
        raise InvalidInput(problem, field=what)

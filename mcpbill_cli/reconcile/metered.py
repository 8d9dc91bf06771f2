"""Per-unit prices checked inside the calls scan, so units never become a grouping key.

A per-unit call's amount depends on the units it reported; grouping by units would make one
group per call. Instead, the per-unit terms of every recorded pricing version (taken from
``pricing.quote`` itself, tenant by tenant) are joined to the scan as a small inline table, and
SQL computes whether each captured call's amounts are what those terms give: ``price_ok`` is
1 or 0 for a per-unit call, NULL for any other (priced in Python from its group).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Integer,
    String,
    and_,
    case,
    func,
    literal,
    null,
    select,
    union_all,
)

from mcpbill_cli.errors import BillingError
from mcpbill_cli.ledger.models import calls
from mcpbill_cli.pricing import PricingTable, quote

c = calls.c
DEFAULT_TENANT = ""  # the terms of tenants the table does not list


@dataclass(frozen=True)
class MeteredTerms:
    """What one tenant pays per unit for one tool in one version (``per_unit`` 0: not per
    unit for this tenant: its own fixed price overrides)."""

    version: int
    tool: str
    tenant: str
    per_unit: int
    discount: int
    cap: int


def metered_terms(tables: Mapping[int, PricingTable]) -> list[MeteredTerms]:
    """The per-unit terms of each table, for every tool priced per unit for some tenant."""
    terms = []
    for version, table in sorted(tables.items()):
        tools = set(table.tools) | {tool for t in table.tenants.values() for tool in t.tools}
        for tool in sorted(tools):
            prices = {tenant: _terms(table, tool, tenant)
                      for tenant in (DEFAULT_TENANT, *sorted(table.tenants))}
            if any(per_unit for per_unit, _, _ in prices.values()):
                terms += [MeteredTerms(version, tool, tenant, *price)
                          for tenant, price in prices.items()]
    return terms


def _terms(table: PricingTable, tool: str, tenant: str) -> tuple[int, int, int]:
    try:
        price = quote(table, tool, tenant=tenant or None)
    except BillingError:
        return 0, 0, 0
    if price.per_unit is None or price.max_amount is None:
        return 0, 0, 0
    return price.per_unit, price.discount_percent, price.max_amount


def price_ok_column(terms: list[MeteredTerms], kind: Any,
                    table_priced: Any) -> tuple[Any, Any, Any]:
    """(the FROM clause of calls joined to the terms, whether a call is priced per unit, the
    ``price_ok`` expression: 1 or 0 for a captured per-unit call, else NULL)."""
    table = _terms_table(terms)
    own, base = table.alias("own"), table.alias("base")
    source = (calls.outerjoin(own, and_(own.c.version == c.pricing_version,
                                        own.c.tool == c.tool, own.c.tenant == c.tenant))
              .outerjoin(base, and_(base.c.version == c.pricing_version, base.c.tool == c.tool,
                                    base.c.tenant == DEFAULT_TENANT)))
    # A listed tenant's own row wins (its values are never NULL), else the default row.
    per_unit, discount, cap = (func.coalesce(getattr(own.c, name), getattr(base.c, name))
                               for name in ("per_unit", "discount", "cap"))
    cost = (c.units * per_unit * (100 - discount) + 50) // 100
    for_units = case((cost < cap, cost), else_=cap)
    charged_ok = case((c.units.is_(None), and_(c.amount == cap, c.amount_held == cap)),
                      else_=and_(c.amount == for_units, c.amount_held == for_units))
    captured_ok = and_(c.amount_held >= 0, c.amount_held <= cap, case(
        (c.units.is_(None), c.amount == c.amount_held),
        else_=c.amount == case((for_units < c.amount_held, for_units), else_=c.amount_held)))
    ok = case((kind == "charge", charged_ok), else_=captured_ok)
    metered = and_(c.status == "captured", table_priced,
                   func.coalesce(per_unit, 0) > 0)  # no terms: NULL
    return source, metered, case((metered, case((ok, 1), else_=0)), else_=null())


def _terms_table(terms: list[MeteredTerms]) -> Any:
    rows = [select(literal(t.version, Integer).label("version"),
                   literal(t.tool, String).label("tool"),
                   literal(t.tenant, String).label("tenant"),
                   literal(t.per_unit, BigInteger).label("per_unit"),
                   literal(t.discount, Integer).label("discount"),
                   literal(t.cap, BigInteger).label("cap")) for t in terms]
    return union_all(*rows).subquery("terms")

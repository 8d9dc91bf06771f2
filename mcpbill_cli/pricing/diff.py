"""Comparing two pricing tables, per tool and tenant (`mcpbill pricing diff`, edits)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from mcpbill_cli.money import format_usd
from mcpbill_cli.pricing.table import PricingTable, TenantPricing, key_path, render_window
from mcpbill_cli.ratelimits import LimitSet


@dataclass(frozen=True)
class Change:
    """One difference between two tables: a tool price, a tenant term, the default, a tier, a
    dedupe window, a rate limit, or an x402 term."""

    key: str
    kind: Literal["added", "removed", "changed"]
    before: str | None
    after: str | None
    tenant: str | None = None
    tool: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "kind": self.kind, "before": self.before, "after": self.after,
                "tenant": self.tenant, "tool": self.tool}


@dataclass(frozen=True)
class _Fact:
    value: str
    tenant: str | None = None
    tool: str | None = None


def diff_tables(old: PricingTable, new: PricingTable) -> list[Change]:
    """What changes from ``old`` to ``new``, per tool and tenant, sorted by key path."""
    before, after = _facts(old), _facts(new)
    changes = []
    for key in sorted(before.keys() | after.keys()):
        was, now = before.get(key), after.get(key)
        if was == now:
            continue
        kind: Literal["added", "removed", "changed"] = (
            "added" if was is None else "removed" if now is None else "changed")
        either = now if now is not None else was
        assert either is not None  # noqa: S101 - a key comes from one side at least
        changes.append(Change(key, kind, None if was is None else was.value,
                              None if now is None else now.value,
                              tenant=either.tenant, tool=either.tool))
    return changes


def _facts(table: PricingTable) -> dict[str, _Fact]:
    facts = {f"free_tiers:{pattern}": _Fact("free") for pattern in table.free_tiers}
    if table.default_price is not None:
        facts["default_price"] = _Fact(format_usd(table.default_price))
    if table.dedupe_window is not None:
        facts["dedupe_window"] = _Fact(render_window(table.dedupe_window))
    for name, entry in table.tools.items():
        facts[key_path(("tools", name))] = _Fact(entry.describe(), tool=name)
        if entry.dedupe_window is not None:
            facts[key_path(("tools", name, "dedupe_window"))] = _Fact(
                render_window(entry.dedupe_window), tool=name)
        if entry.x402 is not None:
            facts[key_path(("tools", name, "x402"))] = _Fact(_flag(entry.x402), tool=name)
    if table.x402 is not None:
        for key, value in table.x402.to_document().items():
            facts[key_path(("x402", key))] = _Fact(_flag(value))
    facts.update(_limit_facts(("limits",), table.limits))
    for tenant, terms in table.tenants.items():
        facts.update(_tenant_facts(tenant, terms))
    return facts


def _limit_facts(path: tuple[str, ...], limits: LimitSet | None, tenant: str | None = None
                 ) -> dict[str, _Fact]:
    """A fact per rate limit key set (``[limits]`` or a tenant's): its rates as written."""
    if limits is None:
        return {}
    return {key_path((*path, key)): _Fact(", ".join(rates), tenant=tenant)
            for key, rates in limits.to_document().items()}


def _flag(value: object) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _tenant_facts(tenant: str, terms: TenantPricing) -> dict[str, _Fact]:
    facts = {}
    if terms.discount_percent:
        facts[key_path(("tenants", tenant, "discount_percent"))] = _Fact(
            f"{terms.discount_percent}%", tenant=tenant)
    for key, cap in terms.caps.items():
        if cap is not None:
            facts[key_path(("tenants", tenant, key))] = _Fact(format_usd(cap), tenant=tenant)
    for name, entry in terms.tools.items():
        facts[key_path(("tenants", tenant, "tools", name))] = _Fact(
            entry.describe(), tenant=tenant, tool=name)
    facts.update(_limit_facts(("tenants", tenant, "limits"), terms.limits, tenant))
    return facts

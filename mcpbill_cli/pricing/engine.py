"""The price engine the verifier calls: what one call costs, and what a tenant's sheet says."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from mcpbill_cli.budgets import Budget, Period, Scope
from mcpbill_cli.errors import InvalidInput, PriceUnknown
from mcpbill_cli.money import format_usd
from mcpbill_cli.pricing.table import CURRENCY, PricingTable, TenantPricing, ToolPrice, known
from mcpbill_cli.ratelimits import LimitSet
from mcpbill_cli.scope import in_scope, overlap

DEFAULT_DEDUPE_WINDOW = 10  # seconds, for a tool whose table sets no dedupe window


def apply_discount(amount: int, percent: int) -> int:
    """``amount`` less ``percent`` %, rounded half up to the micro-USDC, in integers only."""
    return (amount * (100 - percent) + 50) // 100


@dataclass(frozen=True)
class Price:
    """What a call costs and why.

    ``amount`` is micro-USDC for the call; for a per-unit tool quoted without units it is the
    discounted maximum, i.e. what to hold. ``per_unit`` is the listed per-unit price before the
    discount, ``max_amount`` the discounted per-call maximum (``None`` for fixed prices).
    ``rule`` names the table entry that decided, ``version`` the table version.
    """

    amount: int
    rule: str
    version: int
    per_unit: int | None = None
    max_amount: int | None = None
    discount_percent: int = 0

    @property
    def free(self) -> bool:
        """True when the tool costs nothing whatever it reports (nothing to hold or capture)."""
        return self.amount == 0 and not self.max_amount

    def for_units(self, units: int) -> int:
        """The capture amount once the tool reported ``units``; a fixed price ignores units."""
        if self.per_unit is None or self.max_amount is None:
            return self.amount
        _check_units(units)
        return min(apply_discount(units * self.per_unit, self.discount_percent), self.max_amount)

    def describe(self) -> str:
        """``"0.002"``, ``"free"`` or ``"0.00001/unit less 20%, max 0.40"``, for people."""
        if self.free:
            return "free"
        if self.per_unit is None or self.max_amount is None:
            return format_usd(self.amount)
        discount = f" less {self.discount_percent}%" if self.discount_percent else ""
        return f"{format_usd(self.per_unit)}/unit{discount}, max {format_usd(self.max_amount)}"

    def to_dict(self) -> dict[str, Any]:
        """The price as JSON (camelCase, amounts as decimal strings), e.g. for ``_meta``."""
        doc: dict[str, Any] = {
            "amountUsd": format_usd(self.amount), "asset": CURRENCY, "rule": self.rule,
            "pricingVersion": self.version, "free": self.free,
            "discountPercent": self.discount_percent,
        }
        if self.per_unit is not None and self.max_amount is not None:
            doc["perUnitUsd"] = format_usd(self.per_unit)
            doc["maxUsd"] = format_usd(self.max_amount)
        return doc


def x402_offered(table: PricingTable, tool: str) -> bool:
    """Whether ``tool`` may be paid with x402 (``exact``): a fixed-price tool whose own ``x402``
    says so or, without one, ``[x402] enabled``. Per-unit tools never are. (A free call needs
    no payment: the caller checks the price.)"""
    entry = table.tools.get(tool)
    if entry is not None and entry.price is None:
        return False
    if entry is not None and entry.x402 is not None:
        return entry.x402
    if entry is None and table.default_price is None:
        return False
    return table.x402 is not None and table.x402.enabled


def quote(
    table: PricingTable, tool: str, *, tenant: str | None = None, units: int | None = None
) -> Price:
    """The price of one call (pure). ``units`` is what a per-unit tool reported, if known."""
    if units is not None:
        _check_units(units)
    terms = table.tenants.get(tenant) if tenant is not None else None
    if terms is not None and tool in terms.tools:
        return _priced(terms.tools[tool], f"tenant.{tenant}.tools.{tool}", table.version, 0, units)
    discount = terms.discount_percent if terms is not None else 0
    if tool in table.tools:
        return _priced(table.tools[tool], f"tools.{tool}", table.version, discount, units)
    tier = table.free_tier_for(tool)
    if tier is not None:
        return Price(amount=0, rule=f"free_tiers:{tier}", version=table.version)
    if table.default_price is not None:
        default = ToolPrice(price=table.default_price)
        return _priced(default, "default_price", table.version, discount, units)
    raise PriceUnknown(
        f"tool {tool!r} has no price in pricing table version {table.version} and there is no "
        f"default_price; the operator can add one with `mcpbill pricing set {tool} PRICE`",
        tool=tool, pricingVersion=table.version,
    )


def _priced(entry: ToolPrice, rule: str, version: int, discount: int, units: int | None) -> Price:
    if discount and entry.list_amount:
        rule = f"{rule}-discount:{discount}%"
    else:
        discount = 0
    if entry.price is not None:
        amount = apply_discount(entry.price, discount)
        return Price(amount, rule, version, discount_percent=discount)
    cap = apply_discount(known(entry.max_price), discount)
    price = Price(cap, rule, version, per_unit=entry.per_unit, max_amount=cap,
                  discount_percent=discount)
    return price if units is None else replace(price, amount=price.for_units(units))


# The ledger keeps units in a 64-bit signed column.
MAX_UNITS = 2**63 - 1


def _check_units(units: int) -> None:
    if isinstance(units, bool) or not isinstance(units, int) or not 0 <= units <= MAX_UNITS:
        raise InvalidInput(f"units must be a whole number from 0 to {MAX_UNITS}, not {units!r}",
                           field="units")


def daily_cap(table: PricingTable, tenant: str | None) -> int | None:
    """The tenant's daily spend cap in micro-USDC per UTC day, ``None`` when uncapped."""
    terms = table.tenants.get(tenant) if tenant is not None else None
    return terms.daily_cap if terms is not None else None


def rate_limits(table: PricingTable, tenant: str) -> LimitSet | None:
    """The rate limits of the tenant's tokens and agents: ``[limits]``, each key the tenant's
    ``[tenants.T.limits]`` sets replaced; ``None`` when neither says anything (the common case
    costs one dict lookup)."""
    terms = table.tenants.get(tenant)
    own = terms.limits if terms is not None else None
    if table.limits is None:
        return own
    return table.limits.under(own)


def budgets(table: PricingTable, tenant: str) -> tuple[Budget, ...]:
    """The tenant's caps a call of one of its agents counts against: the tenant's day and
    month, then the agent's (``agent_daily_cap``, ``agent_monthly_cap``: each agent alone)."""
    terms = table.tenants.get(tenant)
    if terms is None:
        return ()
    caps: tuple[tuple[Scope, Period, int | None], ...] = (
        ("tenant", "day", terms.daily_cap), ("tenant", "month", terms.monthly_cap),
        ("agent", "day", terms.agent_daily_cap), ("agent", "month", terms.agent_monthly_cap))
    return tuple(Budget(scope, period, cap) for scope, period, cap in caps if cap is not None)


def price_list(table: PricingTable, tenant: str | None = None) -> list[tuple[str, Price]]:
    """The effective price of every listed tool (the table's and the tenant's), by name."""
    terms = table.tenants.get(tenant) if tenant is not None else None
    names = set(table.tools) | set(terms.tools if terms is not None else ())
    return [(name, quote(table, name, tenant=tenant)) for name in sorted(names)]


def default_quote(table: PricingTable, tenant: str | None = None) -> Price | None:
    """What a tool that is neither listed nor in a free tier costs; ``None``: it is refused."""
    if table.default_price is None:
        return None
    terms = table.tenants.get(tenant) if tenant is not None else None
    discount = terms.discount_percent if terms is not None else 0
    default = ToolPrice(price=table.default_price)
    return _priced(default, "default_price", table.version, discount, None)


@dataclass(frozen=True)
class PriceSheet:
    """What a tenant (or anyone, with ``tenant=None``) pays: see :func:`price_sheet`. ``caps``
    are the tenant's, by their pricing.toml key (``daily_cap``, ``monthly_cap``,
    ``agent_daily_cap``, ``agent_monthly_cap``; ``None``: not set)."""

    version: int
    tenant: str | None
    tools: list[tuple[str, Price]]
    default: Price | None
    free_tiers: tuple[str, ...]
    caps: Mapping[str, int | None]
    tenant_has_terms: bool = False  # False for a tenant the table does not mention (a typo?)

    def to_dict(self) -> dict[str, Any]:
        return {
            "pricingVersion": self.version, "tenant": self.tenant,
            "tenantHasTerms": self.tenant_has_terms,
            "tools": [{"tool": name, **price.to_dict()} for name, price in self.tools],
            "default": None if self.default is None else self.default.to_dict(),
            "freeTiers": list(self.free_tiers),
            **{_camel(key) + "Usd": None if cap is None else format_usd(cap)
               for key, cap in self.caps.items()},
        }


def _camel(key: str) -> str:
    first, *rest = key.split("_")
    return first + "".join(word.capitalize() for word in rest)


def price_sheet(table: PricingTable, tenant: str | None = None) -> PriceSheet:
    """The effective price of every listed tool, the default, the free tiers and the caps."""
    terms = table.tenants.get(tenant, TenantPricing()) if tenant is not None else TenantPricing()
    return PriceSheet(
        version=table.version, tenant=tenant, tools=price_list(table, tenant),
        default=default_quote(table, tenant), free_tiers=table.free_tiers, caps=terms.caps,
        tenant_has_terms=tenant in table.tenants,
    )


def fallback_tools(
    table: PricingTable, tenant: str | None, scope: list[str], remaining: int
) -> list[tuple[str, int]]:
    """Paid listed tools in ``scope`` whose price (maximum, if per unit) fits ``remaining``.

    Cheapest first, then by name. Free tools are left to :func:`free_tools`.
    """
    fits = [
        (name, price.amount) for name, price in price_list(table, tenant)
        if 0 < price.amount <= remaining and in_scope(scope, name)
    ]
    return sorted(fits, key=lambda item: (item[1], item[0]))


def free_tools(table: PricingTable, tenant: str | None, scope: list[str]) -> list[str]:
    """Free listed tools in ``scope``, then the free-tier patterns (narrowed to the scope).

    A tier pattern covers every matching tool except those listed with a price of their own.
    """
    listed = [name for name, price in price_list(table, tenant)
              if price.free and in_scope(scope, name)]
    tiers = [common for tier in table.free_tiers for pattern in scope
             if (common := overlap(tier, pattern)) is not None]
    return list(dict.fromkeys(listed + tiers))


def dedupe_window(table: PricingTable, tool: str) -> int:
    """Seconds within which a repeat of the same call (token, tool, arguments) is a retry.

    The tool's own window if ``[tools.<tool>]`` sets one, else the table's ``dedupe_window``,
    else :data:`DEFAULT_DEDUPE_WINDOW`; 0 means every call is a new call.
    """
    entry = table.tools.get(tool)
    if entry is not None and entry.dedupe_window is not None:
        return entry.dedupe_window
    return table.dedupe_window if table.dedupe_window is not None else DEFAULT_DEDUPE_WINDOW

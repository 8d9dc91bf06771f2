"""Properties of the price engine over generated pricing tables (hypothesis)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcpbill_cli.errors import PriceUnknown
from mcpbill_cli.money import format_usd
from mcpbill_cli.pricing import (
    DEFAULT_DEDUPE_WINDOW,
    PricingTable,
    apply_discount,
    dedupe_window,
    diff_tables,
    fallback_tools,
    matches,
    parse_pricing,
    quote,
    render_pricing,
    set_price,
    unset_price,
)

TOOLS = ["search", "db.write", "db.read", "read.file", "read.x.y", "summarize", "status", "ls"]
TENANTS = ["acme", "globex"]
PATTERNS = ["read.*", "db.*", "status", "read.x.*", "*"]

tool_names = st.sampled_from(TOOLS)
tenant_names = st.none() | st.sampled_from([*TENANTS, "stranger"])
micro = st.integers(0, 10**9)  # up to 1,000 USDC
# The file may hold an amount as a decimal string or as a whole number of USDC.
amount_values = micro.map(format_usd) | st.integers(0, 1_000)
fixed_entries = st.fixed_dictionaries({"price": amount_values})
metered_entries = st.fixed_dictionaries(
    {"price_per_unit": st.integers(0, 10**6).map(format_usd), "max_price": amount_values})
tool_tables = st.dictionaries(tool_names, fixed_entries | metered_entries, max_size=5)
# Dedupe windows, spelled as people do; the normal form writes them back as seconds.
window_values = (st.sampled_from(["0s", "0", "10s", "2m", " 1H ", "1d"])
                 | st.integers(1, 86400).map(lambda seconds: f"{seconds}s"))
windowed_entries = st.builds(
    lambda entry, window: {**entry, **window}, fixed_entries | metered_entries,
    st.fixed_dictionaries({}, optional={"dedupe_window": window_values}))
listed_tool_tables = st.dictionaries(tool_names, windowed_entries, max_size=5)
tenant_documents = st.fixed_dictionaries({}, optional={
    "discount_percent": st.integers(0, 100),
    "daily_cap": micro.filter(bool).map(format_usd) | st.integers(1, 1_000),  # a cap is > 0
    "tools": tool_tables,
})
documents = st.fixed_dictionaries({"version": st.integers(0, 10**6)}, optional={
    "default_price": amount_values,
    "dedupe_window": window_values,
    "tools": listed_tool_tables,
    "free_tiers": st.lists(st.sampled_from(PATTERNS), unique=True).map(
        lambda patterns: {"patterns": patterns}),
    "tenants": st.dictionaries(st.sampled_from(TENANTS), tenant_documents, max_size=2),
})
tables = documents.map(PricingTable.from_document)
units = st.none() | st.integers(0, 10**9)


def expected_amount(table: PricingTable, tool: str, tenant: str | None) -> tuple[int, str] | None:
    """The resolution order written out plainly: (amount without units, rule prefix)."""
    terms = table.tenants.get(tenant) if tenant else None
    discount = terms.discount_percent if terms else 0
    if terms and tool in terms.tools:
        return terms.tools[tool].list_amount, f"tenant.{tenant}.tools."
    if tool in table.tools:
        return apply_discount(table.tools[tool].list_amount, discount), "tools."
    if any(matches(pattern, tool) for pattern in table.free_tiers):
        return 0, "free_tiers:"
    if table.default_price is not None:
        return apply_discount(table.default_price, discount), "default_price"
    return None


@given(tables, tool_names, tenant_names)
def test_resolution_order(table: PricingTable, tool: str, tenant: str | None) -> None:
    expected = expected_amount(table, tool, tenant)
    if expected is None:
        with pytest.raises(PriceUnknown):
            quote(table, tool, tenant=tenant)
        return
    price = quote(table, tool, tenant=tenant)
    assert price.amount == expected[0]
    assert price.rule.startswith(expected[1])
    assert price.version == table.version


@given(tables, tool_names, st.sampled_from(TENANTS), micro)
def test_a_tenant_tool_price_beats_everything(
    table: PricingTable, tool: str, tenant: str, amount: int
) -> None:
    table = set_price(table, tool, amount, tenant=tenant)
    price = quote(table, tool, tenant=tenant)
    assert (price.amount, price.rule) == (amount, f"tenant.{tenant}.tools.{tool}")


@given(tables, tool_names, micro, st.integers(0, 100))
def test_a_discounted_tool_price_beats_free_tiers_and_default(
    table: PricingTable, tool: str, amount: int, discount: int
) -> None:
    table = set_price(table, tool, amount)
    table = replace(table, free_tiers=("*",), tenants={}, default_price=1)
    acme = PricingTable.from_document(
        {**table.to_document(), "tenants": {"acme": {"discount_percent": discount}}})
    assert quote(acme, tool, tenant="acme").amount == apply_discount(amount, discount)


@given(tables, tool_names, st.sampled_from(["read.*", "*"]))
def test_a_free_tier_beats_the_default(table: PricingTable, tool: str, tier: str) -> None:
    table = replace(table, free_tiers=(tier,), default_price=10**6)
    if tool in table.tools or not matches(tier, tool):
        return
    assert quote(table, tool).amount == 0
    assert quote(table, tool).rule == f"free_tiers:{tier}"


@given(tables, tool_names, st.sampled_from(TENANTS), units)
def test_a_discount_never_increases_a_price(
    table: PricingTable, tool: str, tenant: str, reported: int | None
) -> None:
    terms = table.tenants.get(tenant)
    if terms is not None and tool in terms.tools:
        return  # the tenant's own price is not a discount
    try:
        plain = quote(table, tool, units=reported)
    except PriceUnknown:
        return
    assert quote(table, tool, tenant=tenant, units=reported).amount <= plain.amount


@given(tables, tool_names, tenant_names, units)
def test_a_price_is_never_negative_and_per_unit_never_exceeds_its_max(
    table: PricingTable, tool: str, tenant: str | None, reported: int | None
) -> None:
    try:
        price = quote(table, tool, tenant=tenant, units=reported)
    except PriceUnknown:
        return
    assert price.amount >= 0
    if price.max_amount is not None:
        assert price.amount <= price.max_amount
        assert quote(table, tool, tenant=tenant).amount == price.max_amount  # what a call holds
        if reported is not None:
            assert price.amount == quote(table, tool, tenant=tenant).for_units(reported)


@given(tables, tool_names, tenant_names, st.integers(0, 10**6), st.integers(0, 10**6))
def test_per_unit_charges_grow_with_units(
    table: PricingTable, tool: str, tenant: str | None, fewer: int, more: int
) -> None:
    fewer, more = sorted((fewer, more))
    try:
        price = quote(table, tool, tenant=tenant)
    except PriceUnknown:
        return
    assert 0 <= price.for_units(fewer) <= price.for_units(more) <= price.amount


@given(micro, st.integers(0, 100))
def test_discount_rounds_half_up_to_the_nearest_micro(amount: int, percent: int) -> None:
    discounted = apply_discount(amount, percent)
    assert 0 <= discounted <= amount
    # floor(x + 1/2): strictly above x - 1/2, at most x + 1/2 (in hundredths of a micro-USDC)
    assert -50 < discounted * 100 - amount * (100 - percent) <= 50


@given(tables)
def test_document_and_text_round_trips(table: PricingTable) -> None:
    assert PricingTable.from_document(table.to_document()) == table
    assert parse_pricing(render_pricing(table)) == table


@given(tables, tool_names, micro, st.none() | st.sampled_from(TENANTS))
def test_set_then_unset_restores_the_table_two_versions_on(
    table: PricingTable, tool: str, amount: int, tenant: str | None
) -> None:
    listed = table.tools if tenant is None else getattr(table.tenants.get(tenant), "tools", {})
    if tool in listed:
        return
    restored = unset_price(set_price(table, tool, amount, tenant=tenant), tool, tenant=tenant)
    assert restored == replace(table, version=table.version + 2)


@given(tables, tool_names, micro)
def test_diff_of_a_set_names_only_that_tool(table: PricingTable, tool: str, amount: int) -> None:
    changes = diff_tables(table, set_price(table, tool, amount))
    entry = table.tools.get(tool)
    if entry is not None and entry.price == amount:
        assert changes == []
        return
    assert [(change.tool, change.after) for change in changes] == [(tool, format_usd(amount))]
    assert diff_tables(table, table) == []


@given(tables, tool_names, micro)
def test_a_window_resolves_tool_then_table_then_default_and_survives_a_price_edit(
    table: PricingTable, tool: str, amount: int
) -> None:
    entry = table.tools.get(tool)
    expected = next(window for window in (
        entry.dedupe_window if entry is not None else None, table.dedupe_window,
        DEFAULT_DEDUPE_WINDOW) if window is not None)
    assert dedupe_window(table, tool) == expected
    assert 0 <= expected <= 86400
    assert dedupe_window(set_price(table, tool, amount), tool) == expected
    assert dedupe_window(set_price(table, tool, amount, tenant="acme"), tool) == expected


@given(tables, tenant_names, st.lists(st.sampled_from([*PATTERNS, *TOOLS]), max_size=3), micro)
def test_fallback_tools_fit_are_in_scope_and_cheapest_first(
    table: PricingTable, tenant: str | None, scope: list[str], remaining: int
) -> None:
    fallbacks = fallback_tools(table, tenant, scope, remaining)
    assert fallbacks == sorted(fallbacks, key=lambda item: (item[1], item[0]))
    for tool, amount in fallbacks:
        assert 0 < amount <= remaining
        assert any(matches(pattern, tool) for pattern in scope)
        assert quote(table, tool, tenant=tenant).amount == amount


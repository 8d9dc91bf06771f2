"""pricing.toml budget keys: a tenant's monthly cap and its agents' caps, validated, kept in
the normal form, and what a call of the tenant's agents counts against."""

from __future__ import annotations

import pytest

from mcpbill_cli.budgets import Budget
from mcpbill_cli.errors import PricingInvalid
from mcpbill_cli.pricing import PricingTable, budgets, parse_pricing

CAPS = """version = 1
[tenants.acme]
daily_cap = "2"
monthly_cap = "20"
agent_daily_cap = "0.50"
agent_monthly_cap = "5"
"""


def test_every_cap_is_read_kept_and_counted_in_order() -> None:
    table = parse_pricing(CAPS)
    assert PricingTable.from_document(table.to_document()) == table
    assert table.to_document()["tenants"]["acme"]["agent_daily_cap"] == "0.50"
    assert budgets(table, "acme") == (
        Budget("tenant", "day", 2_000_000), Budget("tenant", "month", 20_000_000),
        Budget("agent", "day", 500_000), Budget("agent", "month", 5_000_000))
    assert budgets(table, "other") == ()


@pytest.mark.parametrize(("old", "new", "key"), [
    ('monthly_cap = "20"', 'monthly_cap = "1"', "tenants.acme.monthly_cap"),
    ('agent_monthly_cap = "5"', 'agent_monthly_cap = "0.25"', "tenants.acme.agent_monthly_cap"),
    ('agent_daily_cap = "0.50"', 'agent_daily_cap = "-1"', "tenants.acme.agent_daily_cap"),
    ('monthly_cap = "20"', "monthly_cap = 20.0", "tenants.acme.monthly_cap"),
    ('daily_cap = "2"', 'daily_cap = "0"', "tenants.acme.daily_cap"),
    ('daily_cap = "2"', "daily_cap = 0", "tenants.acme.daily_cap"),
    ('agent_daily_cap = "0.50"', 'agent_daily_cap = "0.000"', "tenants.acme.agent_daily_cap"),
])
def test_a_bad_cap_is_refused_at_its_key(old: str, new: str, key: str) -> None:
    with pytest.raises(PricingInvalid) as caught:
        parse_pricing(CAPS.replace(old, new), source="pricing.toml")
    assert key in caught.value.message

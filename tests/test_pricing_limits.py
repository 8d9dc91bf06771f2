"""`[limits]` in pricing.toml: rates for every token and agent, replaced per tenant; bad
rates are PRICING_INVALID naming the key."""

from __future__ import annotations

import pytest

from mcpbill_cli.errors import PricingInvalid
from mcpbill_cli.pricing import SAMPLE_PRICING, parse_pricing, rate_limits
from mcpbill_cli.ratelimits import NO_LIMIT, Counter, Rate, counters

TABLE = """
version = 1
default_price = "0.01"

[limits]
token_calls = ["10/s", "300/m"]
token_spend = "1.00/m"
agent_calls = ["20/s"]

[tenants.acme.limits]
token_calls = ["50/s"]
"""


def test_limits_parse_round_trip_and_a_tenant_replaces_a_key() -> None:
    table = parse_pricing(TABLE)
    assert table.to_document()["limits"] == {
        "token_calls": ["10/s", "300/m"], "token_spend": ["1.00/m"], "agent_calls": ["20/s"]}
    assert parse_pricing(TABLE).digest == table.digest
    acme = rate_limits(table, "acme")
    assert acme is not None and acme.token_calls == (Rate(50, 1),)
    assert acme.token_spend == (Rate(1_000_000, 60, spend=True),)  # kept from [limits]
    other = rate_limits(table, "beta")
    assert other is not None and other.token_calls == (Rate(10, 1), Rate(300, 60))


def test_no_limits_anywhere_is_none() -> None:
    assert rate_limits(parse_pricing('version = 1\ndefault_price = "0.01"\n'), "acme") is None


def test_counters_merge_windows_and_take_the_lower_limit() -> None:
    table = rate_limits(parse_pricing(TABLE), "beta")
    found = counters(jti="tok_1", tenant="beta", agent="a", own=(Rate(5, 1),), table=table)
    assert found == (Counter("token", "tok_1", 1, 5, NO_LIMIT),
                     Counter("token", "tok_1", 60, 300, 1_000_000),
                     Counter("agent", "4:beta/a", 1, 20, NO_LIMIT))


@pytest.mark.parametrize(("limits", "key"), [
    ('token_calls = ["0/s"]', "token_calls"), ('token_calls = ["10/h"]', "token_calls"),
    ('agent_spend = ["-1/m"]', "agent_spend"), ("token_calls = 10", "token_calls"),
    ('token_calls = ["1/s", "2/s"]', "token_calls"), ('calls = ["1/s"]', "calls"),
])
def test_a_bad_rate_is_pricing_invalid_naming_its_key(limits: str, key: str) -> None:
    with pytest.raises(PricingInvalid) as bad:
        parse_pricing(f'version = 1\n[limits]\n{limits}\n')
    assert bad.value.details["key"] == f"limits.{key}", bad.value.to_dict()


def test_the_sample_table_shows_limits_commented_out_and_they_parse() -> None:
    assert parse_pricing(SAMPLE_PRICING).limits is None
    uncommented = SAMPLE_PRICING.replace("# [limits]", "[limits]").replace(
        "# token_calls", "token_calls").replace("# token_spend", "token_spend")
    limits = parse_pricing(uncommented).limits
    assert limits is not None and limits.token_calls == (Rate(10, 1), Rate(300, 60))

"""The pricing table: schema validation, the price engine, editing, atomic writes, reloading."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from mcpbill_cli.errors import (
    InvalidInput,
    NotFound,
    NotInitialized,
    PriceUnknown,
    PricingInvalid,
)
from mcpbill_cli.pricing import (
    SAMPLE_PRICING,
    Change,
    Price,
    PricingSource,
    PricingTable,
    TenantPricing,
    ToolPrice,
    apply_discount,
    daily_cap,
    diff_tables,
    edit_pricing,
    fallback_tools,
    free_tools,
    load_pricing,
    lock_path,
    matches,
    parse_pricing,
    price_list,
    quote,
    render_pricing,
    save_pricing,
    save_pricing_text,
    set_price,
    unset_price,
)

SAMPLE = parse_pricing(SAMPLE_PRICING, source="sample")


@pytest.fixture
def pricing_file(tmp_path: Path) -> Path:
    path = tmp_path / "pricing.toml"
    path.write_text(SAMPLE_PRICING)
    return path


# --- the sample and the resolution order ---------------------------------------------------


def test_sample_holds_every_kind_of_rule() -> None:
    assert SAMPLE == PricingTable(
        version=1,
        default_price=10_000,
        tools={
            "status": ToolPrice(price=0),
            "search": ToolPrice(price=2_000),
            "summarize": ToolPrice(per_unit=10, max_price=500_000),
        },
        free_tiers=("read.*",),
        tenants={"acme": TenantPricing(discount_percent=20, daily_cap=25_000_000,
                                       tools={"search": ToolPrice(price=1_000)})},
    )


@pytest.mark.parametrize(("tool", "tenant", "amount", "rule"), [
    ("search", None, 2_000, "tools.search"),
    ("search", "acme", 1_000, "tenant.acme.tools.search"),
    ("summarize", None, 500_000, "tools.summarize"),
    ("summarize", "acme", 400_000, "tools.summarize-discount:20%"),
    ("status", "acme", 0, "tools.status"),
    ("read.file", None, 0, "free_tiers:read.*"),
    ("read.file", "acme", 0, "free_tiers:read.*"),
    ("translate", None, 10_000, "default_price"),
    ("translate", "acme", 8_000, "default_price-discount:20%"),
    ("translate", "unknown-tenant", 10_000, "default_price"),
])
def test_quote_names_the_rule_that_decided(
    tool: str, tenant: str | None, amount: int, rule: str
) -> None:
    price = quote(SAMPLE, tool, tenant=tenant)
    assert (price.amount, price.rule, price.version) == (amount, rule, 1)


def test_a_listed_tool_beats_a_free_tier_that_covers_it() -> None:
    table = set_price(SAMPLE, "read.big", 50_000)
    assert quote(table, "read.big").rule == "tools.read.big"
    assert quote(table, "read.small").free


def test_the_first_matching_free_tier_decides() -> None:
    table = PricingTable(version=1, free_tiers=("read.x.*", "read.*", "*"))
    assert quote(table, "read.x.y").rule == "free_tiers:read.x.*"
    assert quote(table, "read.z").rule == "free_tiers:read.*"
    assert quote(table, "write").rule == "free_tiers:*"


def test_an_unknown_tool_without_default_price_is_price_unknown() -> None:
    table = PricingTable(version=7, tools={"search": ToolPrice(price=1)})
    with pytest.raises(PriceUnknown) as caught:
        quote(table, "translate")
    assert caught.value.to_dict()["code"] == "PRICE_UNKNOWN"
    assert caught.value.details == {"tool": "translate", "pricingVersion": 7}
    assert "mcpbill pricing set translate PRICE" in caught.value.message


def test_a_discount_is_not_applied_to_the_tenants_own_price() -> None:
    table = set_price(SAMPLE, "summarize", 3, tenant="acme", per_unit=True, max_amount=1_000)
    price = quote(table, "summarize", tenant="acme", units=100)
    assert (price.amount, price.max_amount, price.discount_percent) == (300, 1_000, 0)


@pytest.mark.parametrize(("amount", "percent", "expected"), [
    (1, 50, 1),        # 0.5 rounds up
    (3, 50, 2),        # 1.5 rounds up
    (5, 10, 5),        # 4.5 rounds up
    (4, 10, 4),        # 3.6 rounds up
    (14, 10, 13),      # 12.6 rounds up, 12.4 would round down:
    (16, 15, 14),      # 13.6 -> 14
    (2_000, 20, 1_600),
    (2_000, 0, 2_000),
    (2_000, 100, 0),
])
def test_discounts_round_half_up_to_the_micro_usdc(
    amount: int, percent: int, expected: int
) -> None:
    assert apply_discount(amount, percent) == expected


def test_a_free_tool_gets_no_discount_rule() -> None:
    assert quote(SAMPLE, "status", tenant="acme").rule == "tools.status"


# --- per-unit prices -------------------------------------------------------------------------


def test_per_unit_without_units_is_the_maximum_to_hold() -> None:
    price = quote(SAMPLE, "summarize")
    assert (price.amount, price.per_unit, price.max_amount) == (500_000, 10, 500_000)
    assert not price.free


@pytest.mark.parametrize(("units", "plain", "discounted"), [
    (0, 0, 0), (1, 10, 8), (12_345, 123_450, 98_760), (50_000, 500_000, 400_000),
    (10**12, 500_000, 400_000),
])
def test_per_unit_charges_units_times_price_capped_then_discounted(
    units: int, plain: int, discounted: int
) -> None:
    assert quote(SAMPLE, "summarize", units=units).amount == plain
    assert quote(SAMPLE, "summarize").for_units(units) == plain
    assert quote(SAMPLE, "summarize", tenant="acme", units=units).amount == discounted
    assert quote(SAMPLE, "summarize", tenant="acme").for_units(units) == discounted


def test_a_fixed_price_ignores_units() -> None:
    assert quote(SAMPLE, "search", units=1_000).amount == 2_000
    assert quote(SAMPLE, "search").for_units(1_000) == 2_000


@pytest.mark.parametrize("units", [-1, True])
def test_units_must_be_a_whole_number_zero_or_more(units: int) -> None:
    with pytest.raises(InvalidInput, match="units"):
        quote(SAMPLE, "summarize", units=units)
    with pytest.raises(InvalidInput, match="units"):
        quote(SAMPLE, "summarize").for_units(units)


@pytest.mark.parametrize("tool", ["search", "summarize"])
def test_units_the_ledger_cannot_keep_are_refused(tool: str) -> None:
    """Units are kept in a 64-bit column: one more than it holds is refused before any write,
    for a fixed-price tool too (it keeps the units it was given)."""
    assert quote(SAMPLE, tool, units=2**63 - 1).amount >= 0
    with pytest.raises(InvalidInput, match="units"):
        quote(SAMPLE, tool, units=2**63)


def test_price_to_dict_is_json_with_decimal_strings() -> None:
    assert quote(SAMPLE, "summarize", tenant="acme").to_dict() == {
        "amountUsd": "0.40", "asset": "USDC", "rule": "tools.summarize-discount:20%",
        "pricingVersion": 1, "free": False, "discountPercent": 20,
        "perUnitUsd": "0.00001", "maxUsd": "0.40",
    }
    assert quote(SAMPLE, "read.x").to_dict()["free"] is True


def test_a_per_unit_tool_capped_at_zero_is_free() -> None:
    table = set_price(SAMPLE, "echo", 5, per_unit=True, max_amount=0)
    assert quote(table, "echo").free


# --- caps, fallbacks and free tools ----------------------------------------------------------


def test_daily_cap_is_per_tenant() -> None:
    assert daily_cap(SAMPLE, "acme") == 25_000_000
    assert daily_cap(SAMPLE, "other") is None
    assert daily_cap(SAMPLE, None) is None


def test_fallback_tools_fit_the_remaining_budget_cheapest_first() -> None:
    table = set_price(SAMPLE, "db.read", 1_500)
    assert fallback_tools(table, None, ["*"], 10_000) == [("db.read", 1_500), ("search", 2_000)]
    assert fallback_tools(table, None, ["*"], 1_999) == [("db.read", 1_500)]
    assert fallback_tools(table, None, ["search"], 1_999) == []
    assert fallback_tools(table, None, ["*"], 10**9)[-1] == ("summarize", 500_000)
    assert fallback_tools(table, "acme", ["db.*", "search"], 1_199) == [("search", 1_000)]
    assert fallback_tools(table, "acme", ["db.*"], 1_200) == [("db.read", 1_200)]  # discounted


def test_free_tools_lists_free_tools_and_tiers_within_the_scope() -> None:
    assert free_tools(SAMPLE, None, ["*"]) == ["status", "read.*"]
    assert free_tools(SAMPLE, None, ["search"]) == []
    assert free_tools(SAMPLE, None, ["read.mail.*", "status"]) == ["status", "read.mail.*"]
    assert free_tools(SAMPLE, None, ["read.inbox"]) == ["read.inbox"]
    assert free_tools(SAMPLE, None, ["write.*"]) == []


def test_price_list_is_every_listed_tool_for_the_tenant() -> None:
    table = set_price(SAMPLE, "vip", 1, tenant="acme")
    assert [name for name, _ in price_list(table)] == ["search", "status", "summarize"]
    assert [name for name, _ in price_list(table, "acme")] == [
        "search", "status", "summarize", "vip"]


@pytest.mark.parametrize(("pattern", "tool", "expected"), [
    ("*", "anything.at.all", True), ("db.*", "db.write", True), ("db.*", "db.x.y", True),
    ("db.*", "db", False), ("db.*", "dbx.write", False), ("search", "search", True),
    ("search", "search.deep", False),
])
def test_patterns(pattern: str, tool: str, expected: bool) -> None:
    assert matches(pattern, tool) is expected


# --- bad input: every refusal names the key path --------------------------------------------


BAD_EDITS = [
    # (what to replace in the sample, with what, key path in the message, line)
    ('price = "0.002"', 'price = "-0.002"', "tools.search.price", 21),
    ('price = "0.002"', 'price = -2', "tools.search.price", 21),
    ('price = "0.002"', 'price = "0.0020001"', "tools.search.price", 21),
    ('price = "0.002"', "price = 0.5", "tools.search.price", 21),
    ('price = "0.002"', "price = true", "tools.search.price", 21),
    ('price = "0.002"', 'price = "1e3"', "tools.search.price", 21),
    ('price = "0.002"', 'price = "cheap"', "tools.search.price", 21),
    ('price = "0.002"', 'price = "0.002"\nmax_price = "1"', "tools.search.max_price", 22),
    ('price = "0.002"', 'price = "0.002"\nprice_per_unit = "1"', "tools.search", 20),
    ('price = "0.002"', 'cost = "0.002"', "tools.search.cost", 21),
    ('price = "0.002"', "", "tools.search", 20),
    ('max_price = "0.50"', "", "tools.summarize", 23),
    ('price_per_unit = "0.00001"', "", "tools.summarize", 23),
    ('max_price = "0.50"', 'max_price = "-1"', "tools.summarize.max_price", 25),
    ("discount_percent = 20", "discount_percent = 101", "tenants.acme.discount_percent", 32),
    ("discount_percent = 20", "discount_percent = -1", "tenants.acme.discount_percent", 32),
    ("discount_percent = 20", 'discount_percent = "20"', "tenants.acme.discount_percent", 32),
    ("discount_percent = 20", "discount_percent = 12.5", "tenants.acme.discount_percent", 32),
    ('daily_cap = "25.00"', "daily_cap = 25.0", "tenants.acme.daily_cap", 33),
    ('daily_cap = "25.00"', 'daily_cap = "25.00"\nrebate = 1', "tenants.acme.rebate", 34),
    ('price = "0.001"', 'price = "0.0000001"', "tenants.acme.tools.search.price", 36),
    ('patterns = ["read.*"]', 'patterns = ["re*d"]', "free_tiers.patterns", 29),
    ('patterns = ["read.*"]', 'patterns = "read.*"', "free_tiers.patterns", 29),
    ('patterns = ["read.*"]', 'patterns = ["read.*", "read.*"]', "free_tiers.patterns", 29),
    ('patterns = ["read.*"]', "patterns = [1]", "free_tiers.patterns", 29),
    ("[free_tiers]", "[free_tiers]\nfree = true", "free_tiers.free", 29),
    ("[tools.status]", '[tools."db.*"]', 'tools."db.*"', 17),
    ("[tools.status]", '[tools." status"]', 'tools." status"', 17),
    ('default_price = "0.01"', 'default_price = "0.01"\ncolour = "red"', "colour", 11),
    ('default_price = "0.01"', "default_price = 0.01", "default_price", 10),
    ('currency = "USDC"', 'currency = "EUR"', "currency", 7),
    ("version = 1", "version = -1", "version", 6),
    ("version = 1", 'version = "1"', "version", 6),
    ("version = 1", "", "version", None),
    ("[tenants.acme.tools.search]", "[tenants.acme.tools]\nsearch = 3",
     "tenants.acme.tools.search", 36),
]


@pytest.mark.parametrize(("old", "new", "key", "line"), BAD_EDITS)
def test_bad_input_names_the_key_path_and_line(
    old: str, new: str, key: str, line: int | None
) -> None:
    assert old in SAMPLE_PRICING
    with pytest.raises(PricingInvalid) as caught:
        parse_pricing(SAMPLE_PRICING.replace(old, new, 1), source="pricing.toml")
    where = f"pricing.toml line {line}" if line else "pricing.toml"
    assert caught.value.message.startswith(f"{where}: {key}: "), caught.value.message
    assert caught.value.details["key"] == key


def test_a_float_price_is_refused_with_the_quoted_form() -> None:
    with pytest.raises(PricingInvalid, match=r'quote it, e.g. price = "0.5"'):
        parse_pricing(SAMPLE_PRICING.replace('price = "0.002"', "price = 0.5"))


def test_a_toml_syntax_error_keeps_tomllibs_line_and_column() -> None:
    with pytest.raises(PricingInvalid) as caught:
        parse_pricing(SAMPLE_PRICING.replace('price = "0.002"', "price = "), source="p.toml")
    assert "(at line 21, column 23)" in caught.value.message
    assert caught.value.details == {"path": "p.toml", "line": 21}


def test_from_document_names_the_key_path_without_a_line() -> None:
    with pytest.raises(PricingInvalid, match=r"^<memory>: tools.search.price: '-1' is negative"):
        PricingTable.from_document({"version": 1, "tools": {"search": {"price": "-1"}}})


def test_an_empty_tenant_means_nothing_and_is_dropped() -> None:
    table = PricingTable.from_document({"version": 1, "tenants": {"acme": {}}})
    assert table == PricingTable(version=1)


def test_an_empty_tenant_is_not_written(tmp_path: Path) -> None:
    path = tmp_path / "pricing.toml"
    save_pricing(path, PricingTable(version=2, tenants={"acme": TenantPricing()}))
    assert "acme" not in path.read_text()
    assert load_pricing(path) == PricingTable(version=2)


def test_a_table_where_a_table_belongs() -> None:
    with pytest.raises(PricingInvalid, match=r"tools: must be a table, not a string"):
        PricingTable.from_document({"version": 1, "tools": "search"})


def test_a_missing_file_says_how_to_start_one(tmp_path: Path) -> None:
    with pytest.raises(PricingInvalid, match="mcpbill init"):
        load_pricing(tmp_path / "pricing.toml")


def test_an_unreadable_file_is_pricing_invalid(tmp_path: Path) -> None:
    with pytest.raises(PricingInvalid, match="cannot read"):
        load_pricing(tmp_path)  # a directory
    binary = tmp_path / "pricing.toml"
    binary.write_bytes(b"version = 1\n\xff\xfe")
    with pytest.raises(PricingInvalid, match="not UTF-8"):
        load_pricing(binary)


# --- round trips -----------------------------------------------------------------------------


def test_to_document_round_trips() -> None:
    assert PricingTable.from_document(SAMPLE.to_document()) == SAMPLE


def test_the_normal_form_is_sorted_and_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "pricing.toml"
    save_pricing(path, SAMPLE)
    assert load_pricing(path) == SAMPLE
    text = path.read_text()
    assert text == render_pricing(SAMPLE)
    assert text.index("[tools.search]") < text.index("[tools.status]") < text.index(
        "[tools.summarize]")


def test_an_empty_table_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "pricing.toml"
    save_pricing(path, PricingTable(version=0))
    assert load_pricing(path) == PricingTable(version=0)


# --- editing ---------------------------------------------------------------------------------


def test_set_price_bumps_the_version_and_adds_the_tool() -> None:
    table = set_price(SAMPLE, "db.write", 50_000)
    assert table.version == 2
    assert quote(table, "db.write").rule == "tools.db.write"
    assert SAMPLE.tools.get("db.write") is None  # the original is untouched


def test_set_price_per_unit_needs_a_maximum_and_only_then() -> None:
    with pytest.raises(InvalidInput, match="needs a maximum"):
        set_price(SAMPLE, "x", 1, per_unit=True)
    with pytest.raises(InvalidInput, match="only applies to a per-unit price"):
        set_price(SAMPLE, "x", 1, max_amount=5)
    table = set_price(SAMPLE, "x", 1, per_unit=True, max_amount=5)
    assert table.tools["x"] == ToolPrice(per_unit=1, max_price=5)


@pytest.mark.parametrize(("tool", "tenant", "message"), [
    ("db.*", None, "tool entries are exact names"),
    ("", None, "non-empty"),
    (" x", None, "without outer spaces"),
    ("x" * 129, None, "longer than 128"),
    ("x", "", "tenant name"),
])
def test_set_price_refuses_bad_names(tool: str, tenant: str | None, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        set_price(SAMPLE, tool, 1, tenant=tenant)


def test_set_price_refuses_negative_prices() -> None:
    with pytest.raises(InvalidInput, match="0 or more"):
        set_price(SAMPLE, "x", -1)


def test_tenant_set_and_unset() -> None:
    table = set_price(SAMPLE, "search", 500, tenant="globex")
    assert quote(table, "search", tenant="globex").rule == "tenant.globex.tools.search"
    table = unset_price(table, "search", tenant="globex")
    assert table.version == 3
    assert "globex" not in table.tenants  # nothing left of it
    table = unset_price(table, "search", tenant="acme")
    assert table.tenants["acme"] == TenantPricing(discount_percent=20, daily_cap=25_000_000)
    assert quote(table, "search", tenant="acme").rule == "tools.search-discount:20%"


def test_unset_what_is_not_there_is_not_found() -> None:
    with pytest.raises(NotFound, match="'translate' has no price of its own"):
        unset_price(SAMPLE, "translate")
    with pytest.raises(NotFound, match="tenant 'acme' has no price of its own for 'status'"):
        unset_price(SAMPLE, "status", tenant="acme")
    with pytest.raises(NotFound, match="tenant 'nobody'"):
        unset_price(SAMPLE, "search", tenant="nobody")


# --- writing ---------------------------------------------------------------------------------


def test_save_refuses_a_table_that_fails_validation_and_leaves_the_file(pricing_file: Path) -> None:
    before = pricing_file.read_bytes()
    broken = PricingTable(version=2, tools={"search": ToolPrice(price=-5)})
    with pytest.raises(PricingInvalid, match="tools.search.price"):
        save_pricing(pricing_file, broken)
    assert pricing_file.read_bytes() == before
    assert sorted(p.name for p in pricing_file.parent.iterdir()) == ["pricing.toml"]


def test_save_keeps_the_files_mode_and_leaves_no_temp_file(pricing_file: Path) -> None:
    pricing_file.chmod(0o640)
    save_pricing(pricing_file, set_price(SAMPLE, "x", 1))
    assert pricing_file.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in pricing_file.parent.iterdir()) == ["pricing.toml"]


def test_save_pricing_text_keeps_comments_and_refuses_bad_text(tmp_path: Path) -> None:
    path = tmp_path / "pricing.toml"
    assert save_pricing_text(path, SAMPLE_PRICING) == SAMPLE
    assert path.read_text() == SAMPLE_PRICING
    with pytest.raises(PricingInvalid):
        save_pricing_text(path, "version = 2\nbogus = 1\n")
    assert path.read_text() == SAMPLE_PRICING


def test_edit_pricing_reads_edits_and_writes_under_a_lock(pricing_file: Path) -> None:
    edit = edit_pricing(pricing_file, lambda table: set_price(table, "search", 3_000))
    assert (edit.before.version, edit.after.version) == (1, 2)
    assert load_pricing(pricing_file) == edit.after
    assert edit.changes == [Change("tools.search", "changed", "0.002", "0.003", tool="search")]
    assert lock_path(pricing_file).exists()


def test_edit_pricing_starts_an_empty_table_when_there_is_no_file(tmp_path: Path) -> None:
    path = tmp_path / "pricing.toml"
    edit = edit_pricing(path, lambda table: set_price(table, "search", 1))
    assert edit.before == PricingTable(version=0)
    assert load_pricing(path) == PricingTable(version=1, tools={"search": ToolPrice(price=1)})


def test_edit_pricing_without_a_home_is_not_initialized(tmp_path: Path) -> None:
    with pytest.raises(NotInitialized, match="mcpbill init"):
        edit_pricing(tmp_path / "nowhere" / "pricing.toml", lambda table: table)


def test_a_failed_edit_leaves_the_file_unchanged(pricing_file: Path) -> None:
    before = pricing_file.read_bytes()
    with pytest.raises(NotFound):
        edit_pricing(pricing_file, lambda table: unset_price(table, "translate"))
    assert pricing_file.read_bytes() == before


def test_editing_a_broken_file_is_refused_and_leaves_it(pricing_file: Path) -> None:
    pricing_file.write_text("version = 1\n[tools.search]\nprice = 0.5\n")
    before = pricing_file.read_bytes()
    with pytest.raises(PricingInvalid, match="line 3: tools.search.price"):
        edit_pricing(pricing_file, lambda table: set_price(table, "x", 1))
    assert pricing_file.read_bytes() == before


# --- reloading -------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_pricing_source_picks_up_an_edit(pricing_file: Path) -> None:
    source = PricingSource(pricing_file, check_interval=0)
    assert quote(source.current(), "search").amount == 2_000
    edit_pricing(pricing_file, lambda table: set_price(table, "search", 3_000))
    price = quote(source.current(), "search")
    assert (price.amount, price.version) == (3_000, 2)
    assert source.last_error is None


def test_pricing_source_checks_the_file_at_most_every_interval(pricing_file: Path) -> None:
    clock = FakeClock()
    source = PricingSource(pricing_file, clock=clock)
    edit_pricing(pricing_file, lambda table: set_price(table, "search", 3_000))
    clock.now += 0.4
    assert source.current().version == 1
    clock.now += 0.2
    assert source.current().version == 2


def test_pricing_source_keeps_the_last_good_table_on_a_broken_write(
    pricing_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = PricingSource(pricing_file, check_interval=0)
    good = source.current()
    pricing_file.write_text(SAMPLE_PRICING.replace('price = "0.002"', 'price = "-1"'))
    with caplog.at_level(logging.WARNING, logger="mcpbill"):
        assert source.current() is good
        assert source.current() is good
    assert isinstance(source.last_error, PricingInvalid)
    assert "tools.search.price" in source.last_error.message
    assert len(caplog.records) == 1  # logged once per broken version, not on every call
    assert "still charging version 1" in caplog.records[0].getMessage()
    save_pricing(pricing_file, set_price(good, "search", 4_000))
    assert quote(source.current(), "search").amount == 4_000
    assert source.last_error is None


def test_pricing_source_keeps_the_last_good_table_when_the_file_goes(pricing_file: Path) -> None:
    source = PricingSource(pricing_file, check_interval=0)
    pricing_file.unlink()
    assert source.current() == SAMPLE
    assert source.last_error is not None and "no pricing table" in source.last_error.message


def test_pricing_source_raises_on_a_broken_file_at_first_load(pricing_file: Path) -> None:
    pricing_file.write_text("version = 1\nprice = 1\n")
    with pytest.raises(PricingInvalid, match="price: unknown key"):
        PricingSource(pricing_file)


def test_pricing_source_of_a_fixed_table_never_touches_disk() -> None:
    source = PricingSource(SAMPLE, check_interval=0)
    assert source.current() is SAMPLE and source.path is None


def test_pricing_source_sees_a_same_size_rewrite(pricing_file: Path) -> None:
    source = PricingSource(pricing_file, check_interval=0)
    replaced = SAMPLE_PRICING.replace('price = "0.002"', 'price = "0.003"')
    pricing_file.write_text(replaced)
    os.utime(pricing_file, ns=(1, 1))  # a different mtime, same size and inode
    assert quote(source.current(), "search").amount == 3_000


def test_pricing_source_warns_when_prices_change_without_a_version_bump(
    pricing_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = PricingSource(pricing_file, check_interval=0)
    pricing_file.write_text(SAMPLE_PRICING.replace('price = "0.002"', 'price = "0.003"'))
    os.utime(pricing_file, ns=(1, 1))  # the same size: make sure the stamp changes
    with caplog.at_level(logging.WARNING, logger="mcpbill"):
        assert quote(source.current(), "search").amount == 3_000  # in force anyway
        assert source.current().version == 1
    assert source.last_error is None
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert f"pricing table {pricing_file} changed without a version bump" in message
    assert "version 1 now has other prices" in message
    assert "in force anyway" in message and "under a new version number" in message
    assert "bump `version`" in message and "`mcpbill pricing set`" in message


def test_pricing_source_is_quiet_about_bumped_or_only_reformatted_files(
    pricing_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = PricingSource(pricing_file, check_interval=0)
    with caplog.at_level(logging.WARNING, logger="mcpbill"):
        pricing_file.write_text(render_pricing(SAMPLE))  # no comments, the same prices
        os.utime(pricing_file, ns=(1, 1))
        assert source.current() == SAMPLE
        edit_pricing(pricing_file, lambda table: set_price(table, "search", 3_000))
        assert source.current().version == 2
    assert caplog.records == []


# --- diffs -----------------------------------------------------------------------------------


def test_diff_tables_per_tool_and_tenant() -> None:
    new = set_price(SAMPLE, "search", 2_500)
    new = unset_price(new, "status")
    new = set_price(new, "summarize", 20, tenant="acme", per_unit=True, max_amount=100_000)
    new = PricingTable(
        version=new.version, default_price=None, tools=new.tools, free_tiers=("read.*", "ls"),
        tenants={**new.tenants, "acme": TenantPricing(
            discount_percent=10, daily_cap=None, tools=new.tenants["acme"].tools)},
    )
    assert diff_tables(SAMPLE, new) == [
        Change("default_price", "removed", "0.01", None),
        Change("free_tiers:ls", "added", None, "free"),
        Change("tenants.acme.daily_cap", "removed", "25.00", None, tenant="acme"),
        Change("tenants.acme.discount_percent", "changed", "20%", "10%", tenant="acme"),
        Change("tenants.acme.tools.summarize", "added", None, "0.00002/unit, max 0.10",
               tenant="acme", tool="summarize"),
        Change("tools.search", "changed", "0.002", "0.0025", tool="search"),
        Change("tools.status", "removed", "0.00", None, tool="status"),
    ]
    assert diff_tables(SAMPLE, SAMPLE) == []


def test_a_version_bump_alone_is_no_change() -> None:
    bumped = PricingTable.from_document({**SAMPLE.to_document(), "version": 9})
    assert diff_tables(SAMPLE, bumped) == []


def test_change_to_dict() -> None:
    change = Change('tools."db.write"', "added", None, "0.05", tool="db.write")
    assert change.to_dict() == {"key": 'tools."db.write"', "kind": "added", "before": None,
                                "after": "0.05", "tenant": None, "tool": "db.write"}


def test_price_is_a_frozen_value() -> None:
    price = Price(amount=1, rule="tools.x", version=1)
    with pytest.raises(AttributeError):
        price.amount = 2  # type: ignore[misc]

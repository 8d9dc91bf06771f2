"""The dedupe window in the pricing table: parsing, refusals, resolution, normal form, diffs."""

from __future__ import annotations

from pathlib import Path

import pytest

from mcpbill_cli.errors import PricingInvalid
from mcpbill_cli.pricing import (
    DEFAULT_DEDUPE_WINDOW,
    SAMPLE_PRICING,
    Change,
    PricingTable,
    ToolPrice,
    dedupe_window,
    diff_tables,
    edit_pricing,
    load_pricing,
    parse_pricing,
    render_pricing,
    save_pricing,
    set_price,
    unset_price,
)

PRICING = """\
version = 3
dedupe_window = "30s"

[tools.search]
price = "0.002"

[tools.random_number]
price = "0.001"
dedupe_window = "0s"

[tools."db.write"]
price_per_unit = "0.00001"
max_price = "0.50"
dedupe_window = "2m"

[tenants.acme.tools.search]
price = "0.001"
"""
TABLE = parse_pricing(PRICING, source="pricing.toml")


def test_a_tools_own_window_beats_the_tables_which_beats_the_default() -> None:
    assert dedupe_window(TABLE, "random_number") == 0
    assert dedupe_window(TABLE, "db.write") == 120
    assert dedupe_window(TABLE, "search") == 30  # listed, but without a window of its own
    assert dedupe_window(TABLE, "unlisted") == 30
    assert dedupe_window(PricingTable(version=1), "search") == DEFAULT_DEDUPE_WINDOW == 10


def test_windows_are_kept_on_the_table_and_its_tools_in_seconds() -> None:
    assert TABLE.dedupe_window == 30
    assert TABLE.tools["random_number"] == ToolPrice(price=1_000, dedupe_window=0)
    assert TABLE.tools["search"].dedupe_window is None
    assert TABLE.tenants["acme"].tools["search"].dedupe_window is None


@pytest.mark.parametrize(("written", "seconds"), [
    ('"0s"', 0), ('"0"', 0), ('"0m"', 0), ('"1s"', 1), ('"10s"', 10), ('" 2M "', 120),
    ('"1h"', 3600), ('"24h"', 86400), ('"1d"', 86400),
])
def test_a_window_is_a_duration_and_zero_is_allowed(written: str, seconds: int) -> None:
    table = parse_pricing(f"version = 1\ndedupe_window = {written}\n")
    assert table.dedupe_window == seconds


BAD_WINDOWS = [
    # (the line, the key path in the message, its line, what the message says)
    ('dedupe_window = "10"', "dedupe_window", 2, "'10' is not a duration"),
    ('dedupe_window = "soon"', "dedupe_window", 2, "'soon' is not a duration"),
    ('dedupe_window = "-1s"', "dedupe_window", 2, "'-1s' is not a duration"),
    ('dedupe_window = "1.5s"', "dedupe_window", 2, "'1.5s' is not a duration"),
    ('dedupe_window = 10', "dedupe_window", 2, 'must be a duration string like "10s"'),
    ('dedupe_window = 0.5', "dedupe_window", 2, "not a float"),
    ('dedupe_window = "25h"', "dedupe_window", 2, "longer than a day"),
    ('dedupe_window = "2d"', "dedupe_window", 2, "longer than a day"),
    ('[tools.search]\nprice = "1"\ndedupe_window = "x"', "tools.search.dedupe_window", 4,
     "'x' is not a duration"),
    ('[tools.search]\ndedupe_window = "5s"', "tools.search", 2, "has no price"),
    ('[tools."db.write"]\nprice = "1"\ndedupe_window = true', 'tools."db.write".dedupe_window',
     4, "not a boolean"),
    ('[tenants.acme.tools.search]\nprice = "1"\ndedupe_window = "0s"',
     "tenants.acme.tools.search.dedupe_window", 4,
     "the same for every tenant: set it under [tools.search] instead"),
    ('[tenants.acme]\ndedupe_window = "0s"', "tenants.acme.dedupe_window", 3, "unknown key"),
]


@pytest.mark.parametrize(("line", "key", "number", "says"), BAD_WINDOWS)
def test_a_bad_window_names_its_key_path_and_line(
    line: str, key: str, number: int, says: str
) -> None:
    with pytest.raises(PricingInvalid) as caught:
        parse_pricing(f"version = 1\n{line}\n", source="pricing.toml")
    assert caught.value.message.startswith(f"pricing.toml line {number}: {key}: "), (
        caught.value.message)
    assert says in caught.value.message
    assert (caught.value.details["key"], caught.value.details["line"]) == (key, number)


def test_a_bad_window_in_a_document_names_its_key_path() -> None:
    with pytest.raises(PricingInvalid) as caught:
        PricingTable.from_document(
            {"version": 1, "tools": {"search": {"price": "1", "dedupe_window": "1w"}}})
    assert caught.value.message.startswith("<memory>: tools.search.dedupe_window: '1w' is not")


def test_the_normal_form_writes_windows_as_seconds_only_when_set() -> None:
    document = TABLE.to_document()
    assert document["dedupe_window"] == "30s"
    assert document["tools"]["random_number"] == {"price": "0.001", "dedupe_window": "0s"}
    assert document["tools"]["db.write"]["dedupe_window"] == "120s"
    assert "dedupe_window" not in document["tools"]["search"]
    assert PricingTable(version=1).to_document() == {"version": 1, "currency": "USDC"}
    assert parse_pricing(render_pricing(TABLE)) == TABLE


def test_the_digest_covers_the_window() -> None:
    without = PricingTable(version=3, tools={"search": ToolPrice(price=2_000)})
    assert without.digest != PricingTable(
        version=3, tools={"search": ToolPrice(price=2_000, dedupe_window=0)}).digest
    assert without.digest != PricingTable(
        version=3, tools={"search": ToolPrice(price=2_000)}, dedupe_window=10).digest


def test_a_saved_table_reads_back_with_its_windows(tmp_path: Path) -> None:
    path = tmp_path / "pricing.toml"
    save_pricing(path, TABLE)
    assert load_pricing(path) == TABLE
    assert 'dedupe_window = "0s"' in path.read_text()


def test_setting_a_price_keeps_the_tools_window(tmp_path: Path) -> None:
    path = tmp_path / "pricing.toml"
    path.write_text(PRICING)
    edit = edit_pricing(path, lambda table: set_price(table, "random_number", 5_000))
    assert edit.after.tools["random_number"] == ToolPrice(price=5_000, dedupe_window=0)
    assert load_pricing(path).tools["random_number"].dedupe_window == 0
    assert load_pricing(path).dedupe_window == 30
    metered = set_price(TABLE, "db.write", 20, per_unit=True, max_amount=100_000)
    assert metered.tools["db.write"].dedupe_window == 120


def test_a_tenant_price_does_not_take_the_tools_window() -> None:
    table = set_price(TABLE, "random_number", 500, tenant="acme")
    assert table.tenants["acme"].tools["random_number"].dedupe_window is None
    assert dedupe_window(table, "random_number") == 0
    assert parse_pricing(render_pricing(table)) == table


def test_unsetting_a_price_drops_the_tools_window_with_it() -> None:
    table = unset_price(TABLE, "random_number")
    assert dedupe_window(table, "random_number") == 30
    assert Change("tools.random_number.dedupe_window", "removed", "0s", None,
                  tool="random_number") in diff_tables(TABLE, table)


def test_diff_reports_window_changes() -> None:
    document = TABLE.to_document()
    document["dedupe_window"] = "10s"
    document["tools"]["search"]["dedupe_window"] = "0s"
    document["tools"]["db.write"].pop("dedupe_window")
    assert diff_tables(TABLE, PricingTable.from_document(document)) == [
        Change("dedupe_window", "changed", "30s", "10s"),
        Change('tools."db.write".dedupe_window', "removed", "120s", None, tool="db.write"),
        Change("tools.search.dedupe_window", "added", None, "0s", tool="search"),
    ]
    respelled = PRICING.replace('"30s"', '"30S"').replace('"2m"', '"120s"')
    assert diff_tables(TABLE, parse_pricing(respelled)) == []


def test_the_sample_documents_the_window_and_still_validates() -> None:
    assert parse_pricing(SAMPLE_PRICING).dedupe_window is None
    assert '# dedupe_window = "10s"' in SAMPLE_PRICING
    uncommented = SAMPLE_PRICING.replace('# dedupe_window = "10s"', 'dedupe_window = "10s"')
    assert parse_pricing(uncommented).dedupe_window == 10

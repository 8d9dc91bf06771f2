"""Money parsing and formatting: exact, round-trips, refuses everything ambiguous."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcpbill_cli.errors import InvalidInput
from mcpbill_cli.money import MAX_MICRO, format_usd, parse_usd

amounts = st.integers(min_value=1, max_value=MAX_MICRO)


@given(amounts)
def test_format_then_parse_is_identity(micro: int) -> None:
    assert parse_usd(format_usd(micro)) == micro


@given(amounts)
def test_dollar_sign_and_padding_are_accepted(micro: int) -> None:
    text = format_usd(micro)
    assert parse_usd(f"${text}") == parse_usd(f"  {text} ") == micro


@given(st.integers(min_value=0, max_value=MAX_MICRO), st.integers(min_value=0, max_value=4))
def test_trailing_zeros_up_to_six_decimals_never_change_the_amount(micro: int, zeros: int) -> None:
    text = format_usd(micro)
    padded = text + "0" * min(zeros, 6 - len(text.split(".")[1]))
    assert parse_usd(padded, allow_zero=True) == micro


def test_a_seventh_decimal_is_refused_even_when_zero() -> None:
    with pytest.raises(InvalidInput, match="more than 6 decimals"):
        parse_usd("5.0000000")


@given(st.integers(min_value=-MAX_MICRO, max_value=MAX_MICRO))
def test_format_has_at_least_two_decimals_and_at_most_six(micro: int) -> None:
    decimals = format_usd(micro).split(".")[1]
    assert 2 <= len(decimals) <= 6


@pytest.mark.parametrize(("text", "micro"), [
    ("5", 5_000_000), ("5.00", 5_000_000), ("$5", 5_000_000), ("0.000001", 1),
    (".5", 500_000), ("10.", 10_000_000), ("0.002", 2_000),
])
def test_accepted_forms(text: str, micro: int) -> None:
    assert parse_usd(text) == micro


@pytest.mark.parametrize("text", [
    "-1", "abc", "NaN", "nan", "inf", "1e3", "1E-6", "0.0000001", "1,000", "", " ", "$",
    "5 USD", "0x10", "--5", "+5", "1_000", "٣",
])
def test_refused_forms(text: str) -> None:
    with pytest.raises(InvalidInput):
        parse_usd(text)


def test_zero_is_refused_unless_allowed() -> None:
    with pytest.raises(InvalidInput, match="more than 0"):
        parse_usd("0")
    assert parse_usd("0.00", allow_zero=True) == 0


def test_amounts_beyond_the_ledger_range_are_refused() -> None:
    with pytest.raises(InvalidInput, match="too large"):
        parse_usd("99999999999")


def test_formatting_examples() -> None:
    assert [format_usd(m) for m in (5_000_000, 2_000, 1, 10_500_000, 0, -1_500_000)] == [
        "5.00", "0.002", "0.000001", "10.50", "0.00", "-1.50"]

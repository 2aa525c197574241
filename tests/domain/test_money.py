from decimal import Decimal

import pytest

from streams.domain.money import (
    InvalidDecimal,
    UnknownCurrency,
    format_money,
    format_quantity,
    minor_units,
    parse_decimal,
    round_money,
)


def test_minor_units_from_babel():
    assert minor_units("EUR") == 2
    assert minor_units("USD") == 2
    assert minor_units("JPY") == 0
    assert minor_units("KWD") == 3


@pytest.mark.parametrize("code", ["ZZZ", "eur", "", "EURO", 978])
def test_unknown_currency_rejected(code):
    with pytest.raises(UnknownCurrency):
        minor_units(code)


@pytest.mark.parametrize(
    ("amount", "currency", "expected"),
    [
        ("0.125", "EUR", "0.12"),  # half to even: down
        ("0.135", "EUR", "0.14"),  # half to even: up
        ("-0.125", "EUR", "-0.12"),
        ("0.1251", "EUR", "0.13"),  # not a tie
        ("2.5", "JPY", "2"),
        ("3.5", "JPY", "4"),
        ("1000", "JPY", "1000"),
        ("1.0005", "KWD", "1.000"),
        ("7", "EUR", "7.00"),
        ("-0.001", "EUR", "0.00"),  # never "-0.00"
    ],
)
def test_round_half_even_to_minor_unit(amount, currency, expected):
    assert format_money(Decimal(amount), currency) == expected


def test_round_money_is_exactly_quantized():
    assert round_money(Decimal("12.345"), "EUR").as_tuple().exponent == -2
    assert round_money(Decimal("12.5"), "JPY").as_tuple().exponent == 0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1.50", "1.50"),
        ("0", "0"),
        (3, "3"),
        ("-0", "0"),
        ("1e3", "1E+3"),
        ("0.000001", "0.000001"),
    ],
)
def test_parse_decimal_accepts_strings_and_ints(value, expected):
    assert str(parse_decimal(value)) == expected


@pytest.mark.parametrize(
    "value",
    [1.5, True, None, "abc", "NaN", "Infinity", " 1", "", "1e30", "0.0000000000000000001", []],
)
def test_parse_decimal_rejects(value):
    with pytest.raises(InvalidDecimal):
        parse_decimal(value)


def test_parse_decimal_negative_only_when_allowed():
    with pytest.raises(InvalidDecimal, match="negative"):
        parse_decimal("-1")
    assert parse_decimal("-1", allow_negative=True) == Decimal(-1)


def test_parse_decimal_trailing_zeros_beyond_limit_are_fine():
    assert parse_decimal("1." + "0" * 30) == 1


@pytest.mark.parametrize(
    ("q", "s"), [("1000", "1000"), ("1E+3", "1000"), ("2.50", "2.5"), ("0.000", "0"), ("7", "7")]
)
def test_format_quantity_normalized(q, s):
    assert format_quantity(Decimal(q)) == s

"""Money: currency and amount rejections, the exponent table, formatting and exact parsing."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.errors import AmountTooLarge, CurrencyMismatch, InvalidAmount, UnknownCurrency
from domain.money import CURRENCY_EXPONENTS, Money, check_amount, exponent, max_amount_minor, parse_major


@pytest.mark.parametrize(
    ("currency", "expected"),
    [("USD", 2), ("EUR", 2), ("JPY", 0), ("KRW", 0), ("KWD", 3), ("BHD", 3)],
)
def test_exponents_follow_iso_4217(currency: str, expected: int) -> None:
    assert exponent(currency) == expected


@pytest.mark.parametrize("currency", ["XXX", "usd", "", " USD", "US", "DOLLAR"])
def test_unknown_currency_is_rejected(currency: str) -> None:
    with pytest.raises(UnknownCurrency) as caught:
        Money.of(100, currency)
    assert caught.value.code == "unknown_currency"
    assert caught.value.details == {"currency": currency}


@pytest.mark.parametrize(
    "amount",
    [0, -1, -10_000, True, False, 1.0, 12.5, "100", None, Decimal("100")],
    ids=repr,
)
@pytest.mark.parametrize("currency", ["USD", "JPY", "KWD"])
def test_non_positive_or_non_integer_amount_is_rejected(amount: Any, currency: str) -> None:
    with pytest.raises(InvalidAmount) as caught:
        Money.of(amount, currency)
    assert caught.value.code == "invalid_amount"


@pytest.mark.parametrize(
    ("currency", "largest_minor"),
    [
        ("USD", 100_000_000),  # 1,000,000.00
        ("JPY", 1_000_000),  # exponent 0: one minor unit is one yen
        ("KRW", 1_000_000),
        ("KWD", 1_000_000_000),  # exponent 3: 1,000,000.000
        ("BHD", 1_000_000_000),
    ],
)
def test_maximum_is_one_million_major_units_per_currency(currency: str, largest_minor: int) -> None:
    assert max_amount_minor(currency) == largest_minor
    assert Money.of(largest_minor, currency).amount_minor == largest_minor
    with pytest.raises(AmountTooLarge) as caught:
        Money.of(largest_minor + 1, currency)
    assert caught.value.code == "amount_too_large"
    assert caught.value.details == {"amount": largest_minor + 1, "maximum": largest_minor}


def test_smallest_amount_is_one_minor_unit() -> None:
    assert check_amount(1, "JPY") == 1
    assert Money.of(1, "KWD") == Money(1, "KWD")


@pytest.mark.parametrize(
    ("money", "text"),
    [
        (Money(1250, "USD"), "12.50 USD"),
        (Money(5, "USD"), "0.05 USD"),
        (Money(100_000_000, "USD"), "1000000.00 USD"),
        (Money(1500, "JPY"), "1500 JPY"),
        (Money(1, "KWD"), "0.001 KWD"),
        (Money(1_234_567, "KWD"), "1234.567 KWD"),
        (Money(-5, "EUR"), "-0.05 EUR"),
        (Money(-1500, "JPY"), "-1500 JPY"),
    ],
)
def test_format(money: Money, text: str) -> None:
    assert money.format() == text


def test_adding_same_currency_sums_minor_units() -> None:
    assert Money.of(1250, "USD") + Money.of(75, "USD") == Money(1325, "USD")


def test_adding_different_currencies_is_rejected() -> None:
    with pytest.raises(CurrencyMismatch) as caught:
        Money.of(100, "USD") + Money.of(100, "EUR")
    assert caught.value.details == {"currencies": ["USD", "EUR"]}


@pytest.mark.parametrize(
    ("text", "currency", "minor"),
    [
        ("12.50", "USD", 1250),
        ("12.5", "USD", 1250),
        ("12", "USD", 1200),
        ("0.01", "USD", 1),
        ("0.10", "USD", 10),
        ("  3.10 ", "USD", 310),
        ("1000000.00", "USD", 100_000_000),
        ("1500", "JPY", 1500),
        ("0.001", "KWD", 1),
        ("0.1", "KWD", 100),
        ("1234.567", "KWD", 1_234_567),
        ("007.05", "USD", 705),
    ],
)
def test_parse_major_is_exact(text: str, currency: str, minor: int) -> None:
    assert parse_major(text, currency) == minor


@pytest.mark.parametrize(
    ("text", "currency"),
    [
        ("12.345", "USD"),  # more decimals than the currency has
        ("1.5", "JPY"),
        ("1.0", "JPY"),
        ("0.0001", "KWD"),
        ("", "USD"),
        (" ", "USD"),
        (".", "USD"),
        (".50", "USD"),
        ("-1", "USD"),
        ("+1", "USD"),
        ("1e3", "USD"),
        ("1,000", "USD"),
        ("1 000", "USD"),
        ("1.2.3", "USD"),
        ("1.-5", "USD"),
        ("abc", "USD"),
        ("NaN", "USD"),
    ],
)
def test_parse_major_rejects_malformed_text(text: str, currency: str) -> None:
    with pytest.raises(InvalidAmount):
        parse_major(text, currency)


def test_parse_major_rejects_unknown_currency() -> None:
    with pytest.raises(UnknownCurrency):
        parse_major("1.00", "XXX")


@pytest.mark.parametrize("text", ["²", "1.²", "³00"])
def test_parse_major_rejects_superscript_digits_as_invalid_amount(text: str) -> None:
    with pytest.raises(InvalidAmount):
        parse_major(text, "USD")


currencies = st.sampled_from(sorted(CURRENCY_EXPONENTS))


@st.composite
def valid_money(draw: st.DrawFn) -> Money:
    currency = draw(currencies)
    return Money.of(draw(st.integers(1, max_amount_minor(currency))), currency)


@given(valid_money())
def test_format_then_parse_round_trips(money: Money) -> None:
    number, currency = money.format().split(" ")
    assert currency == money.currency
    assert parse_major(number, currency) == money.amount_minor


@given(currencies, st.integers(0, 10**7), st.data())
def test_parse_then_format_round_trips(currency: str, whole: int, data: st.DataObject) -> None:
    exp = exponent(currency)
    if exp == 0:
        text = str(whole)
    else:
        frac = data.draw(st.integers(0, 10**exp - 1))
        text = f"{whole}.{frac:0{exp}d}"
    minor = parse_major(text, currency)
    assert minor == whole * 10**exp + (int(text.partition(".")[2] or 0))
    assert Money(minor, currency).format() == f"{text} {currency}"

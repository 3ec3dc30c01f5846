"""Value checks at the domain's edge: E.164 phones and masking, line items, text and URLs."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.errors import (
    AmountTooLarge,
    InvalidAmount,
    InvalidField,
    InvalidLineItem,
    InvalidPhone,
    ItemsDoNotSum,
)
from domain.values import (
    MAX_LINE_ITEMS,
    LineItem,
    check_line_items,
    check_phone,
    check_text,
    check_url,
    mask_phone,
)


@pytest.mark.parametrize(
    "phone",
    [
        "+14155550123",
        "+447911123456",
        "+12345678",  # 8 digits, the shortest accepted
        "+123456789012345",  # 15 digits, the E.164 maximum
    ],
)
def test_valid_e164_phones_are_accepted(phone: str) -> None:
    assert check_phone(phone) == phone


@pytest.mark.parametrize(
    "phone",
    [
        "14155550123",  # no plus
        "+04155550123",  # country code cannot start with 0
        "+1234567",  # 7 digits
        "+1234567890123456",  # 16 digits
        "+1 415 555 0123",
        "+1-415-555-0123",
        "+1(415)5550123",
        "+1415555012a",
        "++14155550123",
        " +14155550123",
        "+１４１５５５５０１２３",  # full-width digits
        "",
        "+",
        None,
        14155550123,
    ],
    ids=repr,
)
def test_invalid_phones_are_rejected_without_echoing_them(phone: Any) -> None:
    with pytest.raises(InvalidPhone) as caught:
        check_phone(phone)
    assert caught.value.code == "invalid_phone"
    assert caught.value.details == {"phone": "(withheld)"}
    with pytest.raises(InvalidPhone) as reference:
        check_phone("not a phone")
    assert caught.value.message == reference.value.message  # the input is never echoed back


def test_phone_with_trailing_newline_is_rejected() -> None:
    with pytest.raises(InvalidPhone):
        check_phone("+14155550123\n")


@pytest.mark.parametrize(
    ("phone", "masked"),
    [
        ("+14155550123", "+1******0123"),
        ("+447911123456", "+4*******3456"),
        ("+12345678", "+1***5678"),
    ],
)
def test_mask_phone(phone: str, masked: str) -> None:
    assert mask_phone(phone) == masked


@given(st.from_regex(r"\+[1-9][0-9]{7,14}", fullmatch=True))
def test_mask_keeps_only_first_digit_and_last_four(phone: str) -> None:
    masked = mask_phone(phone)
    assert len(masked) == len(phone)
    assert masked[:2] == phone[:2]
    assert masked[-4:] == phone[-4:]
    assert set(masked[2:-4]) == {"*"}


def item(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sku": "SKU-1", "name": "Large pizza", "quantity": 2, "unit_amount_minor": 750}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not _MISSING}


_MISSING = object()


def test_line_items_are_checked_and_returned_as_values() -> None:
    items = check_line_items(
        [item(), item(sku="SKU-2", name="Soda", quantity=1, unit_amount_minor=250)], 1750, "USD"
    )
    assert items == (LineItem("SKU-1", "Large pizza", 2, 750), LineItem("SKU-2", "Soda", 1, 250))
    assert [i.total_minor for i in items] == [1500, 250]
    assert items[0].as_dict() == item()


@pytest.mark.parametrize("field", ["sku", "name", "quantity", "unit_amount_minor"])
def test_line_item_missing_a_field_is_rejected(field: str) -> None:
    with pytest.raises(InvalidLineItem) as caught:
        check_line_items([item(**{field: _MISSING})], 1500, "USD")
    assert caught.value.details == {"index": 0}


@pytest.mark.parametrize("raw", ["SKU-1", None, 42, ["SKU-1", "pizza", 1, 1500]], ids=repr)
def test_line_item_that_is_not_an_object_is_rejected(raw: Any) -> None:
    with pytest.raises(InvalidLineItem):
        check_line_items([raw], 1500, "USD")


@pytest.mark.parametrize("quantity", [0, -1, 10_001, True, 1.0, "2", None], ids=repr)
def test_line_item_bad_quantity_is_rejected(quantity: Any) -> None:
    with pytest.raises(InvalidLineItem):
        check_line_items([item(quantity=quantity, unit_amount_minor=1)], 1, "USD")


def test_line_item_quantity_bounds_are_inclusive() -> None:
    assert check_line_items([item(quantity=10_000, unit_amount_minor=1)], 10_000, "USD")[0].quantity == 10_000
    assert check_line_items([item(quantity=1, unit_amount_minor=1)], 1, "USD")[0].quantity == 1


@pytest.mark.parametrize(
    ("unit", "error"),
    [(0, InvalidAmount), (-5, InvalidAmount), (7.5, InvalidAmount), (100_000_001, AmountTooLarge)],
)
def test_line_item_bad_unit_amount_is_rejected(unit: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        check_line_items([item(quantity=1, unit_amount_minor=unit)], 1, "USD")


@pytest.mark.parametrize(
    "overrides",
    [{"sku": ""}, {"sku": "   "}, {"sku": "S" * 65}, {"sku": 7}, {"name": ""}, {"name": "n" * 201}],
    ids=repr,
)
def test_line_item_bad_text_is_rejected(overrides: dict[str, Any]) -> None:
    with pytest.raises(InvalidField):
        check_line_items([item(**overrides)], 1500, "USD")


@pytest.mark.parametrize("amount", [1499, 1501, 1])
def test_line_items_not_summing_to_the_amount_are_rejected(amount: int) -> None:
    with pytest.raises(ItemsDoNotSum) as caught:
        check_line_items([item()], amount, "USD")
    assert caught.value.details == {"items_total": 1500, "amount": amount}


def test_no_line_items_is_rejected() -> None:
    with pytest.raises(InvalidLineItem):
        check_line_items([], 0, "USD")


def test_too_many_line_items_is_rejected() -> None:
    one_each = [item(sku=f"S{i}", quantity=1, unit_amount_minor=1) for i in range(MAX_LINE_ITEMS + 1)]
    assert len(check_line_items(one_each[:MAX_LINE_ITEMS], MAX_LINE_ITEMS, "USD")) == MAX_LINE_ITEMS
    with pytest.raises(InvalidLineItem):
        check_line_items(one_each, MAX_LINE_ITEMS + 1, "USD")


@pytest.mark.parametrize(
    ("value", "kwargs", "ok"),
    [
        ("x", {}, True),
        ("", {}, False),
        ("  \t", {}, False),
        ("", {"required": False}, True),
        ("a" * 200, {}, True),
        ("a" * 201, {}, False),
        ("abc", {"max_length": 2}, False),
        (None, {"required": False}, False),
        (b"bytes", {}, False),
    ],
    ids=repr,
)
def test_check_text(value: Any, kwargs: dict[str, Any], ok: bool) -> None:
    if ok:
        assert check_text("field", value, **kwargs) == value
    else:
        with pytest.raises(InvalidField) as caught:
            check_text("field", value, **kwargs)
        assert caught.value.details == {"field": "field"}


@pytest.mark.parametrize(
    "url",
    ["https://merchant.example/hooks/pay", "http://localhost:8080/cb", "https://a.example/x?y=1#z"],
)
def test_absolute_http_urls_are_accepted(url: str) -> None:
    assert check_url("callback_url", url) == url


@pytest.mark.parametrize("url", [None, ""])
def test_optional_url_may_be_absent(url: str | None) -> None:
    assert check_url("callback_url", url) is None
    with pytest.raises(InvalidField):
        check_url("callback_url", url, required=True)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://merchant.example/file",
        "merchant.example/cb",
        "//merchant.example/cb",
        "/relative/path",
        "https://",
        "https:///path-only",
        "javascript:alert(1)",
        "mailto:ops@merchant.example",
        "https://merchant.example/" + "a" * 2048,
        123,
        "   ",
    ],
    ids=lambda u: repr(u)[:40],
)
def test_malformed_urls_are_rejected(url: Any) -> None:
    with pytest.raises(InvalidField) as caught:
        check_url("callback_url", url)
    assert caught.value.details == {"field": "callback_url"}


@pytest.mark.parametrize("url", ["http://:80", "https://user@/x"])
def test_url_without_a_host_is_rejected(url: str) -> None:
    with pytest.raises(InvalidField):
        check_url("callback_url", url)

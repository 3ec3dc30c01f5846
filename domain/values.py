"""Small value objects checked at the edge of the domain: phone numbers, line items, references."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from domain.errors import InvalidField, InvalidLineItem, InvalidPhone, ItemsDoNotSum
from domain.money import check_amount

E164 = re.compile(r"\+[1-9][0-9]{7,14}")
MAX_LINE_ITEMS = 100
MAX_QUANTITY = 10_000
MAX_TEXT = 200


def check_phone(phone: str) -> str:
    if not isinstance(phone, str) or not E164.fullmatch(phone):
        raise InvalidPhone(
            "customer phone must be in E.164 form: '+' then 8 to 15 digits, e.g. +447700900123",
            phone="(withheld)",
        )
    return phone


# Personal data leaves the domain only sealed: the application hands a command a ``Seal`` (its
# per-customer data key, application/privacy.py) and the event records what it returns, an opaque
# mapping (the key's id and the ciphertext). The domain never sees a key.
Seal = Callable[[dict[str, Any]], dict[str, Any]]
# What the read side shows where personal data was, once its customer's key is destroyed.
ERASED = "erased"


def mask_phone(phone: str) -> str:
    """``+14155550123`` -> ``+1******0123``: country code's first digit and the last four."""
    return phone[:2] + "*" * max(0, len(phone) - 6) + phone[-4:]


def check_text(name: str, value: str, *, max_length: int = MAX_TEXT, required: bool = True) -> str:
    if not isinstance(value, str):
        raise InvalidField(f"{name} must be a string", field=name)
    if "\x00" in value:
        # PostgreSQL text cannot hold U+0000: refused here, before it can stop a read model.
        raise InvalidField(f"{name} must not contain a NUL character", field=name)
    if required and not value.strip():
        raise InvalidField(f"{name} must not be empty", field=name)
    if len(value) > max_length:
        raise InvalidField(f"{name} is longer than {max_length} characters", field=name)
    return value


def check_url(name: str, url: str | None, *, required: bool = False) -> str | None:
    if url is None or url == "":
        if required:
            raise InvalidField(f"{name} is required", field=name)
        return None
    check_text(name, url, max_length=2048)
    parts = urlsplit(url)
    if (
        parts.scheme not in ("https", "http")
        or not parts.hostname
        or any(c.isspace() for c in url)
    ):
        raise InvalidField(f"{name} must be an absolute http(s) URL", field=name)
    return url


@dataclass(frozen=True, slots=True)
class LineItem:
    sku: str
    name: str
    quantity: int
    unit_amount_minor: int

    @property
    def total_minor(self) -> int:
        return self.quantity * self.unit_amount_minor

    def as_dict(self) -> dict[str, Any]:
        return {
            "sku": self.sku,
            "name": self.name,
            "quantity": self.quantity,
            "unit_amount_minor": self.unit_amount_minor,
        }


def check_line_items(
    items: Sequence[Mapping[str, Any]], amount_minor: int, currency: str
) -> tuple[LineItem, ...]:
    """Items must be well formed and add up exactly to the amount."""
    if not items:
        raise InvalidLineItem("an order needs at least one line item")
    if len(items) > MAX_LINE_ITEMS:
        raise InvalidLineItem(f"an order has at most {MAX_LINE_ITEMS} line items")
    checked = []
    for index, raw in enumerate(items):
        try:
            sku, name = raw["sku"], raw["name"]
            quantity, unit = raw["quantity"], raw["unit_amount_minor"]
        except (KeyError, TypeError):
            raise InvalidLineItem(
                f"item {index} needs sku, name, quantity and unit_amount_minor", index=index
            ) from None
        check_text(f"items[{index}].sku", sku, max_length=64)
        check_text(f"items[{index}].name", name)
        if not isinstance(quantity, int) or isinstance(quantity, bool) or not 0 < quantity <= MAX_QUANTITY:
            raise InvalidLineItem(
                f"item {index} quantity must be an integer from 1 to {MAX_QUANTITY}", index=index
            )
        check_amount(unit, currency)
        checked.append(LineItem(sku, name, quantity, unit))
    total = sum(item.total_minor for item in checked)
    if total != amount_minor:
        raise ItemsDoNotSum(
            f"line items add up to {total} but the amount is {amount_minor}",
            items_total=total,
            amount=amount_minor,
        )
    return tuple(checked)

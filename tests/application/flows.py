"""Helpers that drive the Ledger application through the customer's journey."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from application.ledger import Ledger

PHONE = "+14155550123"


def new_merchant(ledger: Ledger, command_id: str = "merchant-1", **kwargs: Any) -> UUID:
    return UUID(ledger.register_merchant(command_id, name="Luigi's Pizza", **kwargs).result["merchant_id"])


def open_session(
    ledger: Ledger, merchant_id: UUID, command_id: str = "open-1", amount_minor: int = 2_500,
    currency: str = "USD", **kwargs: Any,
) -> UUID:
    result = ledger.open_session(
        command_id,
        merchant_id=merchant_id,
        amount_minor=amount_minor,
        currency=currency,
        customer_phone=PHONE,
        order_reference="ORDER-7",
        line_items=[{"sku": "PZ-L", "name": "Large pizza", "quantity": 1, "unit_amount_minor": amount_minor}],
        voice_platform="alexa",
        conversation_id="conv-1",
        callback_url="https://voice.example/callback",
        **kwargs,
    )
    return UUID(result.result["session_id"])


def pay(ledger: Ledger, session_id: UUID, last4: str = "4242", prefix: str = "") -> UUID:
    """From a fresh session to an attached card; returns the payment id."""
    link = ledger.send_link(f"{prefix}send", session_id)
    ledger.open_link(f"{prefix}open", session_id, link.link_token)
    assert ledger.verify_code(f"{prefix}code", session_id, link.code).result["code_check"] == "verified"
    attached = ledger.attach_payment_method(
        f"{prefix}attach", session_id, card_token=f"tok_{last4}", card_brand="visa", card_last4=last4
    )
    return UUID(attached.result["payment_id"])

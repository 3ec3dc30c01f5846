"""Builders shared by the domain unit tests: aggregates driven into a named state, with explicit clocks."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

from domain.ledger import FeeSchedule, Split
from domain.payment import Payment
from domain.payment_session import PaymentSession
from domain.risk import RiskDecision

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
TTL = timedelta(minutes=15)
EXPIRES_AT = NOW + TTL
AFTER_EXPIRY = EXPIRES_AT + timedelta(seconds=1)

LINK_TOKEN_HASH = "hash-of-link-token-" + "a" * 44
CODE_HASH = "hash-of-code-" + "b" * 51
WRONG_CODE_HASH = "hash-of-wrong-code-" + "c" * 45

# The amount of every test session; the threshold decides whether identity is required.
SESSION_AMOUNT_MINOR = 5_000


def line_items_for(amount_minor: int) -> list[dict[str, Any]]:
    return [{"sku": "SKU-1", "name": "Large pizza", "quantity": 1, "unit_amount_minor": amount_minor}]


def open_session(
    *,
    identity_required: bool = False,
    amount_minor: int = SESSION_AMOUNT_MINOR,
    currency: str = "USD",
    expires_at: datetime = EXPIRES_AT,
    **overrides: Any,
) -> PaymentSession:
    """A fresh session; ``identity_required`` picks a threshold just below or at the amount."""
    kwargs: dict[str, Any] = {
        "merchant_id": uuid4(),
        "amount_minor": amount_minor,
        "currency": currency,
        "customer_phone": "+14155550123",
        "customer_id": uuid4(),
        "seal": fake_seal,
        "order_reference": "ORDER-42",
        "line_items": line_items_for(amount_minor),
        "voice_platform": "vapi",
        "conversation_id": "conv-1",
        "callback_url": "https://merchant.example/callback",
        "identity_threshold_minor": amount_minor - 1 if identity_required else amount_minor,
        "expires_at": expires_at,
    }
    kwargs.update(overrides)
    return PaymentSession.open(uuid4(), **kwargs)


def fake_seal(data: dict[str, Any]) -> dict[str, Any]:
    """Stands in for a customer's data key in domain tests: marks the data as sealed, keeps it."""
    return {"key_id": "test", "sealed": dict(data)}


def attach(session: PaymentSession, payment_id: UUID | None = None, now: datetime = NOW) -> UUID:
    payment_id = payment_id or uuid4()
    session.attach_payment_method(
        payment_id=payment_id, card_token="tok_visa_4242", card_brand="visa", card_last4="4242", now=now
    )
    return payment_id


def session_in(status: str, *, identity_required: bool = False) -> PaymentSession:
    """A session driven by its own commands into ``status``; pending events are left in place."""
    session = open_session(identity_required=identity_required or status == "identity_verified")
    if status == "awaiting_customer":
        return session
    if status == "expired":
        session.expire(AFTER_EXPIRY)
        return session
    if status == "cancelled":
        session.cancel("customer hung up", seal=fake_seal)
        return session
    if status == "failed":
        session.fail("processor_unavailable")
        return session
    session.send_link(LINK_TOKEN_HASH, CODE_HASH, NOW)
    if status == "link_sent":
        return session
    session.open_link(NOW)
    if status == "link_opened":
        return session
    if status == "locked":
        for _ in range(5):
            session.verify_code(WRONG_CODE_HASH, NOW)
        return session
    session.verify_code(CODE_HASH, NOW)
    if status == "code_verified":
        return session
    if session.identity_required:
        session.record_identity_check(verified=True, verifier="kba", reason="", now=NOW)
    if status == "identity_verified":
        return session
    payment_id = attach(session)
    if status == "payment_method_attached":
        return session
    if status == "completed":
        session.complete(payment_id)
        return session
    raise ValueError(f"no recipe for a session in {status!r}")


PAYMENT_AMOUNT_MINOR = 10_000


def initiate_payment(
    *,
    amount_minor: int = PAYMENT_AMOUNT_MINOR,
    currency: str = "USD",
    fee_schedule: FeeSchedule | None = None,
    splits: Sequence[Split] = (),
) -> Payment:
    return Payment.initiate(
        uuid4(),
        merchant_id=uuid4(),
        session_id=uuid4(),
        amount_minor=amount_minor,
        currency=currency,
        card_token="tok_visa_4242",
        card_brand="visa",
        card_last4="4242",
        fee_schedule=fee_schedule or FeeSchedule(),
        splits=splits,
    )


def authorize(payment: Payment, amount_minor: int | None = None) -> None:
    payment.authorize(
        processor="stripe",
        processor_reference="ch_1",
        amount_minor=payment.amount_minor if amount_minor is None else amount_minor,
        expires_at=EXPIRES_AT,
    )


def payment_in(status: str) -> Payment:
    """A payment driven by its own commands into ``status``."""
    payment = initiate_payment()
    if status == "initiated":
        return payment
    if status == "failed":
        payment.fail("card_declined", "insufficient funds")
        return payment
    clear_risk(payment)
    payment.start_processing("stripe")
    if status == "processing":
        return payment
    authorize(payment)
    if status == "authorized":
        return payment
    if status == "voided":
        payment.void("customer cancelled", seal=fake_seal)
        return payment
    if status == "authorization_expired":
        payment.expire_authorization(AFTER_EXPIRY)
        return payment
    payment.capture(amount_minor=None, processor_reference="cap_1", now=NOW)
    if status == "captured":
        return payment
    if status == "settled":
        payment.settle("st_1")
        return payment
    if status == "refunded":
        payment.refund(
            refund_id="rf_1", amount_minor=payment.captured_minor, reason="", processor_reference="re_1",
            seal=fake_seal,
        )
        return payment
    raise ValueError(f"no recipe for a payment in {status!r}")


def clear_risk(payment: Payment) -> None:
    """The risk rules' approval that must come before a payment goes to a processor."""
    payment.assess_risk(RiskDecision(0, "approve", ()), recent_by_phone=1, recent_by_card=1, prior_declines=0)

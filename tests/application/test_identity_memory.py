"""A customer who passed the identity check is not asked again for later purchases (by the same
phone, within a year); one who failed it, or another phone, is; and the memory holds no phone."""

from __future__ import annotations

import base64
from datetime import timedelta
from uuid import UUID

import psycopg
import pytest

from adapters.clock import ManualClock
from adapters.dev.sandbox_processor import SandboxProcessor
from api.bootstrap import build_ledger
from api.settings import Settings
from application.ledger import Ledger
from application.ports import IdentityClaim
from domain.errors import IdentityCheckNotRequired
from tests.application.flows import new_merchant

GOOD = IdentityClaim("1990-01-01", "94107")
BAD = IdentityClaim("1970-01-01", "94107")
PHONE = "+14155550123"


def session_above_threshold(ledger: Ledger, merchant_id: UUID, n: int, phone: str = PHONE) -> UUID:
    return UUID(ledger.open_session(
        f"open-{n}", merchant_id=merchant_id, amount_minor=15_000, currency="USD", customer_phone=phone,
        order_reference=f"ORDER-{n}",
        line_items=[{"sku": "X", "name": "Thing", "quantity": 1, "unit_amount_minor": 15_000}],
        voice_platform="alexa", conversation_id=f"conv-{n}",
    ).result["session_id"])


def verified_code(ledger: Ledger, session_id: UUID, n: int) -> None:
    link = ledger.send_link(f"send-{n}", session_id)
    assert ledger.verify_code(f"code-{n}", session_id, link.code).result["code_check"] == "verified"


def attach(ledger: Ledger, session_id: UUID, n: int) -> None:
    ledger.attach_payment_method(f"attach-{n}", session_id, card_token=f"tok_{n}", card_brand="visa",
                                 card_last4="4242")


def test_a_verified_customer_is_not_asked_again_on_a_later_purchase(ledger: Ledger, database_url: str) -> None:
    merchant_id = new_merchant(ledger)
    first = session_above_threshold(ledger, merchant_id, 1)
    assert ledger.get_session(first).needs_identity_check
    verified_code(ledger, first, 1)
    ledger.verify_identity("id-1", first, GOOD)
    attach(ledger, first, 1)

    second = session_above_threshold(ledger, merchant_id, 2)
    session = ledger.get_session(second)
    assert session.identity_required and not session.needs_identity_check
    assert [type(e).__name__ for e in ledger.events.get(second)] == ["Opened", "IdentityRecognized"]
    verified_code(ledger, second, 2)
    with pytest.raises(IdentityCheckNotRequired):
        ledger.verify_identity("id-2", second, GOOD)
    attach(ledger, second, 2)  # straight to the card
    assert ledger.get_session(second).status == "payment_method_attached"

    # The memory is keyed by a keyed hash: no phone number in any of its events.
    with psycopg.connect(database_url) as conn:
        customer_events = conn.execute(
            "SELECT count(*) FROM outbox WHERE topic LIKE '%%.customer.events'").fetchone()
    assert customer_events == (2,)  # registered, identity_verified
    customer_id = next(e.customer_id for e in ledger.events.get(second) if hasattr(e, "customer_id"))
    state = str([e.__dict__ for e in ledger.events.get(customer_id)])
    assert PHONE not in state and PHONE[1:] not in state


def test_another_phone_and_a_failed_check_are_asked(ledger: Ledger) -> None:
    merchant_id = new_merchant(ledger)
    first = session_above_threshold(ledger, merchant_id, 1, phone="+14155550999")
    verified_code(ledger, first, 1)
    ledger.verify_identity("id-1", first, BAD)  # rejected: nothing remembered

    another_phone = session_above_threshold(ledger, merchant_id, 2, phone="+14155550999")
    assert ledger.get_session(another_phone).needs_identity_check
    assert ledger.get_session(session_above_threshold(ledger, merchant_id, 3)).needs_identity_check


def test_the_memory_lasts_a_year(ledger: Ledger, clock: ManualClock) -> None:
    merchant_id = new_merchant(ledger)
    first = session_above_threshold(ledger, merchant_id, 1)
    verified_code(ledger, first, 1)
    ledger.verify_identity("id-1", first, GOOD)
    clock.advance(timedelta(days=364))
    assert not ledger.get_session(session_above_threshold(ledger, merchant_id, 2)).needs_identity_check
    clock.advance(timedelta(days=2))
    again = session_above_threshold(ledger, merchant_id, 3)
    assert ledger.get_session(again).needs_identity_check
    verified_code(ledger, again, 3)
    ledger.verify_identity("id-3", again, GOOD)  # passing again renews it
    assert not ledger.get_session(session_above_threshold(ledger, merchant_id, 4)).needs_identity_check


def test_a_small_purchase_records_no_recognition(ledger: Ledger) -> None:
    merchant_id = new_merchant(ledger)
    first = session_above_threshold(ledger, merchant_id, 1)
    verified_code(ledger, first, 1)
    ledger.verify_identity("id-1", first, GOOD)
    small = UUID(ledger.open_session(
        "open-small", merchant_id=merchant_id, amount_minor=500, currency="USD", customer_phone=PHONE,
        order_reference="SMALL", line_items=[{"sku": "X", "name": "Thing", "quantity": 1, "unit_amount_minor": 500}],
        voice_platform="alexa", conversation_id="conv-small",
    ).result["session_id"])
    assert [type(e).__name__ for e in ledger.events.get(small)] == ["Opened"]


def test_the_reuse_period_is_configurable_and_zero_always_asks(
    settings: Settings, database_url: str, clock: ManualClock, processor: SandboxProcessor
) -> None:
    assert Settings.from_env({"ECHOTRANSACT_HASH_KEY": base64.b64encode(b"h" * 32).decode(),
                              "ECHOTRANSACT_IDENTITY_REUSE_DAYS": "30"}).identity_reuse_days == 30
    ledger = build_ledger(settings.replace(identity_reuse_days=0), database_url, clock=clock, processor=processor)
    try:
        merchant_id = new_merchant(ledger)
        first = session_above_threshold(ledger, merchant_id, 1)
        verified_code(ledger, first, 1)
        ledger.verify_identity("id-1", first, GOOD)
        assert ledger.get_session(session_above_threshold(ledger, merchant_id, 2)).needs_identity_check
    finally:
        ledger.close()

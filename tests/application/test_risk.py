"""The risk rules run before authorization, on the production policy: velocity per phone and per
card (the card known by its vault fingerprint, whatever token it came with), the merchant's
limit, a score; the verdict is an event, a decline never reaches the processor, and counting
is idempotent per attempt."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from uuid import UUID

import psycopg
import pytest

from adapters.clock import ManualClock
from adapters.dev.sandbox_processor import SandboxProcessor
from api.bootstrap import build_ledger, envelope_opener, personal_data_reader
from api.settings import ConfigurationError, Settings, parse_risk_rules
from application.ledger import Ledger
from application.ports import IdentityClaim
from domain.risk import DEFAULT_POLICY
from projections.engine import ProjectionStore
from projections.registry import all_projections
from tests.application.flows import new_merchant

FINGERPRINT = "fp_" + "a" * 40


@pytest.fixture
def ledger(settings: Settings, database_url: str, clock: ManualClock,
           processor: SandboxProcessor) -> Iterator[Ledger]:
    """The default (production) risk policy, not the relaxed one most tests use."""
    built = build_ledger(settings.replace(risk_policy=DEFAULT_POLICY), database_url, clock=clock,
                         processor=processor)
    yield built
    built.close()


def attempt(ledger: Ledger, merchant_id: UUID, n: int, *, phone: str = "+14155550123",
            fingerprint: str | None = FINGERPRINT, amount_minor: int = 2_500) -> UUID:
    """One customer journey up to an attached card (a new token each time, as the vault makes)
    and its authorization; returns the payment id."""
    session_id = UUID(ledger.open_session(
        f"open-{n}", merchant_id=merchant_id, amount_minor=amount_minor, currency="USD",
        customer_phone=phone, order_reference=f"ORDER-{n}",
        line_items=[{"sku": "X", "name": "Thing", "quantity": 1, "unit_amount_minor": amount_minor}],
        voice_platform="alexa", conversation_id=f"conv-{n}",
    ).result["session_id"])
    link = ledger.send_link(f"send-{n}", session_id)
    ledger.verify_code(f"code-{n}", session_id, link.code)
    if amount_minor > ledger.policy.identity_threshold_minor("USD"):
        ledger.verify_identity(f"id-{n}", session_id, IdentityClaim("1990-01-01", "94107"))
    payment_id = UUID(ledger.attach_payment_method(
        f"attach-{n}", session_id, card_token=f"card_token_{n}", card_brand="visa", card_last4="4242",
        card_fingerprint=fingerprint,
    ).result["payment_id"])
    ledger.authorize_payment(payment_id)
    return payment_id


def test_every_payment_is_assessed_before_it_is_sent_and_a_clean_one_is_approved(
    ledger: Ledger, processor: SandboxProcessor
) -> None:
    payment_id = attempt(ledger, new_merchant(ledger), 1)
    payment = ledger.get_payment(payment_id)
    assert (payment.status, payment.risk_decision, payment.risk_score) == ("authorized", "approve", 0)
    events = list(ledger.events.get(payment_id))
    assert [type(e).__name__ for e in events][:3] == ["Initiated", "RiskAssessed", "ProcessingStarted"]
    event: Any = events[1]  # Payment.RiskAssessed
    assert (event.recent_by_phone, event.recent_by_card, event.prior_declines) == (1, 1, 0)
    assert [op for op, _ in processor.calls] == ["authorize"]


def test_the_fourth_attempt_with_one_card_in_ten_minutes_is_declined_without_asking_the_processor(
    ledger: Ledger, processor: SandboxProcessor, clock: ManualClock, database_url: str, settings: Settings
) -> None:
    merchant_id = new_merchant(ledger)
    phones = ["+14155550101", "+14155550102", "+14155550103", "+14155550104"]
    for n, phone in enumerate(phones[:3]):
        assert ledger.get_payment(attempt(ledger, merchant_id, n, phone=phone)).status == "authorized"
        clock.advance(timedelta(minutes=1))
    calls_before = len(processor.calls)

    payment_id = attempt(ledger, merchant_id, 3, phone=phones[3])
    payment = ledger.get_payment(payment_id)
    assert (payment.status, payment.failure_code, payment.risk_decision) == ("failed", "risk_declined", "decline")
    assert len(processor.calls) == calls_before, "a risk decline must never reach the processor"
    assert payment.session_id is not None
    session = ledger.get_session(payment.session_id)
    assert (session.status, session.declines) == ("code_verified", 1)  # the customer may try another card

    # Asking again changes nothing and counts nothing twice.
    assert ledger.authorize_payment(payment_id).result["status"] == "failed"
    assert len(processor.calls) == calls_before

    # Ten minutes after the first attempt, the window has moved on.
    clock.advance(timedelta(minutes=8))
    assert ledger.get_payment(attempt(ledger, merchant_id, 4, phone="+14155550105")).status == "authorized"

    # The verdicts show in analytics and on the payment's read model.
    store = ProjectionStore(database_url, list(all_projections(personal_data_reader(settings)).values()),
                            envelope_opener(settings))
    try:
        store.catch_up(grace=timedelta(0))
    finally:
        store.close()
    with psycopg.connect(database_url) as conn:
        assert conn.execute(
            "SELECT sum(risk_approved_count), sum(risk_review_count), sum(risk_declined_count),"
            " sum(declined_count) FROM volume_daily").fetchone() == (4, 0, 1, 1)
        assert conn.execute("SELECT risk_decision, risk_score, failure_code FROM payment_status"
                            " WHERE payment_id = %s", (payment_id,)).fetchone() == ("decline", 100, "risk_declined")


def test_the_same_card_under_new_tokens_is_one_card_but_different_cards_are_not(
    ledger: Ledger, clock: ManualClock
) -> None:
    merchant_id = new_merchant(ledger)
    for n in range(4):  # four different cards, four different phones: nothing adds up
        payment_id = attempt(ledger, merchant_id, n, phone=f"+1415555020{n}", fingerprint=f"fp_{n:040d}")
        assert ledger.get_payment(payment_id).risk_decision == "approve"


def test_the_sixth_attempt_from_one_phone_is_declined_whatever_the_card(ledger: Ledger) -> None:
    merchant_id = new_merchant(ledger)
    decisions = [
        ledger.get_payment(attempt(ledger, merchant_id, n, fingerprint=f"fp_{n:040d}")).risk_decision
        for n in range(6)
    ]
    # 8 points per attempt beyond the first: 0, 8, 16, 24, 32 -> approve; the sixth is over the limit.
    assert decisions == ["approve"] * 5 + ["decline"]


def test_a_large_amount_near_the_merchants_limit_is_flagged_for_review_but_authorized(ledger: Ledger) -> None:
    merchant_id = new_merchant(ledger, max_amount_minor={"USD": 120_000})
    # 1,100.00 USD: ten times the identity threshold (35) and over nine tenths of the limit (20).
    payment = ledger.get_payment(attempt(ledger, merchant_id, 1, amount_minor=110_000))
    assert (payment.risk_decision, payment.risk_score, payment.status) == ("review", 55, "authorized")


def test_counting_one_attempt_again_gives_the_same_numbers(ledger: Ledger, clock: ManualClock) -> None:
    assert ledger.velocity is not None
    now = clock.now()
    first = ledger.velocity.record_and_count("a-1", now, 600, {"card": "k", "phone": "p"})
    ledger.velocity.record_and_count("a-2", now + timedelta(seconds=5), 600, {"card": "k"})
    again = ledger.velocity.record_and_count("a-1", now + timedelta(seconds=9), 600, {"card": "k", "phone": "p"})
    assert first == again == {"card": 1, "phone": 1}
    assert ledger.velocity.record_and_count("a-3", now + timedelta(seconds=10), 600, {"card": "k"}) == {"card": 3}
    assert ledger.velocity.record_and_count("a-4", now + timedelta(minutes=10, seconds=6), 600,
                                            {"card": "k"}) == {"card": 2}  # a-1 and a-2 left the window


def test_parallel_attempts_on_one_card_see_each_other(ledger: Ledger, clock: ManualClock) -> None:
    """Card testing comes in bursts: attempts counted at the same moment must not all see 1."""
    assert ledger.velocity is not None
    velocity = ledger.velocity
    barrier = threading.Barrier(8)
    counts: list[int] = []

    def count(i: int) -> None:
        barrier.wait()
        counts.append(velocity.record_and_count(f"burst-{i}", clock.now(), 600, {"card": "k-burst"})["card"])

    threads = [threading.Thread(target=count, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(counts) == list(range(1, 9))


def test_risk_rules_are_configurable_and_a_bad_setting_is_a_readable_error() -> None:
    policy = parse_risk_rules("max_attempts_per_card=5, velocity_window_minutes=30")
    assert (policy.max_attempts_per_card, policy.velocity_window_minutes) == (5, 30)
    assert parse_risk_rules("") == DEFAULT_POLICY
    for bad in ("max_attempts_per_card", "nonsense=3", "review_score=-1", "review_score=90,decline_score=80",
                "velocity_window_minutes=0", "max_attempts_per_phone=0"):
        with pytest.raises(ConfigurationError, match="ECHOTRANSACT_RISK_RULES"):
            Settings.from_env({"ECHOTRANSACT_HASH_KEY": base64.b64encode(b"h" * 32).decode(),
                               "ECHOTRANSACT_RISK_RULES": bad})

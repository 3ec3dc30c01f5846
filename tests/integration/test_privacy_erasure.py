"""Crypto-shredding, on real PostgreSQL: random payments, refunds and erasures in random order.
After each erasure the read models rebuilt from scratch equal the live ones, the audit chain
verifies, and a scan of every table (and of the envelopes the relay publishes to Kafka, and of
the logs) finds no plaintext phone of an erased customer; no envelope names any phone at all."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from uuid import UUID

import psycopg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from psycopg import sql

from adapters.clock import ManualClock
from api.bootstrap import envelope_opener, personal_data_reader
from api.settings import Settings
from application.ledger import Ledger
from application.ports import IdentityClaim
from projections.audit import verify_chain
from projections.engine import ProjectionStore
from projections.registry import all_projections
from projections.replay import verify
from tests.application.flows import new_merchant

_examples = itertools.count(1)
IP, USER_AGENT = "203.0.113.77", "Mozilla/5.0 (Privacy Test)"


def _phone(example: int, customer: int) -> str:
    return f"+1415{example % 1000:03d}{customer:04d}"


def _all_text(conn: psycopg.Connection[Any]) -> Iterator[tuple[str, str]]:
    """Every row of every table in the public schema, as text (bytea too: escaped), by table."""
    tables = [r[0] for r in conn.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename").fetchall()]
    for table in tables:
        for (row,) in conn.execute(sql.SQL("SELECT t::text FROM {} t").format(sql.Identifier(table))):
            yield table, row


def _pay(ledger: Ledger, merchant_id: UUID, phone: str, n: str, amount_minor: int) -> UUID:
    result = ledger.open_session_and_send_link(
        f"open-{n}", merchant_id=merchant_id, amount_minor=amount_minor, currency="USD", customer_phone=phone,
        order_reference=f"ORDER-{n}", voice_platform="alexa", conversation_id=f"conv-{n}",
        line_items=[{"sku": "X", "name": "Thing", "quantity": 1, "unit_amount_minor": amount_minor}],
        metadata={"note": f"for {phone}"},
    )
    session_id = UUID(result.result.result["session_id"])
    ledger.open_link(f"openlink-{n}", session_id, result.link_token, ip=IP, user_agent=USER_AGENT)
    assert ledger.verify_code(f"code-{n}", session_id, result.code).result["code_check"] == "verified"
    if ledger.get_session(session_id).needs_identity_check:
        ledger.verify_identity(f"identity-{n}", session_id, IdentityClaim("1990-01-01", "94107"))
    payment_id = UUID(ledger.attach_payment_method(
        f"attach-{n}", session_id, card_token=f"tok_{n}", card_brand="visa", card_last4="4242",
    ).result["payment_id"])
    ledger.authorize_payment(payment_id)
    ledger.capture_payment(f"capture-{n}", payment_id)
    return payment_id


operations = st.lists(
    st.one_of(
        st.tuples(st.just("pay"), st.integers(0, 2), st.sampled_from([2_500, 15_000])),
        st.tuples(st.just("refund"), st.integers(0, 20), st.integers(1, 500)),
        st.tuples(st.just("erase"), st.integers(0, 2), st.just(0)),
    ),
    min_size=3, max_size=9,
)


@pytest.fixture
def store(database_url: str, settings: Settings) -> Iterator[ProjectionStore]:
    s = ProjectionStore(database_url, list(all_projections(personal_data_reader(settings)).values()),
                        envelope_opener(settings))
    yield s
    s.close()


@hypothesis_settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=operations)
def test_erasure_leaves_no_phone_and_keeps_replay_and_audit(
    plan: list[tuple[str, int, int]], ledger: Ledger, store: ProjectionStore, database_url: str,
    owner_database_url: str, settings: Settings, clock: ManualClock, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    example = next(_examples)
    merchant_id = new_merchant(ledger, f"merchant-{example}")
    payments: list[UUID] = []
    erased: set[str] = set()
    every_phone = {_phone(example, c) for c in range(3)}
    projections = list(all_projections(personal_data_reader(settings)).values())
    for step, (kind, who, amount) in enumerate(plan):
        n = f"{example}-{step}"
        if kind == "pay":
            payments.append(_pay(ledger, merchant_id, _phone(example, who), n, amount))
        elif kind == "refund" and payments:
            payment_id = payments[who % len(payments)]
            payment = ledger.get_payment(payment_id)
            left = payment.captured_minor - payment.refunded_minor
            if left > 0:
                ledger.refund_payment(f"refund-{n}", payment_id, amount_minor=min(amount, left))
        elif kind == "erase":
            phone = _phone(example, who)
            erasure = ledger.erase_customer(f"erase-{n}", phone=phone, erased_by="test", reason="customer asked")
            again = ledger.erase_customer(f"erase-{n}", phone=phone, erased_by="test", reason="customer asked")
            assert again.result.replayed and again.result.result == erasure.result.result  # idempotent
            erased.add(phone)
            store.catch_up(grace=timedelta(0))
            # Replay from scratch equals live; the audit chain still verifies.
            assert verify(owner_database_url, projections, envelope_opener(settings)) == []
            with psycopg.connect(database_url) as conn:
                assert verify_chain(conn).ok
            _assert_no_phone(owner_database_url, settings, erased, every_phone, caplog.text)
            # A new session of the same phone starts as a stranger: nothing remembered, new pseudonym.
            export = ledger.export_customer(phone)
            assert not export["held"] and export["sessions"] == []
        clock.advance(timedelta(seconds=1))
    store.catch_up(grace=timedelta(0))
    assert verify(owner_database_url, projections, envelope_opener(settings)) == []
    _assert_no_phone(owner_database_url, settings, erased, every_phone, caplog.text)


def _assert_no_phone(owner_database_url: str, settings: Settings, erased: set[str], every_phone: set[str],
                     logs: str) -> None:
    digits = {p: p.lstrip("+") for p in erased}
    with psycopg.connect(owner_database_url) as conn:
        for table, text in _all_text(conn):
            for phone, bare in digits.items():
                assert bare not in text, f"{table} still holds the erased phone {phone}"
        # What the relay publishes to Kafka is the outbox envelope, decrypted: no phone in any.
        opener = envelope_opener(settings)
        for (payload,) in conn.execute("SELECT envelope FROM outbox"):
            published = repr(opener(payload).data).encode()
            for phone in every_phone:
                assert phone.lstrip("+").encode() not in published
            assert IP.encode() not in published and USER_AGENT.encode() not in published
    for phone, bare in digits.items():
        assert bare not in logs, f"a log line names the erased phone {phone}"


def test_a_new_session_after_erasure_starts_as_a_stranger(ledger: Ledger, database_url: str) -> None:
    merchant_id = new_merchant(ledger)
    phone = "+14155559876"
    _pay(ledger, merchant_id, phone, "a", 15_000)
    before = ledger.export_customer(phone)
    assert before["held"] and before["sessions"][0]["phone"] == phone
    assert before["sessions"][0]["link_opened"][0]["ip"] == IP
    assert before["customers"][0]["identity_verified_at"] is not None

    ledger.erase_customer("erase-1", phone=phone, erased_by="admin", reason="GDPR art. 17 request")
    session_id = UUID(before["sessions"][0]["session_id"])
    assert ledger.session_phone(ledger.get_session(session_id)) is None  # the key is gone
    assert ledger.session_phone_masked(ledger.get_session(session_id)) == "erased"

    again = ledger.open_session(
        "open-b", merchant_id=merchant_id, amount_minor=15_000, currency="USD", customer_phone=phone,
        order_reference="ORDER-b", voice_platform="alexa", conversation_id="conv-b",
        line_items=[{"sku": "X", "name": "Thing", "quantity": 1, "unit_amount_minor": 15_000}])
    session = ledger.get_session(UUID(again.result["session_id"]))
    assert session.needs_identity_check  # not recognized
    assert session.customer_id != UUID(before["customer_id"])
    with psycopg.connect(database_url) as conn:
        erased_event = conn.execute("SELECT count(*) FROM customer_keys WHERE erased_at IS NOT NULL").fetchone()
    assert erased_event == (1,)
    # Erasing a phone nothing is held about records nothing.
    nothing = ledger.erase_customer("erase-2", phone="+14155550000", erased_by="admin", reason="asked")
    assert nothing.result.result["erased"] is False

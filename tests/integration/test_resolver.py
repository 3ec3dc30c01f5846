"""An authorization the processor did not answer is settled later by asking, once."""

from __future__ import annotations

from datetime import timedelta

import psycopg
import pytest

from adapters.dev.sandbox_processor import SandboxProcessor
from adapters.processors.resolver import resolve_stuck
from api.bootstrap import envelope_opener, personal_data_reader
from api.settings import Settings
from application.errors import ProcessorUnavailable
from application.ledger import Ledger
from projections.engine import ProjectionStore
from projections.registry import select
from tests.application.flows import new_merchant, open_session, pay


def test_a_stuck_authorization_is_resolved_by_asking_the_processor(
    ledger: Ledger, database_url: str, settings: Settings, processor: SandboxProcessor
) -> None:
    payment_id = pay(ledger, open_session(ledger, new_merchant(ledger)), last4="0119")
    with pytest.raises(ProcessorUnavailable):
        ledger.authorize_payment(payment_id)
    store = ProjectionStore(database_url, select("status", personal_data_reader(settings)), envelope_opener(settings))
    store.catch_up(grace=timedelta(0))
    assert resolve_stuck(ledger, database_url, older_than=timedelta(hours=1)) == 0  # not old enough yet
    assert resolve_stuck(ledger, database_url, older_than=timedelta(0)) == 1
    assert ledger.get_payment(payment_id).status == "authorized"
    assert [op for op, _ in processor.calls].count("authorize") == 1
    store.catch_up(grace=timedelta(0))
    store.close()
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT status FROM payment_status WHERE payment_id = %s",
                            (payment_id,)).fetchone() == ("authorized",)
    assert resolve_stuck(ledger, database_url, older_than=timedelta(0)) == 0


def test_a_payment_left_initiated_by_a_dead_request_is_failed_and_the_customer_may_pay_again(
    ledger: Ledger, database_url: str, settings: Settings, processor: SandboxProcessor
) -> None:
    session_id = open_session(ledger, new_merchant(ledger))
    payment_id = pay(ledger, session_id)  # card attached; the request died before authorizing
    store = ProjectionStore(database_url, select("status", personal_data_reader(settings)), envelope_opener(settings))
    try:
        store.catch_up(grace=timedelta(0))
        assert resolve_stuck(ledger, database_url, older_than=timedelta(hours=1)) == 0  # not old enough
        assert resolve_stuck(ledger, database_url, older_than=timedelta(0)) == 1
        payment = ledger.get_payment(payment_id)
        assert (payment.status, payment.failure_code) == ("failed", "authorization_not_started")
        assert processor.calls == []  # no processor ever heard of it
        session = ledger.get_session(session_id)
        assert session.payment_id is None and session.status == "code_verified"  # back at the card step
        store.catch_up(grace=timedelta(0))
        assert resolve_stuck(ledger, database_url, older_than=timedelta(0)) == 0
    finally:
        store.close()

"""An authorization the processor did not answer is settled later by asking, once."""

from __future__ import annotations

from datetime import timedelta

import psycopg
import pytest

from adapters.processors.resolver import resolve_stuck
from adapters.dev.sandbox_processor import SandboxProcessor
from api.bootstrap import Settings, envelope_opener
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
    store = ProjectionStore(database_url, select("status"), envelope_opener(settings))
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

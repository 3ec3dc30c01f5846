"""Reconciling a processor's day through the Ledger (application/reconciliation.py), on the real
PostgreSQL with the sandbox processor as a real HTTP service: the report is fetched, matched
against our captures and refunds (read from the read side), and the outcome saved with the
settlement of every matched capture; again is the same answer; a bad report applies nothing."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from uuid import UUID

import psycopg
import pytest
from eventsourcing.application import AggregateNotFoundError

from adapters.clock import ManualClock
from adapters.dev.processor_server import SandboxProcessorServer
from adapters.processors.client import HttpProcessor
from api.bootstrap import build_ledger
from api.settings import Settings
from application.ledger import Ledger
from domain.reconciliation import MalformedReport, ReportNotFinal, reconciliation_id
from tests.application.flows import new_merchant, open_session, pay
from tests.projections.test_views import catch_up

# These tests take today's date from the clock and need it to stay today (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("away_from_midnight")


@pytest.fixture
def sandbox() -> Iterator[SandboxProcessorServer]:
    with SandboxProcessorServer("primary") as server:
        server.close_day(datetime.now(UTC).date())  # today's report is final, as tomorrow's reconciler sees it
        yield server


@pytest.fixture
def ledger(settings: Settings, database_url: str, clock: ManualClock,
           sandbox: SandboxProcessorServer) -> Iterator[Ledger]:
    built = build_ledger(settings.replace(processors={"primary": sandbox.url}), database_url, clock=clock,
                         processor=HttpProcessor("primary", sandbox.url))
    yield built
    built.close()


def captured(ledger: Ledger, merchant_id: UUID, n: int, refund: int = 0) -> UUID:
    payment_id = pay(ledger, open_session(ledger, merchant_id, command_id=f"rec-open-{n}"), prefix=f"rec{n}-")
    ledger.authorize_payment(payment_id)
    ledger.capture_payment(f"rec-capture-{n}", payment_id)
    if refund:
        ledger.refund_payment(f"rec-refund-{n}", payment_id, amount_minor=refund)
    return payment_id


def statuses(database_url: str, *payment_ids: UUID) -> list[str]:
    with psycopg.connect(database_url) as conn:
        return [conn.execute("SELECT status FROM payment_status WHERE payment_id = %s", (p,)).fetchone()[0]
                for p in payment_ids]


def test_a_day_reconciles_settles_its_captures_and_a_second_run_changes_nothing(
    ledger: Ledger, database_url: str, settings: Settings, sandbox: SandboxProcessorServer,
) -> None:
    merchant = new_merchant(ledger, "rec-merchant")
    first, refunded, short = captured(ledger, merchant, 1), captured(ledger, merchant, 2, refund=500), \
        captured(ledger, merchant, 3)
    catch_up(database_url, settings)
    sandbox.misbehave(change=(ledger.get_payment(short).capture_reference or "",))
    today = datetime.now(UTC).date()
    result = ledger.reconcile("primary", today, "USD")
    assert result.result["counts"] == {"matched": 3, "amount_mismatch": 1, "missing_from_report": 0,
                                       "unknown_to_us": 0, "late": 0}
    assert result.result["settled"] == 2
    assert [d["processor_reference"] for d in result.result["discrepancies"]] == \
        [ledger.get_payment(short).capture_reference]
    assert ledger.get_payment(first).status == "settled" and ledger.get_payment(refunded).status == "settled"
    assert ledger.get_payment(short).status == "captured"  # the processor paid another amount: not settled
    again = ledger.reconcile("primary", today, "USD")
    assert again.replayed and again.result == result.result
    catch_up(database_url, settings)
    assert statuses(database_url, first, refunded, short) == ["settled", "settled", "captured"]
    assert ledger.repository.get(reconciliation_id("primary", today, "USD")).counts()["matched"] == 3


def test_a_day_the_processor_has_not_closed_is_not_reconciled_yet(
    ledger: Ledger, database_url: str, settings: Settings,
) -> None:
    payment_id = captured(ledger, new_merchant(ledger, "rec-open-day"), 21)
    catch_up(database_url, settings)
    tomorrow = datetime.now(UTC).date() + timedelta(days=1)  # still to come: its report is preliminary
    with pytest.raises(ReportNotFinal, match="has not closed"):
        ledger.reconcile("primary", tomorrow, "USD")
    with pytest.raises(AggregateNotFoundError):
        ledger.repository.get(reconciliation_id("primary", tomorrow, "USD"))
    assert ledger.get_payment(payment_id).status == "captured"


def test_a_report_that_does_not_add_up_applies_nothing(
    ledger: Ledger, database_url: str, settings: Settings, sandbox: SandboxProcessorServer,
) -> None:
    payment_id = captured(ledger, new_merchant(ledger, "rec-bad"), 9)
    catch_up(database_url, settings)
    sandbox.misbehave(deposit_off_by=7)
    with pytest.raises(MalformedReport, match="deposit"):
        ledger.reconcile("primary", datetime.now(UTC).date(), "USD")
    assert ledger.get_payment(payment_id).status == "captured"


def test_the_reconciler_loop_reconciles_each_currency_of_a_processors_day_once(
    ledger: Ledger, database_url: str, settings: Settings,
) -> None:
    from adapters.processors.reconciler import reconcile_day

    payment_id = captured(ledger, new_merchant(ledger, "rec-loop"), 11)
    catch_up(database_url, settings)
    today = datetime.now(UTC).date()
    assert reconcile_day(ledger, database_url, ["primary"], today) == 1  # USD, the one currency seen
    assert ledger.get_payment(payment_id).status == "settled"
    assert reconcile_day(ledger, database_url, ["primary"], today) == 0  # done before: nothing new

"""Disputes through the Ledger (application/disputes.py) on the real PostgreSQL: a processor's
notices open, rule and (out of order, twice) replay a dispute; the money is held, returned or
sent out and every posting set balances; merchants stage, submit and accept; the clock reminds
and expires; payouts take what disputes hold."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import psycopg
import pytest

from adapters.clock import ManualClock
from adapters.dev.sandbox_processor import SandboxProcessor
from api.settings import Settings
from application.disputes import DISPUTE_LOST, DISPUTE_OPENED, DISPUTE_WON, EARLY_FRAUD_WARNING, ProcessorEvent
from application.errors import NotFound
from application.ledger import Ledger
from domain.dispute import DISPUTE_FEE_MINOR, dispute_id
from domain.errors import DisputeClosed, DisputeOpen, InvalidField
from tests.application.flows import new_merchant, open_session, pay
from tests.projections.test_views import catch_up


def captured(ledger: Ledger, merchant: UUID, name: str) -> UUID:
    payment = pay(ledger, open_session(ledger, merchant, command_id=f"dp-open-{name}", amount_minor=10_000),
                  prefix=f"dp-{name}-")
    ledger.authorize_payment(payment)
    ledger.capture_payment(f"dp-capture-{name}", payment)
    return payment


def notice(kind: str, reference: str, n: int, *, dispute: str = "dp_1", amount: int | None = 4_000,
           at: datetime | None = None) -> ProcessorEvent:
    created = at or datetime(2026, 12, 1, tzinfo=UTC)
    return ProcessorEvent(event_id=f"evt_{n}", type=kind, created_at=created, payment_reference=reference,
                          dispute_id=None if kind == EARLY_FRAUD_WARNING else dispute, reason="fraudulent",
                          amount_minor=amount, currency="USD", due_by=created + timedelta(days=7))


def owed(database_url: str, *accounts: str) -> dict[str, int]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT account, balance_minor FROM ledger_balances WHERE account = ANY(%s)",
                            (list(accounts),)).fetchall()
        assert conn.execute("SELECT currency FROM ledger_balances GROUP BY currency HAVING sum(balance_minor) <> 0"
                            ).fetchall() == []  # every currency balances
    return {a: -b for a, b in rows}


def row(database_url: str, the_dispute: UUID) -> dict[str, Any]:
    with psycopg.connect(database_url) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        found = cur.execute("SELECT * FROM disputes WHERE dispute_id = %s", (the_dispute,)).fetchone()
    assert found is not None
    return found


def test_a_dispute_opens_holds_the_money_and_a_loss_sends_it_back_through_clearing(
    ledger: Ledger, database_url: str, settings: Settings,
) -> None:
    merchant = new_merchant(ledger, "dp-lost")
    payment = captured(ledger, merchant, "lost")
    reference = ledger.get_payment(payment).capture_reference or ""
    catch_up(database_url, settings)
    with pytest.raises(NotFound):
        ledger.record_processor_event("sandbox", notice(DISPUTE_OPENED, "ch_nobody", 0))
    opened = ledger.record_processor_event("sandbox", notice(DISPUTE_OPENED, reference, 1))
    the_dispute = dispute_id("sandbox", "dp_1")
    assert opened.result["status"] == "needs_response"
    assert ledger.record_processor_event("sandbox", notice(DISPUTE_OPENED, reference, 1)).replayed
    with pytest.raises(DisputeOpen):
        ledger.refund_payment("dp-refund", payment, amount_minor=100)
    catch_up(database_url, settings)
    payable = f"merchant:{merchant}:payable"
    fee = ledger.get_payment(payment).fee_minor
    assert owed(database_url, payable, "platform:disputes_held") == {
        payable: 10_000 - fee - 4_000 - DISPUTE_FEE_MINOR, "platform:disputes_held": 4_000 + DISPUTE_FEE_MINOR}
    assert row(database_url, the_dispute)["status"] == "needs_response"

    ledger.record_processor_event("sandbox", notice(DISPUTE_LOST, reference, 2))
    catch_up(database_url, settings)
    assert row(database_url, the_dispute)["status"] == "lost"
    assert owed(database_url, payable, "platform:disputes_held", "platform:dispute_fees") == {
        payable: 10_000 - fee - 4_000 - DISPUTE_FEE_MINOR, "platform:disputes_held": 0,
        "platform:dispute_fees": DISPUTE_FEE_MINOR}
    with pytest.raises(DisputeClosed):
        ledger.submit_dispute_evidence("dp-late-evidence", the_dispute, {"uncategorized_text": "too late"},
                                       submit=True)
    ledger.refund_payment("dp-refund-after", payment, amount_minor=100)  # decided: refunds are allowed again


def test_a_ruling_before_the_opening_opens_and_decides_and_the_late_opening_changes_nothing(
    ledger: Ledger, database_url: str, settings: Settings,
) -> None:
    merchant = new_merchant(ledger, "dp-order")
    payment = captured(ledger, merchant, "order")
    reference = ledger.get_payment(payment).capture_reference or ""
    catch_up(database_url, settings)
    won = ledger.record_processor_event("sandbox", notice(DISPUTE_WON, reference, 12))
    assert won.result["status"] == "won"
    late = ledger.record_processor_event("sandbox", notice(DISPUTE_OPENED, reference, 11))
    assert late.result["status"] == "won" and not late.replayed
    catch_up(database_url, settings)
    payable = f"merchant:{merchant}:payable"
    fee = ledger.get_payment(payment).fee_minor
    # Won: the amount is back; the dispute fee is ours (no refund of the fee by default).
    assert owed(database_url, payable, "platform:disputes_held")[payable] == 10_000 - fee - DISPUTE_FEE_MINOR


def test_merchants_stage_and_submit_evidence_and_the_processor_gets_it(
    ledger: Ledger, database_url: str, settings: Settings, processor: SandboxProcessor,
) -> None:
    merchant, other = new_merchant(ledger, "dp-evidence"), new_merchant(ledger, "dp-other")
    payment = captured(ledger, merchant, "evidence")
    catch_up(database_url, settings)
    ledger.record_processor_event("sandbox", notice(DISPUTE_OPENED, ledger.get_payment(payment).capture_reference
                                                    or "", 21, dispute="dp_ev"))
    the_dispute = dispute_id("sandbox", "dp_ev")
    with pytest.raises(NotFound):  # another merchant's dispute is as missing as a missing one
        ledger.submit_dispute_evidence("dp-ev-0", the_dispute, {"uncategorized_text": "x"}, submit=False,
                                       merchant_id=other)
    with pytest.raises(InvalidField):
        ledger.submit_dispute_evidence("dp-ev-bad", the_dispute, {"favourite_colour": "red"}, submit=False)
    ledger.submit_dispute_evidence("dp-ev-1", the_dispute, {"product_description": "Large pizza"}, submit=False,
                                   merchant_id=merchant)
    assert processor.evidence == {}
    ledger.submit_dispute_evidence("dp-ev-2", the_dispute, {"customer_communication": "code 123456 entered"},
                                   submit=True, merchant_id=merchant)
    assert processor.evidence == {"dp_ev": {"product_description": "Large pizza",
                                            "customer_communication": "code 123456 entered"}}
    assert ledger.get_dispute(the_dispute).status == "under_review"
    with pytest.raises(DisputeClosed):
        ledger.submit_dispute_evidence("dp-ev-3", the_dispute, {"uncategorized_text": "more"}, submit=False)
    catch_up(database_url, settings)
    assert row(database_url, the_dispute)["evidence_submitted_at"] is not None


def test_the_clock_reminds_then_expires_an_unanswered_dispute_and_accepting_one_sends_the_money(
    ledger: Ledger, database_url: str, settings: Settings, clock: ManualClock,
) -> None:
    from adapters.processors.dispute_clock import tend_disputes

    merchant = new_merchant(ledger, "dp-clock")
    first, second = captured(ledger, merchant, "clock-1"), captured(ledger, merchant, "clock-2")
    catch_up(database_url, settings)
    now = datetime.now(UTC)
    for n, (payment, name) in enumerate(((first, "dp_c1"), (second, "dp_c2"))):
        ledger.record_processor_event("sandbox", notice(
            DISPUTE_OPENED, ledger.get_payment(payment).capture_reference or "", 31 + n, dispute=name,
            at=now - timedelta(days=6)))  # due tomorrow
    catch_up(database_url, settings)
    clock.advance(now - clock.now())
    assert tend_disputes(ledger, database_url) == 2  # both reminded
    assert tend_disputes(ledger, database_url) == 0
    ledger.accept_dispute("dp-accept", dispute_id("sandbox", "dp_c2"), merchant_id=merchant)
    catch_up(database_url, settings)
    clock.advance(timedelta(days=2))
    assert tend_disputes(ledger, database_url) == 1  # the unanswered one expires
    assert ledger.get_dispute(dispute_id("sandbox", "dp_c1")).status == "expired"
    assert ledger.get_dispute(dispute_id("sandbox", "dp_c2")).status == "accepted"
    catch_up(database_url, settings)
    assert owed(database_url, "platform:disputes_held")["platform:disputes_held"] == 0


def test_an_early_fraud_warning_is_recorded_on_the_payment_once(ledger: Ledger, database_url: str,
                                                                 settings: Settings) -> None:
    payment = captured(ledger, new_merchant(ledger, "dp-efw"), "efw")
    catch_up(database_url, settings)
    reference = ledger.get_payment(payment).capture_reference or ""
    ledger.record_processor_event("sandbox", notice(EARLY_FRAUD_WARNING, reference, 41))
    assert ledger.record_processor_event("sandbox", notice(EARLY_FRAUD_WARNING, reference, 41)).replayed
    assert ledger.get_payment(payment).fraud_warned

"""Settlement reports from the sandbox processor (a real local HTTP service), read through the
SettlementReports adapter and matched against what we sent it: right when it behaves, and each
way it can misbehave named (issue 10's processor side; the reconcile use case is not built yet)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from adapters.dev.processor_server import SandboxProcessorServer, settlement_fee
from adapters.processors.settlement import HttpSettlementReports
from application.errors import ProcessorUnavailable
from domain.reconciliation import (
    AMOUNT_MISMATCH,
    LATE,
    MATCHED,
    MISSING_FROM_REPORT,
    UNKNOWN_TO_US,
    Expected,
    MalformedReport,
    match,
)

# These tests take today's date from the clock and need it to stay today (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("away_from_midnight")


@pytest.fixture
def sandbox() -> Iterator[SandboxProcessorServer]:
    server = SandboxProcessorServer("primary")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def reports(sandbox: SandboxProcessorServer) -> Iterator[HttpSettlementReports]:
    made = HttpSettlementReports({"primary": sandbox.url})
    yield made
    made.close()


def charge(sandbox: SandboxProcessorServer, amount: int, refund: int = 0) -> list[Expected]:
    """Authorize and capture ``amount`` (and refund ``refund``) at the sandbox, as the ledger
    does; what our ledger would then expect its report to list."""
    payment_id = uuid.uuid4()
    _, authorized = sandbox.handle_operation("authorize", f"authorize:{payment_id}", {
        "amount_minor": amount, "currency": "USD", "card_token": "card_x", "card_last4": "4242",
        "merchant_id": "m1"})
    body = {"authorization_reference": authorized["reference"], "amount_minor": amount, "currency": "USD"}
    _, captured = sandbox.handle_operation("capture", f"capture:{payment_id}", body)
    today = datetime.now(UTC).date()
    ours = [Expected(captured["reference"], "capture", amount, "USD", payment_id, today)]
    if refund:
        _, refunded = sandbox.handle_operation("refund", f"refund:{payment_id}", {**body, "amount_minor": refund})
        ours.append(Expected(refunded["reference"], "refund", -refund, "USD", payment_id, today))
    return ours


def test_a_day_that_went_as_sent_matches_line_for_line_with_the_processors_fees(
    sandbox: SandboxProcessorServer, reports: HttpSettlementReports,
) -> None:
    ours = [*charge(sandbox, 2_500), *charge(sandbox, 10_000, refund=1_000), *charge(sandbox, 999)]
    today = datetime.now(UTC).date()
    report = reports.fetch("primary", today, "USD")
    assert {line.processor_reference: line.fee_minor for line in report.lines} == {
        e.processor_reference: settlement_fee(e.amount_minor) if e.kind == "capture" else 0 for e in ours}
    assert [d.total_minor for d in report.deposits] == [sum(line.net_minor for line in report.lines)]
    assert [f.outcome for f in match(report, ours)] == [MATCHED] * 4
    assert reports.fetch("primary", today, "EUR").lines == ()  # another currency's report is empty


def test_each_misbehaviour_of_the_report_is_named(
    sandbox: SandboxProcessorServer, reports: HttpSettlementReports,
) -> None:
    dropped, changed, moved, fine = (charge(sandbox, 1_000 + n)[0] for n in range(4))
    sandbox.misbehave(drop=(dropped.processor_reference,), change=(changed.processor_reference,),
                      move=(moved.processor_reference,), unknown_lines=1)
    today = datetime.now(UTC).date()
    ours = [dropped, changed, moved, fine]
    found = {f.processor_reference: f.outcome for f in match(reports.fetch("primary", today, "USD"), ours)}
    assert found == {dropped.processor_reference: MISSING_FROM_REPORT, changed.processor_reference: AMOUNT_MISMATCH,
                     moved.processor_reference: MISSING_FROM_REPORT, fine.processor_reference: MATCHED,
                     "primary_capt_stranger0": UNKNOWN_TO_US}
    # The moved line comes the next day, late; the day's other transactions are not due again.
    tomorrow = {f.processor_reference: f.outcome
                for f in match(reports.fetch("primary", today + timedelta(days=1), "USD"), [moved])}
    assert tomorrow[moved.processor_reference] == LATE


def test_a_report_whose_deposit_does_not_add_up_is_refused_whole(
    sandbox: SandboxProcessorServer, reports: HttpSettlementReports,
) -> None:
    charge(sandbox, 2_500)
    sandbox.misbehave(deposit_off_by=1)
    with pytest.raises(MalformedReport, match="lines' nets sum to"):
        reports.fetch("primary", datetime.now(UTC).date(), "USD")


def test_a_processor_that_is_down_or_unknown_is_told_apart_from_a_bad_report(
    sandbox: SandboxProcessorServer, reports: HttpSettlementReports,
) -> None:
    sandbox.set_down(True)
    with pytest.raises(ProcessorUnavailable):
        reports.fetch("primary", datetime.now(UTC).date(), "USD")
    with pytest.raises(ValueError, match="no processor named 'tertiary'"):
        reports.fetch("tertiary", datetime.now(UTC).date(), "USD")

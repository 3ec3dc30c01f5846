"""Reconciliation's matching (domain/reconciliation.py), as properties: whatever our ledger
recorded and however the processor's report differs from it, every report line and every
transaction expected that day gets exactly one finding, and the finding says what happened."""

from __future__ import annotations

from dataclasses import replace
from datetime import date, timedelta
from uuid import uuid4

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.reconciliation import (
    AMOUNT_MISMATCH,
    DISCREPANCIES,
    LATE,
    MATCHED,
    MISSING_FROM_REPORT,
    UNKNOWN_TO_US,
    Deposit,
    Expected,
    MalformedReport,
    Reconciliation,
    ReportLine,
    SettlementReport,
    match,
)

DAY = date(2026, 12, 3)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[SettlementReport, list[Expected], dict[str, str]]:
    """(report, what we expected, reference -> what was done to it on the way)."""
    count = draw(st.integers(0, 25))
    ours: list[Expected] = []
    fate: dict[str, str] = {}
    lines: list[ReportLine] = []
    for n in range(count):
        kind = draw(st.sampled_from(("capture", "capture", "refund", "chargeback")))
        amount = draw(st.integers(1, 10**7)) * (1 if kind == "capture" else -1)
        day = DAY - timedelta(days=draw(st.sampled_from((0, 0, 0, 1, 2))))
        mine = Expected(f"ref{n}", kind, amount, "USD", uuid4(), day)
        ours.append(mine)
        what = draw(st.sampled_from(("as is", "as is", "dropped", "amount changed")))
        fate[mine.processor_reference] = what
        if what == "dropped":
            continue
        gross = amount + (draw(st.integers(1, 999)) * (1 if amount > 0 else -1) if what == "amount changed" else 0)
        fee = draw(st.integers(0, 500))
        lines.append(ReportLine(mine.processor_reference, kind, gross, fee, gross - fee, "dep1", day))
    for n in range(draw(st.integers(0, 3))):  # lines for transactions we never sent
        gross = draw(st.integers(1, 10**6))
        lines.append(ReportLine(f"stranger{n}", "capture", gross, 0, gross, "dep1", DAY))
        fate[f"stranger{n}"] = "unknown"
    for n in range(draw(st.integers(0, 2))):  # ours in another currency: another report's business
        ours.append(Expected(f"eur{n}", "capture", 1_000, "EUR", uuid4(), DAY))
        fate[f"eur{n}"] = "other currency"
    deposit = Deposit("dep1", sum(line.net_minor for line in lines))
    return SettlementReport("primary", DAY, "USD", tuple(draw(st.permutations(lines))), (deposit,)), ours, fate


@given(scenarios())
def test_every_line_and_every_transaction_of_the_day_gets_exactly_the_finding_it_should(
    scenario: tuple[SettlementReport, list[Expected], dict[str, str]],
) -> None:
    report, ours, fate = scenario
    findings = match(report, ours)
    by_reference: dict[str, list[str]] = {}
    for finding in findings:
        by_reference.setdefault(finding.processor_reference, []).append(finding.outcome)
    expected_day = {e.processor_reference: e.day for e in ours}
    for reference, what in fate.items():
        outcome = by_reference.get(reference, [])
        if what == "unknown":
            assert outcome == [UNKNOWN_TO_US]
        elif what == "other currency":
            assert outcome == []
        elif what == "amount changed":
            assert outcome == [AMOUNT_MISMATCH]
        elif what == "dropped":  # missing if due that day; an earlier day's may still come late
            assert outcome == ([MISSING_FROM_REPORT] if expected_day[reference] == DAY else [])
        else:
            assert outcome == [MATCHED if expected_day[reference] == DAY else LATE]
    assert set(by_reference) <= set(fate)
    for finding in findings:
        if finding.outcome in (MATCHED, LATE):
            assert finding.reported_minor == finding.expected_minor and finding.payment_id is not None
    reconciliation = Reconciliation.reconcile(report, findings)
    assert sum(reconciliation.counts().values()) == len(findings)
    assert len(reconciliation.discrepancies) == sum(1 for f in findings if f.outcome in DISCREPANCIES)
    assert reconciliation.id == Reconciliation.reconcile(report, findings).id  # one per processor, day, currency


def line(reference: str = "r1", kind: str = "capture", gross: int = 1_000, fee: int = 49,
         deposit: str = "d1", day: date = DAY) -> ReportLine:
    return ReportLine(reference, kind, gross, fee, gross - fee, deposit, day)


@pytest.mark.parametrize(("lines", "deposits", "says"), [
    ((line(),), (Deposit("d1", 900),), "lines' nets sum to 951"),
    ((line(), line()), (Deposit("d1", 1_902),), "repeats a reference"),
    ((line(kind="payout"),), (Deposit("d1", 951),), "has kind 'payout'"),
    ((line(kind="refund"),), (Deposit("d1", 951),), "refund's gross must be negative"),
    ((replace(line(), net_minor=1_000),), (Deposit("d1", 1_000),), "net is not gross less"),
    ((line(deposit="d2"),), (Deposit("d1", 951),), "names deposit 'd2'"),
    ((line(day=DAY + timedelta(days=1)),), (Deposit("d1", 951),), "after the report's day"),
    ((line(reference=""),), (Deposit("d1", 951),), "no processor reference"),
])
def test_a_report_that_contradicts_itself_is_refused_whole_with_the_reason(
    lines: tuple[ReportLine, ...], deposits: tuple[Deposit, ...], says: str,
) -> None:
    with pytest.raises(MalformedReport, match=says):
        match(SettlementReport("primary", DAY, "USD", lines, deposits), [])


def test_one_transaction_expected_twice_is_a_bug_not_a_finding() -> None:
    twice = [Expected("r1", "capture", 1_000, "USD", uuid4(), DAY)] * 2
    with pytest.raises(ValueError, match="expected twice"):
        match(SettlementReport("primary", DAY, "USD", (), ()), twice)

"""Reconciliation: a processor's daily settlement report against what our ledger says.

A report (one processor, one day, one currency) has one line per captured, refunded or
charged-back transaction, with the processor's reference, gross, fee and net, and the deposit
that paid it. Amounts are signed minor units: money towards us is positive (a capture), money
back to the card holder negative (a refund, a chargeback); ``net = gross - fee``; a deposit's
total is the sum of its lines' nets.

``match`` pairs each line with the transaction we recorded under the same reference and kind
and says, for every line and every transaction we expected that day, exactly one thing:
matched, amount mismatch, missing from the report, unknown to us, or late (listed on a later
day than our ledger recorded it, whose own day's report did not list it). ``Reconciliation``
is the aggregate that records the outcome, once per (processor, day, currency): running the
same day again changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import date
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import Aggregate, event

from domain.errors import DomainError
from domain.money import check_currency
from domain.values import check_text

KINDS = ("capture", "refund", "chargeback")
MATCHED = "matched"
AMOUNT_MISMATCH = "amount_mismatch"
MISSING_FROM_REPORT = "missing_from_report"
UNKNOWN_TO_US = "unknown_to_us"
LATE = "late"
FINDINGS = (MATCHED, AMOUNT_MISMATCH, MISSING_FROM_REPORT, UNKNOWN_TO_US, LATE)
DISCREPANCIES = (AMOUNT_MISMATCH, MISSING_FROM_REPORT, UNKNOWN_TO_US)


class MalformedReport(DomainError):
    """The report contradicts itself: it is rejected whole, nothing of it is applied."""

    code = "malformed_settlement_report"


class ReportNotFinal(DomainError):
    """The processor has not closed the day yet: its report may still change, so it is not
    reconciled (nothing is recorded; ask again later)."""

    code = "settlement_report_not_final"


@dataclass(frozen=True)
class ReportLine:
    processor_reference: str
    kind: str
    gross_minor: int
    fee_minor: int
    net_minor: int
    deposit_id: str
    transaction_day: date


@dataclass(frozen=True)
class Deposit:
    deposit_id: str
    total_minor: int


@dataclass(frozen=True)
class SettlementReport:
    processor: str
    day: date
    currency: str
    lines: tuple[ReportLine, ...]
    deposits: tuple[Deposit, ...]
    # Whether the processor closed the day: a preliminary report can still change.
    final: bool = True

    def check(self) -> None:
        """Raise MalformedReport naming the first thing that does not add up."""
        check_currency(self.currency)
        seen: set[tuple[str, str]] = set()
        deposits = {d.deposit_id: d for d in self.deposits}
        if len(deposits) != len(self.deposits):
            raise MalformedReport("a deposit appears twice in the report")
        totals = dict.fromkeys(deposits, 0)
        for number, line in enumerate(self.lines, start=1):
            where = f"line {number} ({line.processor_reference or 'no reference'})"
            if not line.processor_reference:
                raise MalformedReport(f"{where} has no processor reference")
            if line.kind not in KINDS:
                raise MalformedReport(f"{where} has kind {line.kind!r}; expected one of {', '.join(KINDS)}")
            if (line.processor_reference, line.kind) in seen:
                raise MalformedReport(f"{where} repeats a reference and kind already reported")
            seen.add((line.processor_reference, line.kind))
            towards_us = line.kind == "capture"
            if line.gross_minor == 0 or (line.gross_minor > 0) != towards_us:
                sign = "positive" if towards_us else "negative"
                raise MalformedReport(f"{where}: a {line.kind}'s gross must be {sign}")
            if line.fee_minor < 0 or line.net_minor != line.gross_minor - line.fee_minor:
                raise MalformedReport(f"{where}: net is not gross less a non-negative fee")
            if line.transaction_day > self.day:
                raise MalformedReport(f"{where} happened after the report's day")
            if line.deposit_id not in totals:
                raise MalformedReport(f"{where} names deposit {line.deposit_id!r}, which the report does not list")
            totals[line.deposit_id] += line.net_minor
        for deposit_id, total in totals.items():
            if total != deposits[deposit_id].total_minor:
                raise MalformedReport(f"deposit {deposit_id} totals {deposits[deposit_id].total_minor}, "
                                      f"but its lines' nets sum to {total}")


@dataclass(frozen=True)
class Expected:
    """A transaction our ledger recorded with this processor, which its report should list."""

    processor_reference: str
    kind: str
    amount_minor: int  # signed like a report line's gross
    currency: str
    payment_id: UUID
    day: date  # when it happened by our ledger: the report of that day should list it


@dataclass(frozen=True)
class Finding:
    outcome: str
    processor_reference: str
    kind: str
    payment_id: UUID | None = None
    expected_minor: int | None = None
    reported_minor: int | None = None
    fee_minor: int | None = None
    deposit_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "payment_id": str(self.payment_id) if self.payment_id else None}


def match(report: SettlementReport, expected: Iterable[Expected]) -> list[Finding]:
    """One finding per report line, and one per transaction expected on the report's day that the
    report does not list. ``expected``: our transactions with this processor not yet reconciled
    (those of earlier days too: a line for one of them is late, not unknown)."""
    report.check()
    ours: dict[tuple[str, str], Expected] = {}
    for mine in expected:
        if mine.currency != report.currency:
            continue  # another currency's report lists it
        if (mine.processor_reference, mine.kind) in ours:
            raise ValueError(f"{mine.kind} {mine.processor_reference} is expected twice")
        ours[(mine.processor_reference, mine.kind)] = mine
    findings: list[Finding] = []
    reported: set[tuple[str, str]] = set()
    for line in report.lines:
        key = (line.processor_reference, line.kind)
        reported.add(key)
        found = ours.get(key)
        if found is None:
            outcome = UNKNOWN_TO_US
        elif found.amount_minor != line.gross_minor:
            outcome = AMOUNT_MISMATCH
        else:
            outcome = LATE if found.day < report.day else MATCHED
        findings.append(Finding(
            outcome, line.processor_reference, line.kind, payment_id=found.payment_id if found else None,
            expected_minor=found.amount_minor if found else None, reported_minor=line.gross_minor,
            fee_minor=line.fee_minor, deposit_id=line.deposit_id,
        ))
    for key, mine in sorted(ours.items()):
        if key not in reported and mine.day == report.day:
            findings.append(Finding(MISSING_FROM_REPORT, mine.processor_reference, mine.kind,
                                    payment_id=mine.payment_id, expected_minor=mine.amount_minor))
    return findings


def reconciliation_id(processor: str, day: date, currency: str) -> UUID:
    return uuid5(NAMESPACE_URL, f"echotransact:reconciliation:{processor}:{day.isoformat()}:{currency}")


class Reconciliation(Aggregate):
    """One processor's report of one day in one currency, and what it said against our ledger."""

    class Reconciled(Aggregate.Created):
        processor: str
        day: str
        currency: str
        findings: list[dict[str, Any]]
        deposits: list[dict[str, Any]]

    @classmethod
    def reconcile(cls, report: SettlementReport, findings: Sequence[Finding]) -> Reconciliation:
        return cls._create(
            cls.Reconciled,
            id=reconciliation_id(report.processor, report.day, report.currency),
            processor=check_text("processor", report.processor, max_length=50),
            day=report.day.isoformat(),
            currency=report.currency,
            findings=[f.as_dict() for f in findings],
            deposits=[asdict(d) for d in report.deposits],
        )

    @event(Reconciled)
    def __init__(self, *, processor: str, day: str, currency: str, findings: list[dict[str, Any]],
                 deposits: list[dict[str, Any]]) -> None:
        self.merchant_id: UUID | None = None  # the platform's, no merchant's
        self.processor = processor
        self.day = day
        self.currency = currency
        self.findings = findings
        self.deposits = deposits

    @property
    def discrepancies(self) -> list[dict[str, Any]]:
        return [f for f in self.findings if f["outcome"] in DISCREPANCIES]

    def counts(self) -> dict[str, int]:
        return {outcome: sum(1 for f in self.findings if f["outcome"] == outcome) for outcome in FINDINGS}

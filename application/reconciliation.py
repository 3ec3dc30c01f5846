"""Reconcile a processor's day: its settlement report against our captures and refunds.

One command per (processor, day, currency), idempotent by that: the report is fetched and
checked whole (a malformed one is refused, nothing applied), matched against our transactions
(domain/reconciliation.py), and the Reconciliation with every finding is saved in one
transaction with the settlement of each payment whose capture the report matched. Running the
same day again answers the first result.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from typing import Any

from eventsourcing.domain import Aggregate

from application.ports import ProcessorTransactions, SettlementReports
from application.unit_of_work import CommandResult, LedgerBase
from domain.payment import PaymentStatus
from domain.reconciliation import LATE, MATCHED, Reconciliation, match, reconciliation_id


class ReconciliationCommands(LedgerBase):
    settlement_reports: SettlementReports | None = None
    processor_transactions: ProcessorTransactions | None = None

    def reconcile(self, processor: str, day: date, currency: str) -> CommandResult:
        reports, ours = self.settlement_reports, self.processor_transactions
        if reports is None or ours is None:
            raise RuntimeError("this ledger was built without settlement reports (no processors configured)")
        reconciliation = reconciliation_id(processor, day, currency)

        def decide() -> tuple[Sequence[Aggregate], dict[str, Any]]:
            report = reports.fetch(processor, day, currency)
            findings = match(report, ours.expected(processor, currency, day))
            done = Reconciliation.reconcile(report, findings)
            settled = []
            for finding in findings:
                if finding.outcome in (MATCHED, LATE) and finding.kind == "capture" and finding.payment_id:
                    payment = self.get_payment(finding.payment_id)
                    if payment.status == PaymentStatus.CAPTURED:
                        payment.settle(f"{processor}:{finding.deposit_id}")
                        settled.append(payment)
            return [done, *settled], {
                "reconciliation_id": str(done.id), "processor": processor, "day": day.isoformat(),
                "currency": currency, "counts": done.counts(), "settled": len(settled),
                "discrepancies": done.discrepancies,
            }

        return self._execute(
            f"reconcile:{reconciliation}", "reconcile",
            {"processor": processor, "day": day.isoformat(), "currency": currency}, reconciliation, decide,
        )

"""Reconcile a processor's day: its settlement report against our captures and refunds.

One command per (processor, day, currency), idempotent by that: the report is fetched and
checked whole (a malformed one is refused, nothing applied), matched against our transactions
(domain/reconciliation.py), and the Reconciliation with every finding is saved in one
transaction with the settlement of each capture and refund the report matched (a capture with
the processor's fee on it, which goes to the processor-fees expense account). Running the same
day again answers the first result.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate

from application.ports import FxRates, ProcessorTransactions, SettlementReports
from application.unit_of_work import CommandResult, LedgerBase
from domain.fx import FxRate
from domain.payment import Payment
from domain.reconciliation import LATE, MATCHED, Reconciliation, ReportNotFinal, match, reconciliation_id


class ReconciliationCommands(LedgerBase):
    settlement_reports: SettlementReports | None = None
    processor_transactions: ProcessorTransactions | None = None
    fx_rates: FxRates | None = None

    def _conversion_for(self, payment: Payment, rates: dict[UUID, FxRate | None]) -> FxRate | None:
        """The rate a payment's merchant settles at, one per merchant and reconciliation (the
        rate is recorded in each settlement, so replaying the events never asks again)."""
        if payment.merchant_id not in rates:
            target = self.merchant_to_read(payment.merchant_id).settlement_currency
            if target is None or target == payment.currency:
                rates[payment.merchant_id] = None
            else:
                if self.fx_rates is None:
                    raise RuntimeError("this ledger was built without FX rates, and a merchant settles in "
                                       f"{target}")
                rates[payment.merchant_id] = self.fx_rates.rate(payment.currency, target)
        return rates[payment.merchant_id]

    def reconcile(self, processor: str, day: date, currency: str) -> CommandResult:
        reports, ours = self.settlement_reports, self.processor_transactions
        if reports is None or ours is None:
            raise RuntimeError("this ledger was built without settlement reports (no processors configured)")
        reconciliation = reconciliation_id(processor, day, currency)

        def decide() -> tuple[Sequence[Aggregate], dict[str, Any]]:
            report = reports.fetch(processor, day, currency)
            if not report.final:
                raise ReportNotFinal(f"{processor} has not closed {day} yet: its {currency} report may still change")
            findings = match(report, ours.expected(processor, currency, day))
            done = Reconciliation.reconcile(report, findings)
            settled: dict[UUID, Payment] = {}
            rates: dict[UUID, FxRate | None] = {}
            captures = refunds = 0
            # Every payment the report matched, loaded at once (one query, not one per line).
            matched = self._get_many(Payment, [f.payment_id for f in findings
                                               if f.outcome in (MATCHED, LATE) and f.payment_id is not None])
            for finding in findings:
                if finding.outcome not in (MATCHED, LATE) or finding.payment_id is None:
                    continue
                payment = matched.get(finding.payment_id)
                if payment is None:  # the read side knows a payment the event store does not: a bug
                    raise RuntimeError(f"payment {finding.payment_id} is not in the event store")
                reference = f"{processor}:{finding.deposit_id}"
                if finding.kind == "capture" and payment.can_settle:
                    payment.settle(reference, finding.fee_minor or 0, self._conversion_for(payment, rates))
                    captures += 1
                elif finding.kind == "refund" and payment.can_settle_refund(finding.processor_reference):
                    payment.settle_refund(finding.processor_reference, reference, finding.fee_minor or 0)
                    refunds += 1
                else:
                    continue
                settled[finding.payment_id] = payment
            return [done, *settled.values()], {
                "reconciliation_id": str(done.id), "processor": processor, "day": day.isoformat(),
                "currency": currency, "counts": done.counts(), "settled": captures, "refunds_settled": refunds,
                "discrepancies": done.discrepancies,
            }

        return self._execute(
            f"reconcile:{reconciliation}", "reconcile",
            {"processor": processor, "day": day.isoformat(), "currency": currency}, reconciliation, decide,
        )

"""Disputes: what processors tell us about chargebacks, and what merchants answer.

``record_processor_event`` takes one verified notification from a processor (the HTTP layer
checks its signature first) and applies it, idempotent by the processor's event id: a second
delivery answers the first result; an event that arrives before the one it follows (won before
opened) opens the dispute from what it carries and then applies it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate

from application.errors import NotFound, ProcessorUnavailable
from application.ports import PaymentReferences, ProcessorRouter
from application.privacy import PrivacyCommands
from application.unit_of_work import CommandResult
from domain.dispute import Dispute, DisputeStatus, dispute_id
from domain.errors import InvalidField
from domain.payment import Payment

DISPUTE_OPENED = "dispute.opened"
DISPUTE_WON = "dispute.won"
DISPUTE_LOST = "dispute.lost"
EARLY_FRAUD_WARNING = "early_fraud_warning"
PROCESSOR_EVENT_TYPES = (DISPUTE_OPENED, DISPUTE_WON, DISPUTE_LOST, EARLY_FRAUD_WARNING)


@dataclass(frozen=True)
class ProcessorEvent:
    """One notification from a processor, as its signed body says (adapters/processors/notifications.py)."""

    event_id: str  # the processor's, unique per processor: the idempotency key
    type: str  # one of PROCESSOR_EVENT_TYPES
    created_at: datetime  # when the processor emitted it (orders events that arrive out of order)
    payment_reference: str  # the processor's reference of the capture (what its settlement report lists)
    dispute_id: str | None = None  # the processor's dispute id (None for an early fraud warning)
    reason: str | None = None  # fraudulent, product_not_received, duplicate, product_unacceptable, ...
    amount_minor: int | None = None  # disputed amount (may be part of the capture)
    currency: str | None = None
    due_by: datetime | None = None  # when the merchant's evidence is due


# -- the use cases ----------------------------------------------------------------------------

DUE_SOON = timedelta(days=2)  # a reminder goes out this long before the evidence is due


def dispute_result(dispute: Dispute) -> dict[str, Any]:
    return {"dispute_id": str(dispute.id), "payment_id": str(dispute.payment_id), "status": dispute.status,
            "reason": dispute.reason, "amount_minor": dispute.amount_minor, "currency": dispute.currency}


class DisputeCommands(PrivacyCommands):
    processors: ProcessorRouter  # the Ledger's (application/payments.py)
    payment_references: PaymentReferences | None = None
    # Whether a won dispute returns its fee to the merchant too (processors differ).
    dispute_fee_returned_on_win: bool = False

    def get_dispute(self, the_dispute: UUID, merchant_id: UUID | None = None) -> Dispute:
        return self._get(Dispute, the_dispute, merchant_id)

    def record_processor_event(self, processor: str, event: ProcessorEvent) -> CommandResult:
        """Apply one verified notification; idempotent by (processor, event id). Raises NotFound
        when no payment of ours has the reference (the processor retries later)."""
        if event.type not in PROCESSOR_EVENT_TYPES:
            raise InvalidField(f"unknown processor event type {event.type!r}", field="type")
        references = self.payment_references
        if references is None:
            raise RuntimeError("this ledger was built without payment references (no read side)")
        request = {"processor": processor, "event_id": event.event_id, "type": event.type,
                   "payment_reference": event.payment_reference, "dispute_id": event.dispute_id}

        def decide() -> tuple[Sequence[Aggregate], dict[str, Any]]:
            payment_id = references.find(processor, event.payment_reference)
            if payment_id is None:
                raise NotFound(f"no payment with {processor} reference {event.payment_reference!r}")
            payment = self.get_payment(payment_id)
            now = self.clock.now()
            if event.type == EARLY_FRAUD_WARNING:
                payment.warn_of_fraud(event.event_id, event.reason or "fraudulent")
                return [payment], {"payment_id": str(payment_id), "early_fraud_warning": True}
            if not event.dispute_id:
                raise InvalidField("a dispute event needs the processor's dispute id", field="dispute_id")
            found = self._find_dispute(dispute_id(processor, event.dispute_id))
            dispute = found or Dispute.open(
                merchant_id=payment.merchant_id, payment_id=payment.id, processor=processor,
                processor_dispute_id=event.dispute_id, reason=event.reason or "general",
                amount_minor=event.amount_minor or payment.captured_minor, currency=payment.currency,
                due_by=event.due_by or (event.created_at + timedelta(days=7)))
            if found is None:  # opened now: by this event, or by a ruling that came before it
                payment.open_dispute(str(dispute.id), dispute.amount_minor, dispute.fee_minor)
            if event.type in (DISPUTE_WON, DISPUTE_LOST) and dispute.rule(
                    DisputeStatus.WON if event.type == DISPUTE_WON else DisputeStatus.LOST, now):
                self._settle_dispute_money(payment, dispute)
            return [dispute, payment], dispute_result(dispute)

        return self._execute(f"processor_event:{processor}:{event.event_id}", "record_processor_event", request,
                             None, decide)

    def _find_dispute(self, the_dispute: UUID) -> Dispute | None:
        try:
            return self.get_dispute(the_dispute)
        except NotFound:
            return None

    def _settle_dispute_money(self, payment: Payment, dispute: Dispute) -> None:
        payment.close_dispute(str(dispute.id), dispute.status, amount_minor=dispute.amount_minor,
                              fee_minor=dispute.fee_minor, fee_returned_on_win=self.dispute_fee_returned_on_win)

    def submit_dispute_evidence(self, command_id: str, the_dispute: UUID, evidence: Mapping[str, Any], *,
                                submit: bool, merchant_id: UUID | None = None) -> CommandResult:
        """Stage evidence, or (``submit``) send everything staged to the processor, which
        answers later with its ruling. The processor gets it with the command's idempotency key."""

        def decide() -> tuple[Sequence[Aggregate], dict[str, Any]]:
            dispute = self.get_dispute(the_dispute, merchant_id)
            now = self.clock.now()
            # The evidence is about the customer: sealed under their key, as it is staged.
            seal = self._seal_for_payment(self.get_payment(dispute.payment_id))
            staged = self.open_personal(dispute.evidence_personal) or {}
            staged_evidence = dict(staged.get("evidence") or {})
            if not submit:
                dispute.stage_evidence(evidence, now, staged=staged_evidence, seal=seal)
                return [dispute], dispute_result(dispute)
            sent = dispute.submit_evidence(evidence, now, staged=staged_evidence, seal=seal)
            responder = self.processors.named(dispute.processor)
            submit_evidence = getattr(responder, "submit_dispute_evidence", None)
            if submit_evidence is None:
                raise ProcessorUnavailable(f"{dispute.processor} takes no dispute evidence through its API")
            submit_evidence(idempotency_key=f"evidence:{dispute.id}", dispute_id=dispute.processor_dispute_id,
                            evidence=sent)
            return [dispute], dispute_result(dispute)

        return self._execute(command_id, "submit_dispute_evidence",
                             {"dispute_id": str(the_dispute), "evidence": dict(evidence), "submit": submit},
                             the_dispute, decide)

    def accept_dispute(self, command_id: str, the_dispute: UUID, *, merchant_id: UUID | None = None) -> CommandResult:
        """The merchant concedes: the money goes as if the dispute were lost."""

        def decide() -> tuple[Sequence[Aggregate], dict[str, Any]]:
            dispute = self.get_dispute(the_dispute, merchant_id)
            dispute.accept(self.clock.now())
            payment = self.get_payment(dispute.payment_id)
            self._settle_dispute_money(payment, dispute)
            return [dispute, payment], dispute_result(dispute)

        return self._execute(command_id, "accept_dispute", {"dispute_id": str(the_dispute)}, the_dispute, decide)

    def tend_dispute(self, the_dispute: UUID) -> CommandResult | None:
        """The clock's work on one dispute: a reminder when its evidence is due soon, expiry once
        the due date passed unanswered. None when there is nothing to do now."""
        dispute = self.get_dispute(the_dispute)
        now = self.clock.now()
        if dispute.status != DisputeStatus.NEEDS_RESPONSE:
            return None
        if now >= dispute.due_by:
            def expire() -> tuple[Sequence[Aggregate], dict[str, Any]]:
                current = self.get_dispute(the_dispute)
                current.expire(self.clock.now())
                payment = self.get_payment(current.payment_id)
                self._settle_dispute_money(payment, current)
                return [current, payment], dispute_result(current)

            return self._execute(f"expire_dispute:{the_dispute}", "expire_dispute", {"dispute_id": str(the_dispute)},
                                 the_dispute, expire)
        if now >= dispute.due_by - DUE_SOON and not dispute.reminded:
            def remind() -> tuple[Sequence[Aggregate], dict[str, Any]]:
                current = self.get_dispute(the_dispute)
                current.remind(self.clock.now())
                return [current], dispute_result(current)

            return self._execute(f"remind_dispute:{the_dispute}", "remind_dispute", {"dispute_id": str(the_dispute)},
                                 the_dispute, remind)
        return None

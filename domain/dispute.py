"""The Dispute aggregate: a cardholder's chargeback of a captured payment, from the processor's
notice to its ruling, and the merchant's answer.

    needs_response -> under_review (evidence submitted) -> won | lost
    needs_response -> accepted (the merchant concedes) | expired (the due date passed unanswered)
    needs_response -> won | lost (the processor may rule without evidence)

The money is the payment's (domain/payment.py ``open_dispute`` / ``close_dispute``): at opening
the disputed amount and the dispute fee are held from the merchant; won returns the amount (and
the fee, by policy); lost, accepted and expired send them out. The id derives from the
processor and its dispute id, so the processor's notices about one dispute find one aggregate.

The merchant's evidence is free text about the customer (their messages, a delivery address in
a tracking note): it is recorded only sealed under the customer's data key (``personal``, from
the ``Seal`` the application gives), beside the names of the fields staged, so erasing the
customer erases it. The aggregate holds it sealed: the application opens what is staged.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import Aggregate, event

from domain.errors import DisputeClosed, InvalidField
from domain.money import check_amount, check_currency
from domain.values import Seal, check_text

REASONS = ("fraudulent", "product_not_received", "duplicate", "product_unacceptable", "subscription_canceled",
           "credit_not_processed", "unrecognized", "general")
# The text fields of the card networks' evidence objects (as processors' dispute APIs name them).
EVIDENCE_FIELDS = ("product_description", "customer_communication", "service_date", "shipping_carrier",
                   "shipping_tracking_number", "shipping_date", "refund_policy", "uncategorized_text")
MAX_EVIDENCE_CHARS = 20_000
# The fee the platform charges a merchant per dispute, in minor units per currency (the card
# networks' is about 15 of the major unit); currencies not listed pay the USD figure's count.
DISPUTE_FEE_MINOR = 1_500


class DisputeStatus:
    NEEDS_RESPONSE = "needs_response"
    UNDER_REVIEW = "under_review"
    WON = "won"
    LOST = "lost"
    ACCEPTED = "accepted"
    EXPIRED = "expired"


D = DisputeStatus
OPEN = (D.NEEDS_RESPONSE, D.UNDER_REVIEW)
CLOSED = (D.WON, D.LOST, D.ACCEPTED, D.EXPIRED)


def dispute_id(processor: str, processor_dispute_id: str) -> UUID:
    return uuid5(NAMESPACE_URL, f"echotransact:dispute:{processor}:{processor_dispute_id}")


def check_reason(reason: str) -> str:
    return reason if reason in REASONS else "general"


def check_evidence(evidence: Mapping[str, Any]) -> dict[str, str]:
    unknown = sorted(set(evidence) - set(EVIDENCE_FIELDS))
    if unknown:
        raise InvalidField(f"unknown evidence fields {', '.join(unknown)}; known: {', '.join(EVIDENCE_FIELDS)}",
                           field=unknown[0])
    checked = {k: check_text(k, v, max_length=MAX_EVIDENCE_CHARS) for k, v in evidence.items() if v is not None}
    return checked


class Dispute(Aggregate):
    class Opened(Aggregate.Created):
        merchant_id: UUID
        payment_id: UUID
        processor: str
        processor_dispute_id: str
        reason: str
        amount_minor: int
        currency: str
        fee_minor: int
        due_by: datetime

    class Updated(Aggregate.Event):
        """``change``: evidence_staged, evidence_submitted, due_soon (a reminder), fraud_warning.
        ``fields``: the names of the evidence fields staged so far, ``personal``: their text
        sealed under the customer's key, ``{"evidence": {...}}``; both None when the evidence did
        not change (v2; v1 carried ``evidence`` in plain text, read as ``{"plain": {...}}``)."""

        change: str
        fields: list[str] | None
        personal: dict[str, Any] | None
        at: datetime
        class_version = 2

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            evidence = state.pop("evidence")
            state["fields"] = None if evidence is None else sorted(evidence)
            state["personal"] = None if evidence is None else {"plain": {"evidence": evidence}}

    class Closed(Aggregate.Event):
        """``outcome``: won, lost, accepted, expired."""

        outcome: str
        at: datetime

    @classmethod
    def open(cls, *, merchant_id: UUID, payment_id: UUID, processor: str, processor_dispute_id: str, reason: str,
             amount_minor: int, currency: str, due_by: datetime, fee_minor: int = DISPUTE_FEE_MINOR) -> Dispute:
        check_currency(currency)
        check_amount(amount_minor, currency)
        return cls._create(
            cls.Opened, id=dispute_id(processor, processor_dispute_id), merchant_id=merchant_id,
            payment_id=payment_id, processor=check_text("processor", processor, max_length=50),
            processor_dispute_id=check_text("dispute_id", processor_dispute_id, max_length=100),
            reason=check_reason(reason), amount_minor=amount_minor, currency=currency, fee_minor=fee_minor,
            due_by=due_by,
        )

    @event(Opened)
    def __init__(self, *, merchant_id: UUID, payment_id: UUID, processor: str, processor_dispute_id: str,
                 reason: str, amount_minor: int, currency: str, fee_minor: int, due_by: datetime) -> None:
        self.merchant_id = merchant_id
        self.payment_id = payment_id
        self.processor = processor
        self.processor_dispute_id = processor_dispute_id
        self.reason = reason
        self.amount_minor = amount_minor
        self.currency = currency
        self.fee_minor = fee_minor
        self.due_by = due_by
        self.status = D.NEEDS_RESPONSE
        self.evidence_fields: tuple[str, ...] = ()
        self.evidence_personal: dict[str, Any] | None = None  # sealed; application/disputes.py opens it
        self.evidence_submitted_at: datetime | None = None
        self.reminded = False

    @property
    def is_open(self) -> bool:
        return self.status in OPEN

    def _require_open(self, command: str, *allowed: str) -> None:
        if self.status not in (allowed or OPEN):
            raise DisputeClosed(f"cannot {command}: the dispute is {self.status}", status=self.status)

    def stage_evidence(self, evidence: Mapping[str, Any], now: datetime, *, staged: Mapping[str, str],
                       seal: Seal) -> None:
        """``staged``: the evidence staged so far, opened by the application (empty once the
        customer is erased); ``seal``: seals the text under the customer's data key."""
        self._require_open("add evidence", D.NEEDS_RESPONSE)
        merged = {**staged, **check_evidence(evidence)}
        self._updated(change="evidence_staged", fields=sorted(merged), personal=seal({"evidence": merged}), at=now)

    def submit_evidence(self, evidence: Mapping[str, Any], now: datetime, *, staged: Mapping[str, str],
                        seal: Seal) -> dict[str, str]:
        """Stage ``evidence`` and submit everything staged (``staged``, as for ``stage_evidence``);
        returns what goes to the processor."""
        self._require_open("submit evidence", D.NEEDS_RESPONSE)
        if now >= self.due_by:
            raise DisputeClosed(f"the evidence was due by {self.due_by.isoformat()}", status="expired")
        merged = {**staged, **check_evidence(evidence)}
        if not merged:
            raise InvalidField("submit at least one evidence field", field="evidence")
        self._updated(change="evidence_submitted", fields=sorted(merged), personal=seal({"evidence": merged}), at=now)
        return merged

    def remind(self, now: datetime) -> None:
        if self.status == D.NEEDS_RESPONSE and not self.reminded:
            self._updated(change="due_soon", fields=None, personal=None, at=now)

    @event(Updated)
    def _updated(self, change: str, fields: list[str] | None, personal: dict[str, Any] | None,
                 at: datetime) -> None:
        if fields is not None:
            self.evidence_fields = tuple(fields)
            self.evidence_personal = personal
        if change == "evidence_submitted":
            self.status = D.UNDER_REVIEW
            self.evidence_submitted_at = at
        elif change == "due_soon":
            self.reminded = True

    def accept(self, now: datetime) -> None:
        self._require_open("accept the dispute", D.NEEDS_RESPONSE)
        self._closed(outcome=D.ACCEPTED, at=now)

    def expire(self, now: datetime) -> None:
        self._require_open("expire the dispute", D.NEEDS_RESPONSE)
        if now < self.due_by:
            raise DisputeClosed(f"the dispute is not due until {self.due_by.isoformat()}", status=self.status)
        self._closed(outcome=D.EXPIRED, at=now)

    def rule(self, outcome: str, now: datetime) -> bool:
        """The processor's ruling; False when the dispute had closed already (accepted, expired,
        or this ruling came before): nothing changes."""
        assert outcome in (D.WON, D.LOST), outcome
        if not self.is_open:
            return False
        self._closed(outcome=outcome, at=now)
        return True

    @event(Closed)
    def _closed(self, outcome: str, at: datetime) -> None:
        self.status = outcome

"""Use cases of the payment: authorize it (risk rules first, then the processor, with failover
when the chosen one provably got nothing), resolve an unknown outcome by asking, capture, void,
refund, expire the authorization, settle. Every processor call carries an idempotency key derived
from the payment (or refund), so a retry never moves money twice."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate

from application.errors import ProcessorRejected, ProcessorUnavailable
from application.ports import (
    Decision,
    Locks,
    PaymentProcessor,
    ProcessorOutcome,
    ProcessorRouter,
    VelocityCounter,
)
from application.privacy import PrivacyCommands
from application.unit_of_work import CommandResult, Known
from domain.payment import Payment, PaymentStatus
from domain.payment_session import PaymentSession
from domain.risk import assess as assess_risk


class PaymentCommands(PrivacyCommands):
    # Given by the composition root (through Ledger's constructor). Without locks, the
    # authorizations of one payment are not serialized across processes; without a velocity
    # counter, the risk rules cannot run and no payment is authorized.
    processors: ProcessorRouter
    velocity: VelocityCounter | None
    locks: Locks | None

    def _processor_of(self, payment: Payment) -> PaymentProcessor:
        assert payment.processor is not None, "only a payment sent for authorization has a processor"
        return self.processors.named(payment.processor)

    def authorize_payment(self, payment_id: UUID, *, cvv: str | None = None,
                          known: Sequence[Aggregate] = ()) -> CommandResult:
        """Send the payment for authorization and record the processor's answer.

        Three steps, so a crash anywhere is safe: (1) record ProcessingStarted; (2) ask the
        processor with an idempotency key derived from the payment, so asking again never
        charges twice; (3) record the outcome on the payment and its session together. An
        unknown outcome (timeout) records nothing and is settled by ``resolve_authorization``.
        ``known``: the payment and session as the command before saved them (``CommandResult.saved``),
        so the steps start from them instead of loading each again.
        """
        with self._payment_lock(payment_id):
            return self._authorize(payment_id, cvv, Known(known))

    def _payment_lock(self, payment_id: UUID) -> AbstractContextManager[None]:
        """One request at a time moves a payment's money (authorize, capture, void, refund), across
        processes: each decides on the payment as the previous one left it, so the ledger alone keeps
        captures and refunds within what was authorized and captured, before any processor hears of
        them. (The key keeps its first name, ``authorize:``, so processes of both versions exclude
        each other during a deploy.)"""
        return self.locks.hold(f"authorize:{payment_id}") if self.locks is not None else nullcontext()

    def _authorize(self, payment_id: UUID, cvv: str | None, given: Known | None = None) -> CommandResult:
        known = given if given is not None else Known()
        # A known copy may be older than the payment (another request got the lock first). It is
        # trusted only to go on to the start, where the command log replays a start already made
        # and a save on an old version loses and loads again; any other answer is the payment's now.
        payment = known.peek(Payment, payment_id)
        if payment is None or payment.status != PaymentStatus.INITIATED:
            payment = self.get_payment(payment_id)
        started_here = False
        if payment.status == PaymentStatus.INITIATED:
            started = self._execute(
                f"authorize:{payment_id}:start", "start_processing", {"payment_id": str(payment_id)},
                payment_id, lambda: self._start_processing(payment_id, known),
            )
            started_here = not started.replayed
            # As the command saved it (a replay saved nothing: load it).
            payment = started.saved_one(Payment, payment_id) or self.get_payment(payment_id)
            known = Known(started.saved)
        if payment.status != PaymentStatus.PROCESSING:
            return CommandResult(_payment_result(payment), None, replayed=True)
        outcome = _send_authorization(self._processor_of(payment), payment, cvv)
        if outcome.decision == Decision.UNKNOWN and not outcome.sent and started_here:
            # The chosen processor went down between the choice and the call, and provably got
            # nothing: failover now instead of leaving the customer waiting for it to return.
            # Only the call that started processing may do this, so no earlier call to the
            # first processor can be in flight with the same key.
            other = self.processors.alternative(payment.processor or "")
            if other is not None:
                self._execute(
                    f"authorize:{payment_id}:reroute", "reroute_processing",
                    {"payment_id": str(payment_id), "processor": other.name}, payment_id,
                    lambda: self._reroute(payment_id, other.name),
                )
                outcome = _send_authorization(other, payment, cvv)
                known = Known()
        return self._record_authorization(payment_id, outcome, known)

    def _reroute(self, payment_id: UUID, processor: str) -> tuple[Sequence[Aggregate], dict[str, Any]]:
        payment = self.get_payment(payment_id)
        payment.reroute(processor)
        return [payment], _payment_result(payment)

    def resolve_authorization(self, payment_id: UUID) -> CommandResult:
        """Settle an authorization whose outcome was unknown by asking, never by charging again."""
        with self._payment_lock(payment_id):
            payment = self.get_payment(payment_id)
            if payment.status != PaymentStatus.PROCESSING:
                return CommandResult(_payment_result(payment), None, replayed=True)
            outcome = self._processor_of(payment).status(idempotency_key=_authorization_key(payment_id))
            if outcome is None:
                # The processor never received it: asking with the same key is safe.
                return self._authorize(payment_id, None)
            return self._record_authorization(payment_id, outcome)

    def _start_processing(self, payment_id: UUID, known: Known) -> tuple[Sequence[Aggregate], dict[str, Any]]:
        """The risk rules, then (unless they decline) the processor is chosen and recorded."""
        payment = known.take(Payment, payment_id) or self.get_payment(payment_id)
        session = None
        if payment.session_id:
            session = known.take(PaymentSession, payment.session_id) or self.get_session(payment.session_id)
        changed: list[Aggregate] = [payment]
        if payment.risk_decision is None:
            self._assess_risk(payment, session)
            if payment.status == PaymentStatus.FAILED:
                if session is not None:
                    session.record_decline(payment_id, "risk_declined")
                    changed.append(session)
                return changed, _payment_result(payment)
        # Failover happens here, before anything is sent: the chosen processor is recorded, and
        # every later call about this payment goes to it.
        payment.start_processing(self.processors.select().name)
        return changed, _payment_result(payment)

    def _assess_risk(self, payment: Payment, session: PaymentSession | None) -> None:
        if self.velocity is None:
            raise ProcessorUnavailable("no velocity counter is configured; risk rules cannot run")
        policy = self.policy.risk
        keys = {"card": self.keyed_hash("velocity", "card", payment.card_fingerprint or payment.card_token)}
        customer_id = self._session_customer_id(session) if session is not None else None
        if customer_id is not None:  # counted by the customer's pseudonym, never by the phone
            keys["phone"] = self.keyed_hash("velocity", "customer", customer_id)
        counts = self.velocity.record_and_count(
            str(payment.id), self.clock.now(), policy.velocity_window_minutes * 60, keys
        )
        recent_by_phone, recent_by_card = counts.get("phone", 1), counts["card"]
        prior_declines = session.declines if session is not None else 0
        merchant = self.merchant_to_read(payment.merchant_id)
        verdict = assess_risk(
            payment.amount_minor, payment.currency, merchant.max_amount_minor.get(payment.currency),
            recent_by_phone, recent_by_card, prior_declines=prior_declines,
            large_amount_minor=self.policy.identity_thresholds_minor.get(payment.currency),
            policy=policy,
        )
        payment.assess_risk(verdict, recent_by_phone=recent_by_phone, recent_by_card=recent_by_card,
                            prior_declines=prior_declines)

    def _record_authorization(self, payment_id: UUID, outcome: ProcessorOutcome,
                              given: Known | None = None) -> CommandResult:
        if outcome.decision == Decision.UNKNOWN:
            raise ProcessorUnavailable(
                "the processor did not answer; the authorization will be resolved by asking it"
            )
        known = given if given is not None else Known()

        def decide() -> tuple[Sequence[Aggregate], dict[str, Any]]:
            payment = known.take(Payment, payment_id) or self.get_payment(payment_id)
            changed: list[Aggregate] = [payment]
            session = None
            if payment.session_id:
                session = known.take(PaymentSession, payment.session_id) or self.get_session(payment.session_id)
            if outcome.decision == Decision.APPROVED:
                payment.authorize(
                    processor=outcome.processor,
                    processor_reference=outcome.reference,
                    amount_minor=outcome.amount_minor or payment.amount_minor,
                    expires_at=outcome.expires_at
                    or self.clock.now() + self.policy.authorization_lifetime,
                )
                if session is not None:
                    session.complete(payment_id)
            else:
                payment.fail(outcome.reason_code or "declined", outcome.message)
                if session is not None:
                    session.record_decline(payment_id, outcome.reason_code or "declined")
            if session is not None:
                changed.append(session)
            return changed, _payment_result(payment)

        return self._execute(
            f"authorize:{payment_id}:outcome", "record_authorization",
            {"payment_id": str(payment_id), "decision": outcome.decision.value,
             "reference": outcome.reference},
            payment_id, decide,
        )

    def capture_payment(
        self, command_id: str, payment_id: UUID, *, amount_minor: int | None = None,
        merchant_id: UUID | None = None,
    ) -> CommandResult:
        def decide() -> tuple[Sequence[Aggregate], dict[str, Any]]:
            payment = self.get_payment(payment_id, merchant_id)
            amount = payment.check_capture(amount_minor, self.clock.now())
            assert payment.authorization_reference is not None
            outcome = self._processor_of(payment).capture(
                idempotency_key=f"capture:{payment_id}",
                authorization_reference=payment.authorization_reference,
                amount_minor=amount,
                currency=payment.currency,
            )
            _require_approved(outcome, "capture")
            payment.capture(amount_minor=amount, processor_reference=outcome.reference, now=self.clock.now())
            return [payment], _payment_result(payment)

        request = {"payment_id": str(payment_id), "amount_minor": amount_minor}
        with self._payment_lock(payment_id):
            return self._execute(command_id, "capture_payment", request, payment_id, decide)

    def void_payment(
        self, command_id: str, payment_id: UUID, *, reason: str = "requested_by_merchant",
        merchant_id: UUID | None = None,
    ) -> CommandResult:
        def decide() -> tuple[Sequence[Aggregate], dict[str, Any]]:
            payment = self.get_payment(payment_id, merchant_id)
            if payment.status != PaymentStatus.AUTHORIZED:
                payment.void(reason, seal=_never_called)  # raises the named InvalidTransition
            assert payment.authorization_reference is not None
            outcome = self._processor_of(payment).void(
                idempotency_key=f"void:{payment_id}",
                authorization_reference=payment.authorization_reference,
            )
            _require_approved(outcome, "void")
            # The reason may name the customer: sealed under their key (application/privacy.py).
            payment.void(reason, seal=self._seal_for_payment(payment))
            return [payment], _payment_result(payment)

        request = {"payment_id": str(payment_id), "reason": reason}
        with self._payment_lock(payment_id):
            return self._execute(command_id, "void_payment", request, payment_id, decide)

    def refund_payment(
        self, command_id: str, payment_id: UUID, *, amount_minor: int, reason: str = "",
        merchant_id: UUID | None = None,
    ) -> CommandResult:
        refund_id = self._derived_id(command_id, "refund").hex

        def decide() -> tuple[Sequence[Aggregate], dict[str, Any]]:
            payment = self.get_payment(payment_id, merchant_id)
            payment.check_refund(amount_minor)
            assert payment.authorization_reference is not None
            outcome = self._processor_of(payment).refund(
                idempotency_key=f"refund:{refund_id}",
                authorization_reference=payment.authorization_reference,
                amount_minor=amount_minor,
                currency=payment.currency,
            )
            _require_approved(outcome, "refund")
            payment.refund(
                refund_id=refund_id, amount_minor=amount_minor, reason=reason,
                processor_reference=outcome.reference,
                seal=self._seal_for_payment(payment),  # the reason may name the customer
            )
            return [payment], {**_payment_result(payment), "refund_id": refund_id}

        request = {"payment_id": str(payment_id), "amount_minor": amount_minor, "reason": reason}
        with self._payment_lock(payment_id):
            return self._execute(command_id, "refund_payment", request, payment_id, decide)

    def abandon_unstarted_payment(self, payment_id: UUID) -> CommandResult:
        """A payment whose card was attached but whose authorization never started (the request
        died between the two) fails with a reason, and its session takes the customer back to
        the card step: no processor heard of it, so nothing is charged, and nothing is left
        ``initiated`` for ever. A payment that has moved on meanwhile is left alone."""

        def decide() -> tuple[Sequence[Aggregate], dict[str, Any]]:
            payment = self.get_payment(payment_id)
            if payment.status != PaymentStatus.INITIATED:
                return [], _payment_result(payment)
            payment.fail(NOT_STARTED, "the authorization never started; the customer may pay again")
            changed: list[Aggregate] = [payment]
            session = self.get_session(payment.session_id) if payment.session_id else None
            if session is not None and session.payment_id == payment_id:
                session.record_decline(payment_id, NOT_STARTED)
                changed.append(session)
            return changed, _payment_result(payment)

        with self._payment_lock(payment_id):
            return self._execute(f"abandon:{payment_id}", "abandon_unstarted_payment",
                                 {"payment_id": str(payment_id)}, payment_id, decide)

    def expire_authorization(self, payment_id: UUID) -> CommandResult:
        def decide() -> tuple[Sequence[Aggregate], dict[str, Any]]:
            payment = self.get_payment(payment_id)
            payment.expire_authorization(self.clock.now())
            return [payment], _payment_result(payment)

        return self._execute(
            f"expire_authorization:{payment_id}", "expire_authorization",
            {"payment_id": str(payment_id)}, payment_id, decide,
        )

    def settle_payment(self, payment_id: UUID, settlement_reference: str) -> CommandResult:
        def decide() -> tuple[Sequence[Aggregate], dict[str, Any]]:
            payment = self.get_payment(payment_id)
            payment.settle(settlement_reference)
            return [payment], _payment_result(payment)

        return self._execute(
            f"settle:{payment_id}", "settle_payment",
            {"payment_id": str(payment_id), "settlement_reference": settlement_reference},
            payment_id, decide,
        )


NOT_STARTED = "authorization_not_started"


def _authorization_key(payment_id: UUID) -> str:
    """One key per payment for every authorization call and status question about it, whichever
    processor gets it: a processor that saw it answers the first outcome again."""
    return f"authorize:{payment_id}"


def _send_authorization(processor: PaymentProcessor, payment: Payment, cvv: str | None) -> ProcessorOutcome:
    """The one authorization request of a payment, the same for the chosen processor and for the
    one that takes over."""
    return processor.authorize(
        idempotency_key=_authorization_key(payment.id),
        amount_minor=payment.amount_minor,
        currency=payment.currency,
        card_token=payment.card_token,
        card_last4=payment.card_last4,
        merchant_id=str(payment.merchant_id),
        cvv=cvv,
    )


def _require_approved(outcome: ProcessorOutcome, action: str) -> None:
    if outcome.decision == Decision.UNKNOWN:
        raise ProcessorUnavailable(f"the processor did not answer the {action}; retry the request")
    if outcome.decision != Decision.APPROVED:
        raise ProcessorRejected(
            f"the processor refused the {action}: {outcome.reason_code} {outcome.message}".strip(),
            reason_code=outcome.reason_code,
        )


def _payment_result(payment: Payment) -> dict[str, Any]:
    return {"payment_id": str(payment.id), "status": payment.status, "version": payment.version}


def _never_called(data: dict[str, Any]) -> dict[str, Any]:
    """The seal of a void that can only be refused (the payment is not authorized)."""
    raise AssertionError("a refused void seals nothing")

"""The Payment aggregate: one card transaction and every money movement on it.

    initiated -> [risk assessed] -> processing -> authorized -> captured -> settled
    initiated -> [risk assessed: decline] -> failed (risk_declined)
    authorized -> voided | authorization_expired;  initiated/processing -> failed
    captured/settled -> refunded (when refunds reach the captured amount)

A capture is settled once, when the processor's report lists it (a fully refunded payment too:
the processor still settles the capture and the refund as two lines). Once settled, the
merchant's share is available and goes out in payouts: each payout includes what of the
payment it has not paid yet (gross, our fee, refunds), so no payout pays a line twice.

Invariants: captured <= authorized; refunded <= captured; every money movement event carries
postings that balance per currency; settled at most once; paid out never more than due.

The words a person gives for a void or a refund may name the customer: they are recorded only
sealed under the customer's data key (``personal``, from the ``Seal`` the application gives),
so erasing the customer erases them; the rest of the event stays readable.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

from eventsourcing.domain import Aggregate, event

from domain.errors import (
    AuthorizationLapsed,
    AuthorizationNotExpired,
    CaptureExceedsAuthorized,
    DisputeOpen,
    InvalidAmount,
    InvalidField,
    InvalidTransition,
    RefundExceedsCaptured,
    RiskNotAssessed,
    SplitsExceedCapture,
)
from domain.fx import FX_ACCOUNT, FxRate
from domain.ledger import (
    DISPUTE_FEES,
    DISPUTES_HELD,
    PLATFORM_PARTY,
    PROCESSOR_CLEARING,
    FeeSchedule,
    Posting,
    Split,
    balanced,
    capture_postings,
    check_splits,
    merchant_available,
    merchant_payable,
    refund_settlement_postings,
    settlement_postings,
    transfer,
)
from domain.money import check_amount, check_currency
from domain.risk import RiskDecision
from domain.values import Seal, check_text


class PaymentStatus:
    INITIATED = "initiated"
    PROCESSING = "processing"
    AUTHORIZED = "authorized"
    CAPTURED = "captured"
    SETTLED = "settled"
    VOIDED = "voided"
    AUTHORIZATION_EXPIRED = "authorization_expired"
    FAILED = "failed"
    REFUNDED = "refunded"


P = PaymentStatus
REFUNDABLE = (P.CAPTURED, P.SETTLED)


def _plain_text(reason: str) -> dict[str, Any] | None:
    """A reason recorded in plain text before sealing existed, as ``personal`` reads it."""
    return {"plain": {"reason": reason}} if reason else None


def _postings(postings: tuple[Posting, ...]) -> list[dict[str, Any]]:
    return [p.as_dict() for p in postings]


class Payment(Aggregate):
    if TYPE_CHECKING:
        # Their types, for mypy only: class annotations at run time would make eventsourcing
        # process the aggregate as a dataclass.
        card_fingerprint: str | None
        risk_score: int | None
        risk_decision: str | None
        settled: bool
        processor_fee_minor: int
        paid_out_gross_minor: int
        paid_out_fee_minor: int
        paid_out_refunds_minor: int
        payout_ids: tuple[str, ...]
        refund_amounts: dict[str, int]
        settled_refund_references: tuple[str, ...]
        splits: list[dict[str, Any]]
        shares: list[dict[str, Any]]
        paid_out_shares_minor: int
        partner_paid_out: dict[str, int]
        fx: dict[str, Any] | None
        dispute_moves: dict[str, list[int]]
        open_disputes: tuple[str, ...]
        paid_out_disputes_minor: int

    # Defaults for state added after the first release: a snapshot taken before it lacks them.
    card_fingerprint = None
    risk_score = None
    risk_decision = None
    settled = False
    processor_fee_minor = 0
    paid_out_gross_minor = 0
    paid_out_fee_minor = 0
    paid_out_refunds_minor = 0
    payout_ids = ()
    refund_amounts = {}  # type: ignore[var-annotated]  # noqa: RUF012 - replaced, never changed in place
    settled_refund_references = ()
    splits = ()  # type: ignore[assignment]
    shares = ()  # type: ignore[assignment]
    paid_out_shares_minor = 0
    fx = None
    dispute_moves = {}  # type: ignore[var-annotated]  # noqa: RUF012 - replaced, never changed in place
    open_disputes = ()
    paid_out_disputes_minor = 0
    fraud_warned = False
    partner_paid_out = {}  # type: ignore[var-annotated]  # noqa: RUF012 - replaced, never changed in place

    class Initiated(Aggregate.Created):
        merchant_id: UUID
        session_id: UUID | None
        amount_minor: int
        currency: str
        card_token: str
        card_brand: str
        card_last4: str
        fee_percent_bps: int
        fee_fixed_minor: int
        # A keyed hash of the card number from the vault (stable across tokenizations), for
        # card velocity; None when the card came without one.
        card_fingerprint: str | None
        # The session's splits (domain/ledger.py Split.as_dict): shares for the platform and
        # partner merchants, taken at capture.
        splits: list[dict[str, Any]]
        class_version = 3

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["card_fingerprint"] = None

        @staticmethod
        def upcast_v2_v3(state: dict[str, Any]) -> None:
            state["splits"] = []

    class RiskAssessed(Aggregate.Event):
        """The risk rules' verdict before authorization, with the counts they were given, so
        the decision can be explained (and re-derived) from the event alone."""

        score: int
        decision: str
        reasons: list[str]
        recent_by_phone: int
        recent_by_card: int
        prior_declines: int

    class ProcessingStarted(Aggregate.Event):
        processor: str

    class ProcessingRerouted(Aggregate.Event):
        """The chosen processor was unreachable and provably never got the authorization, so it
        went to the other one (same idempotency key)."""

        processor: str
        previous: str

    class Authorized(Aggregate.Event):
        processor: str
        processor_reference: str
        amount_minor: int
        expires_at: datetime

    class Failed(Aggregate.Event):
        reason_code: str
        message: str

    class Captured(Aggregate.Event):
        amount_minor: int
        fee_minor: int
        processor_reference: str
        # What the splits took of this capture: [{"party", "amount_minor"}] (v2; v1 took none).
        shares: list[dict[str, Any]]
        postings: list[dict[str, Any]]
        class_version = 2

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["shares"] = []

    class Voided(Aggregate.Event):
        """``personal``: the reason given, sealed under the customer's key (v2; v1 carried
        ``reason`` in plain text, read as ``{"plain": {"reason": ...}}``)."""

        personal: dict[str, Any] | None
        class_version = 2

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["personal"] = _plain_text(state.pop("reason", ""))

    class AuthorizationExpired(Aggregate.Event):
        pass

    class Refunded(Aggregate.Event):
        """``personal``: the reason given, sealed under the customer's key; None when none was
        given (v2; v1 carried ``reason`` in plain text, read as ``{"plain": {"reason": ...}}``)."""

        refund_id: str
        amount_minor: int
        personal: dict[str, Any] | None
        processor_reference: str
        refunded_total_minor: int
        postings: list[dict[str, Any]]
        class_version = 2

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["personal"] = _plain_text(state.pop("reason", ""))

    class Settled(Aggregate.Event):
        """The processor's report listed the capture: ``amount_minor`` is the gross it settled,
        ``processor_fee_minor`` what it kept, ``merchant_share_minor`` what became available
        to the merchant (captured less our fee, the splits and refunds so far). ``fx``: for a
        merchant that settles in another currency, the rate used (domain/fx.py FxRate) and
        ``share_minor``, the share in that currency; None otherwise."""

        settlement_reference: str
        amount_minor: int
        processor_fee_minor: int
        merchant_share_minor: int
        fx: dict[str, Any] | None
        postings: list[dict[str, Any]]
        class_version = 3

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            # Version 1 settled the net of refunds and moved nothing of the merchant's.
            state["processor_fee_minor"] = 0
            state["merchant_share_minor"] = 0

        @staticmethod
        def upcast_v2_v3(state: dict[str, Any]) -> None:
            state["fx"] = None

    class RefundSettled(Aggregate.Event):
        """The processor's report listed a refund: it took the refund (and ``processor_fee_minor``
        on it) out of a deposit."""

        processor_reference: str
        amount_minor: int
        processor_fee_minor: int
        settlement_reference: str
        postings: list[dict[str, Any]]

    class FraudWarned(Aggregate.Event):
        """The processor's early fraud warning: the card's issuer reported this payment as
        fraud; a dispute may follow (refunding now usually prevents it)."""

        processor_event_id: str
        reason: str

    class DisputeOpened(Aggregate.Event):
        """A dispute (domain/dispute.py) holds ``amount_minor`` and the dispute fee from the
        merchant's money (pending before settlement, available after) in the held-disputes account."""

        dispute_id: str
        amount_minor: int
        fee_minor: int
        postings: list[dict[str, Any]]

    class DisputeClosed(Aggregate.Event):
        """Won: ``returned_minor`` goes back to the merchant, the rest of the fee is ours. Lost,
        accepted or expired: the amount goes back to the processor (clearing), the fee is ours."""

        dispute_id: str
        outcome: str
        returned_minor: int
        postings: list[dict[str, Any]]

    class IncludedInPayout(Aggregate.Event):
        """A payout paid what was due of this payment to ``party`` (None: the payment's merchant):
        its gross, less our fee, the splits' shares and refunds, each net of what earlier payouts
        paid; to a partner, its share (as ``gross_minor``)."""

        payout_id: str
        party: str | None
        gross_minor: int
        fee_minor: int
        shares_minor: int
        refunds_minor: int
        disputes_minor: int
        class_version = 3

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["party"] = None
            state["shares_minor"] = 0

        @staticmethod
        def upcast_v2_v3(state: dict[str, Any]) -> None:
            state["disputes_minor"] = 0

    @classmethod
    def initiate(
        cls,
        payment_id: UUID,
        *,
        merchant_id: UUID,
        session_id: UUID | None,
        amount_minor: int,
        currency: str,
        card_token: str,
        card_brand: str,
        card_last4: str,
        fee_schedule: FeeSchedule,
        card_fingerprint: str | None = None,
        splits: Sequence[Split] = (),
    ) -> Payment:
        check_currency(currency)
        check_amount(amount_minor, currency)
        checked = check_splits(splits, amount_minor, merchant_id)
        return cls._create(
            cls.Initiated,
            id=payment_id,
            merchant_id=merchant_id,
            session_id=session_id,
            amount_minor=amount_minor,
            currency=currency,
            card_token=check_text("card_token", card_token, max_length=64),
            card_brand=card_brand,
            card_last4=card_last4,
            fee_percent_bps=fee_schedule.percent_bps,
            fee_fixed_minor=fee_schedule.fixed_minor,
            card_fingerprint=(None if card_fingerprint is None
                              else check_text("card_fingerprint", card_fingerprint, max_length=100)),
            splits=[s.as_dict() for s in checked],
        )

    @event(Initiated)
    def __init__(
        self,
        *,
        merchant_id: UUID,
        session_id: UUID | None,
        amount_minor: int,
        currency: str,
        card_token: str,
        card_brand: str,
        card_last4: str,
        fee_percent_bps: int,
        fee_fixed_minor: int,
        card_fingerprint: str | None,
        splits: list[dict[str, Any]],
    ) -> None:
        self.merchant_id = merchant_id
        self.splits = splits
        self.card_fingerprint = card_fingerprint
        self.session_id = session_id
        self.amount_minor = amount_minor
        self.currency = currency
        self.card_token = card_token
        self.card_brand = card_brand
        self.card_last4 = card_last4
        self.fee_percent_bps = fee_percent_bps
        self.fee_fixed_minor = fee_fixed_minor
        self.status = P.INITIATED
        self.processor: str | None = None
        self.authorization_reference: str | None = None
        self.authorization_expires_at: datetime | None = None
        self.authorized_minor = 0
        self.captured_minor = 0
        self.capture_reference: str | None = None
        self.fee_minor = 0
        self.refunded_minor = 0
        self.settled_minor = 0
        self.refund_ids: list[str] = []
        self.failure_code: str | None = None
        self.risk_score = None
        self.risk_decision = None

    def _require(self, command: str, *allowed: str) -> None:
        if self.status not in allowed:
            raise InvalidTransition("payment", command, self.status)

    @property
    def fee_schedule(self) -> FeeSchedule:
        return FeeSchedule(self.fee_percent_bps, self.fee_fixed_minor)

    @property
    def refundable_minor(self) -> int:
        return self.captured_minor - self.refunded_minor

    # -- authorization ----------------------------------------------------------------------

    def assess_risk(
        self, verdict: RiskDecision, *, recent_by_phone: int, recent_by_card: int, prior_declines: int
    ) -> None:
        """Record the risk rules' verdict; a decline fails the payment before any processor
        hears of it."""
        self._require("assess the risk of", P.INITIATED)
        if self.risk_decision is not None:
            raise InvalidTransition("payment", "assess the risk of", "risk_assessed")
        self._risk_assessed(
            score=verdict.score, decision=verdict.decision, reasons=list(verdict.reasons),
            recent_by_phone=recent_by_phone, recent_by_card=recent_by_card, prior_declines=prior_declines,
        )
        if not verdict.allowed:
            self.fail("risk_declined", "declined by risk rules: " + ", ".join(verdict.reasons))

    @event(RiskAssessed)
    def _risk_assessed(
        self, score: int, decision: str, reasons: list[str], recent_by_phone: int, recent_by_card: int,
        prior_declines: int,
    ) -> None:
        self.risk_score = score
        self.risk_decision = decision

    def start_processing(self, processor: str) -> None:
        self._require("send for authorization", P.INITIATED)
        if self.risk_decision is None:
            raise RiskNotAssessed("a payment is sent for authorization only after the risk rules")
        self._processing_started(processor=check_text("processor", processor, max_length=50))

    @event(ProcessingStarted)
    def _processing_started(self, processor: str) -> None:
        self.processor = processor
        self.status = P.PROCESSING

    def reroute(self, processor: str) -> None:
        self._require("reroute", P.PROCESSING)
        assert self.processor is not None
        if processor == self.processor:
            raise InvalidField(f"the payment is already with processor {processor}", field="processor")
        self._processing_rerouted(processor=check_text("processor", processor, max_length=50),
                                  previous=self.processor)

    @event(ProcessingRerouted)
    def _processing_rerouted(self, processor: str, previous: str) -> None:
        self.processor = processor

    def authorize(
        self, *, processor: str, processor_reference: str, amount_minor: int, expires_at: datetime
    ) -> None:
        self._require("authorize", P.PROCESSING)
        check_amount(amount_minor, self.currency)
        if amount_minor > self.amount_minor:
            raise InvalidAmount(
                f"processor authorized {amount_minor}, more than the {self.amount_minor} asked"
            )
        self._authorized(
            processor=processor,
            processor_reference=check_text("processor_reference", processor_reference, max_length=100),
            amount_minor=amount_minor,
            expires_at=expires_at,
        )

    @event(Authorized)
    def _authorized(
        self, processor: str, processor_reference: str, amount_minor: int, expires_at: datetime
    ) -> None:
        self.processor = processor
        self.authorization_reference = processor_reference
        self.authorized_minor = amount_minor
        self.authorization_expires_at = expires_at
        self.status = P.AUTHORIZED

    def fail(self, reason_code: str, message: str) -> None:
        self._require("fail", P.INITIATED, P.PROCESSING)
        self._failed(
            reason_code=check_text("reason_code", reason_code, max_length=50),
            message=check_text("message", message, max_length=500, required=False),
        )

    @event(Failed)
    def _failed(self, reason_code: str, message: str) -> None:
        self.failure_code = reason_code
        self.status = P.FAILED

    # -- after authorization ----------------------------------------------------------------

    def check_capture(self, amount_minor: int | None, now: datetime) -> int:
        """The checks of ``capture`` that come before asking the processor; returns the amount."""
        self._require("capture", P.AUTHORIZED)
        assert self.authorization_expires_at is not None
        if now >= self.authorization_expires_at:
            raise AuthorizationLapsed(
                f"the authorization lapsed at {self.authorization_expires_at.isoformat()}; it cannot be captured"
            )
        amount = self.authorized_minor if amount_minor is None else amount_minor
        check_amount(amount, self.currency)
        if amount > self.authorized_minor:
            raise CaptureExceedsAuthorized(
                f"cannot capture {amount}: only {self.authorized_minor} is authorized",
                authorized=self.authorized_minor,
            )
        taken = self.fee_schedule.fee_for(amount) + sum(share for _, share in self._shares_of(amount))
        if taken > amount:
            raise SplitsExceedCapture(f"capturing {amount}: our fee and the splits' shares would take {taken}")
        return amount

    def _shares_of(self, captured_minor: int) -> list[tuple[str, int]]:
        return [(s.party, s.share_of(captured_minor)) for s in map(Split.from_dict, self.splits)]

    def capture(self, *, amount_minor: int | None, processor_reference: str, now: datetime) -> None:
        """One capture of all or part of the authorization; the rest is released."""
        amount = self.check_capture(amount_minor, now)
        fee = self.fee_schedule.fee_for(amount)
        shares = [(party, share) for party, share in self._shares_of(amount) if share]
        self._captured(
            amount_minor=amount,
            fee_minor=fee,
            processor_reference=check_text("processor_reference", processor_reference, max_length=100),
            shares=[{"party": party, "amount_minor": share} for party, share in shares],
            postings=_postings(capture_postings(self.merchant_id, amount, fee, self.currency, shares)),
        )

    @event(Captured)
    def _captured(
        self, amount_minor: int, fee_minor: int, processor_reference: str, shares: list[dict[str, Any]],
        postings: list[dict[str, Any]],
    ) -> None:
        self.captured_minor = amount_minor
        self.fee_minor = fee_minor
        self.shares = shares
        self.capture_reference = processor_reference  # the processor's, as its settlement report lists it
        self.status = P.CAPTURED

    def void(self, reason: str, *, seal: Seal) -> None:
        """``seal``: seals the reason under the customer's data key (it may name them)."""
        self._require("void", P.AUTHORIZED)
        self._voided(personal=seal({"reason": check_text("reason", reason, max_length=200)}))

    @event(Voided)
    def _voided(self, personal: dict[str, Any] | None) -> None:
        self.status = P.VOIDED

    def expire_authorization(self, now: datetime) -> None:
        self._require("expire the authorization of", P.AUTHORIZED)
        assert self.authorization_expires_at is not None
        if now < self.authorization_expires_at:
            raise AuthorizationNotExpired(
                f"the authorization is valid until {self.authorization_expires_at.isoformat()}"
            )
        self._authorization_expired()

    @event(AuthorizationExpired)
    def _authorization_expired(self) -> None:
        self.status = P.AUTHORIZATION_EXPIRED

    # -- refunds and settlement ---------------------------------------------------------------

    def check_refund(self, amount_minor: int) -> None:
        """The checks of ``refund`` that do not need the processor's answer, so the
        application can reject before calling the processor."""
        self._require("refund", *REFUNDABLE)
        if self.open_disputes:
            raise DisputeOpen(f"dispute {self.open_disputes[0]} is open on this payment: no refund until it is decided")
        check_amount(amount_minor, self.currency)
        if amount_minor > self.refundable_minor:
            raise RefundExceedsCaptured(
                f"cannot refund {amount_minor}: {self.refundable_minor} of "
                f"{self.captured_minor} captured is left to refund",
                refundable=self.refundable_minor,
            )

    def refund(self, *, refund_id: str, amount_minor: int, reason: str, processor_reference: str,
               seal: Seal) -> None:
        """``seal``: seals the reason, if any, under the customer's data key (it may name them)."""
        if refund_id in self.refund_ids:
            raise InvalidField(f"refund {refund_id} was already recorded", field="refund_id")
        self.check_refund(amount_minor)
        words = check_text("reason", reason, max_length=200, required=False)
        self._refunded(
            refund_id=check_text("refund_id", refund_id, max_length=64),
            amount_minor=amount_minor,
            personal=seal({"reason": words}) if words else None,
            processor_reference=check_text("processor_reference", processor_reference, max_length=100),
            refunded_total_minor=self.refunded_minor + amount_minor,
            postings=_postings(self._refund_postings(amount_minor)),
        )

    @event(Refunded)
    def _refunded(
        self,
        refund_id: str,
        amount_minor: int,
        personal: dict[str, Any] | None,
        processor_reference: str,
        refunded_total_minor: int,
        postings: list[dict[str, Any]],
    ) -> None:
        self.refund_ids.append(refund_id)
        # By the processor's reference, as its settlement report lists them (copied, never changed
        # in place: the class default is shared).
        self.refund_amounts = {**self.refund_amounts, processor_reference: amount_minor}
        self.refunded_minor = refunded_total_minor
        if self.refunded_minor == self.captured_minor:
            self.status = P.REFUNDED

    @property
    def can_settle(self) -> bool:
        """Captured (perhaps refunded since) and not settled yet."""
        return self.captured_minor > 0 and not self.settled and self.status in (P.CAPTURED, P.REFUNDED)

    @property
    def shares_minor(self) -> int:
        """What the splits took of the capture."""
        return sum(share["amount_minor"] for share in self.shares)

    def partner_shares(self) -> list[tuple[str, int]]:
        return [(share["party"], share["amount_minor"]) for share in self.shares
                if share["party"] != PLATFORM_PARTY]

    def settle(self, settlement_reference: str, processor_fee_minor: int = 0, fx: FxRate | None = None) -> None:
        """The processor settled the capture's gross, keeping ``processor_fee_minor``. ``fx``:
        the merchant settles in ``fx.to_currency``: its share is converted at that rate."""
        if not self.can_settle:
            raise InvalidTransition("payment", "settle", "settled" if self.settled else self.status)
        if not isinstance(processor_fee_minor, int) or processor_fee_minor < 0:
            raise InvalidAmount(f"a processor fee must be a non-negative integer, got {processor_fee_minor!r}")
        if fx is not None and fx.from_currency != self.currency:
            raise InvalidField(f"a rate from {fx.from_currency} cannot convert a {self.currency} payment", field="fx")
        share = (self.captured_minor - self.fee_minor - self.shares_minor - self.refunded_minor
                 - self._dispute_debits())
        converting = fx is not None and fx.to_currency != self.currency
        postings = settlement_postings(self.merchant_id, self.captured_minor, processor_fee_minor,
                                       0 if converting else share, self.currency, self.partner_shares())
        converted = None
        if fx is not None and converting:
            # Converted part by part, so that later payouts and refunds at the same rate add up;
            # pending leaves in the payment's currency, available arrives in the merchant's.
            converted_share = (fx.convert(self.captured_minor) - fx.convert(self.fee_minor)
                               - fx.convert(self.shares_minor) - sum(map(fx.convert, self.refund_amounts.values()))
                               - self._dispute_debits(fx))
            postings = balanced((
                *postings,
                *transfer(merchant_payable(self.merchant_id), FX_ACCOUNT, share, self.currency),
                *transfer(FX_ACCOUNT, merchant_available(self.merchant_id), converted_share, fx.to_currency),
            ))
            converted = {**fx.as_dict(), "share_minor": converted_share}
        self._settled(
            settlement_reference=check_text("settlement_reference", settlement_reference, max_length=100),
            amount_minor=self.captured_minor,
            processor_fee_minor=processor_fee_minor,
            merchant_share_minor=share,
            fx=converted,
            postings=_postings(postings),
        )

    @event(Settled)
    def _settled(self, settlement_reference: str, amount_minor: int, processor_fee_minor: int,
                 merchant_share_minor: int, fx: dict[str, Any] | None, postings: list[dict[str, Any]]) -> None:
        self.settled_minor = amount_minor
        self.settled = True
        self.fx = fx
        self.processor_fee_minor = processor_fee_minor
        if self.status == P.CAPTURED:
            self.status = P.SETTLED

    def can_settle_refund(self, processor_reference: str) -> bool:
        return (processor_reference in self.refund_amounts
                and processor_reference not in self.settled_refund_references)

    def settle_refund(self, processor_reference: str, settlement_reference: str, processor_fee_minor: int = 0) -> None:
        """The processor's report listed the refund ``processor_reference``: settle it once."""
        if not self.can_settle_refund(processor_reference):
            raise InvalidTransition("payment", f"settle refund {processor_reference}",
                                    "settled" if processor_reference in self.settled_refund_references
                                    else "without that refund")
        if not isinstance(processor_fee_minor, int) or processor_fee_minor < 0:
            raise InvalidAmount(f"a processor fee must be a non-negative integer, got {processor_fee_minor!r}")
        amount = self.refund_amounts[processor_reference]
        self._refund_settled(
            processor_reference=processor_reference, amount_minor=amount, processor_fee_minor=processor_fee_minor,
            settlement_reference=check_text("settlement_reference", settlement_reference, max_length=100),
            postings=_postings(refund_settlement_postings(amount, processor_fee_minor, self.currency)),
        )

    @event(RefundSettled)
    def _refund_settled(self, processor_reference: str, amount_minor: int, processor_fee_minor: int,
                        settlement_reference: str, postings: list[dict[str, Any]]) -> None:
        self.settled_refund_references = (*self.settled_refund_references, processor_reference)

    # -- payouts ----------------------------------------------------------------------------

    @property
    def _fx_rate(self) -> FxRate | None:
        return None if self.fx is None else FxRate.from_dict(self.fx)

    @property
    def payout_currency(self) -> str:
        """The currency the merchant is paid this payment's money in."""
        return self.currency if self.fx is None else str(self.fx["to_currency"])

    def _refund_postings(self, amount_minor: int) -> tuple[Posting, ...]:
        """A refund comes out of the merchant's money, back to clearing."""
        return self._from_merchant(amount_minor, PROCESSOR_CLEARING)

    def _from_merchant(self, amount_minor: int, account: str) -> tuple[Posting, ...]:
        """Move ``amount_minor`` (the payment's currency; negative gives back) from the merchant's
        money to ``account``: pending before the settlement, available after; for a merchant that
        settles in another currency, its money there, converted at the settlement's rate through
        the exchange account."""
        if not self.settled:
            return balanced(transfer(merchant_payable(self.merchant_id), account, amount_minor, self.currency))
        rate = self._fx_rate
        if rate is None:
            return balanced(transfer(merchant_available(self.merchant_id), account, amount_minor, self.currency))
        return balanced((
            *transfer(FX_ACCOUNT, account, amount_minor, self.currency),
            *transfer(merchant_available(self.merchant_id), FX_ACCOUNT, rate.convert(amount_minor), rate.to_currency),
        ))

    # -- disputes -----------------------------------------------------------------------------

    def warn_of_fraud(self, processor_event_id: str, reason: str) -> None:
        self._fraud_warned(processor_event_id=check_text("processor_event_id", processor_event_id, max_length=100),
                           reason=check_text("reason", reason, max_length=100))

    @event(FraudWarned)
    def _fraud_warned(self, processor_event_id: str, reason: str) -> None:
        self.fraud_warned = True

    def _dispute_debits(self, rate: FxRate | None = None) -> int:
        """What disputes hold or took from the merchant now (converted move by move)."""
        moves = [move for history in self.dispute_moves.values() for move in history]
        return sum(map(rate.convert, moves)) if rate is not None else sum(moves)

    def open_dispute(self, dispute_id: str, amount_minor: int, fee_minor: int) -> None:
        if self.captured_minor == 0:
            raise InvalidTransition("payment", "dispute", self.status)
        if dispute_id in self.dispute_moves:
            return  # opened before: nothing more to hold
        check_amount(amount_minor, self.currency)
        if amount_minor > self.captured_minor:
            raise InvalidAmount(f"a dispute of {amount_minor} is more than the {self.captured_minor} captured")
        self._dispute_opened(dispute_id=dispute_id, amount_minor=amount_minor, fee_minor=fee_minor,
                             postings=_postings(self._from_merchant(amount_minor + fee_minor, DISPUTES_HELD)))

    @event(DisputeOpened)
    def _dispute_opened(self, dispute_id: str, amount_minor: int, fee_minor: int,
                        postings: list[dict[str, Any]]) -> None:
        self.dispute_moves = {**self.dispute_moves, dispute_id: [amount_minor + fee_minor]}
        self.open_disputes = (*self.open_disputes, dispute_id)

    def close_dispute(self, dispute_id: str, outcome: str, *, amount_minor: int, fee_minor: int,
                      fee_returned_on_win: bool = False) -> None:
        """Won: the amount (and the fee, by policy) back to the merchant. Otherwise the amount to
        the processor and the fee to us. Closing a closed dispute does nothing."""
        if dispute_id not in self.open_disputes:
            return
        returned = (amount_minor + (fee_minor if fee_returned_on_win else 0)) if outcome == "won" else 0
        kept_fee = 0 if (outcome == "won" and fee_returned_on_win) else fee_minor
        postings = [*self._from_merchant(-returned, DISPUTES_HELD),
                    *transfer(DISPUTES_HELD, DISPUTE_FEES, kept_fee, self.currency)]
        if outcome != "won":
            postings += transfer(DISPUTES_HELD, PROCESSOR_CLEARING, amount_minor, self.currency)
        self._dispute_closed(dispute_id=dispute_id, outcome=outcome, returned_minor=returned,
                             postings=_postings(balanced(postings)))

    @event(DisputeClosed)
    def _dispute_closed(self, dispute_id: str, outcome: str, returned_minor: int,
                        postings: list[dict[str, Any]]) -> None:
        if returned_minor:
            self.dispute_moves = {**self.dispute_moves,
                                  dispute_id: [*self.dispute_moves.get(dispute_id, []), -returned_minor]}
        self.open_disputes = tuple(d for d in self.open_disputes if d != dispute_id)

    def payout_due(self, party: str | None = None) -> tuple[int, int, int, int, int]:
        """What no payout has paid yet of this settled payment to ``party`` (None or the
        merchant's id: the merchant; a partner's id: its share): (gross, our fee, the splits'
        shares, refunds, what disputes hold or took). A partner's share is its gross."""
        if not self.settled:
            return 0, 0, 0, 0, 0
        if party is None or party == str(self.merchant_id):
            rate = self._fx_rate  # in the settlement currency, each part converted on its own
            gross, fee, shares, refunds = (
                (self.captured_minor, self.fee_minor, self.shares_minor, self.refunded_minor) if rate is None
                else (rate.convert(self.captured_minor), rate.convert(self.fee_minor), rate.convert(self.shares_minor),
                      sum(map(rate.convert, self.refund_amounts.values()))))
            return (gross - self.paid_out_gross_minor, fee - self.paid_out_fee_minor,
                    shares - self.paid_out_shares_minor, refunds - self.paid_out_refunds_minor,
                    self._dispute_debits(rate) - self.paid_out_disputes_minor)
        owed = sum(amount for partner, amount in self.partner_shares() if partner == party)
        return owed - self.partner_paid_out.get(party, 0), 0, 0, 0, 0

    def include_in_payout(self, payout_id: str, party: str | None = None) -> tuple[int, int, int, int, int]:
        """Record that ``payout_id`` pays ``party`` what is due to it; returns it. Nothing due:
        nothing recorded."""
        due = self.payout_due(party)
        if any(due):
            if payout_id in self.payout_ids:
                raise InvalidTransition("payment", "include_in_payout", f"already in payout {payout_id}")
            gross, fee, shares, refunds, disputes = due
            partner = None if party is None or party == str(self.merchant_id) else party
            self._included_in_payout(payout_id=payout_id, party=partner, gross_minor=gross, fee_minor=fee,
                                     shares_minor=shares, refunds_minor=refunds, disputes_minor=disputes)
        return due

    @event(IncludedInPayout)
    def _included_in_payout(self, payout_id: str, party: str | None, gross_minor: int, fee_minor: int,
                            shares_minor: int, refunds_minor: int, disputes_minor: int) -> None:
        if party is None:
            self.paid_out_disputes_minor += disputes_minor
            self.paid_out_gross_minor += gross_minor
            self.paid_out_fee_minor += fee_minor
            self.paid_out_shares_minor += shares_minor
            self.paid_out_refunds_minor += refunds_minor
        else:
            self.partner_paid_out = {**self.partner_paid_out, party: self.partner_paid_out.get(party, 0) + gross_minor}
        self.payout_ids = (*self.payout_ids, payout_id)

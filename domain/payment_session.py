"""The PaymentSession aggregate: the voice-to-mobile journey from an order taken in
conversation to a payment method attached and the payment completed.

    awaiting_customer -> link_sent -> link_opened -> code_verified
        -> [identity_verified, when the amount is above the currency's threshold and the
            customer has no recent check on file (identity_recognized, recorded at opening)]
        -> payment_method_attached -> completed
    and the ends: expired, cancelled, failed, locked (too many wrong codes).

No event holds a one-time code or link token in plain text (only keyed hashes computed by the
application) and no card number (only token, brand and last four digits). Personal data (the
customer's phone, the merchant's free-text metadata, where the page was opened from) is recorded
only sealed under the customer's data key (``personal``, from the ``Seal`` the application
gives), beside the customer's pseudonymous id: destroying the key erases it, the rest of the
event stays readable.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from datetime import datetime
from enum import StrEnum
from types import MappingProxyType
from typing import TYPE_CHECKING, Any
from uuid import UUID

from eventsourcing.domain import Aggregate, event

from domain.errors import (
    IdentityCheckNotRequired,
    IdentityCheckRequired,
    InvalidField,
    InvalidPaymentMethod,
    InvalidTransition,
    LinkExpired,
    LinkNotExpired,
    ResendLimitReached,
    SessionLocked,
)
from domain.ledger import Split, check_splits
from domain.money import CURRENCY_EXPONENTS, check_amount, check_currency
from domain.values import Seal, check_line_items, check_phone, check_text, check_url

MAX_CODE_ATTEMPTS = 5
MAX_CODE_RESENDS = 3
MAX_IDENTITY_ATTEMPTS = 3
MAX_DECLINES = 3
CARD_BRANDS = ("visa", "mastercard", "amex", "discover", "jcb", "diners", "unionpay", "unknown")
MAX_METADATA_KEYS = 20
# A cancelled session's ``end_reason`` on the aggregate: the reason given is sealed in the event.
CANCELLED_REASON = "cancelled"

# Above these amounts (major units) a customer must pass an identity check. USD 100.00 is the
# product's rule; the others are set near that value and are configuration, not law. The one
# table: the application's policy and the settings start from it.
DEFAULT_IDENTITY_THRESHOLDS_MAJOR: Mapping[str, int] = MappingProxyType(
    {"USD": 100, "EUR": 100, "GBP": 80, "CAD": 135, "AUD": 150, "NZD": 165, "CHF": 90,
     "SEK": 1_000, "NOK": 1_000, "DKK": 700, "MXN": 1_700, "INR": 8_300, "SGD": 135,
     "JPY": 15_000, "KRW": 135_000, "KWD": 30, "BHD": 38}
)


def default_identity_thresholds_minor() -> dict[str, int]:
    """The thresholds in minor units, for every currency we accept (100 major units where the
    table names none); a new dict each call, so a caller may change its copy."""
    return {
        currency: DEFAULT_IDENTITY_THRESHOLDS_MAJOR.get(currency, 100) * 10**exp
        for currency, exp in CURRENCY_EXPONENTS.items()
    }


class SessionStatus:
    """Plain string constants, so a snapshot's state round-trips as the same values."""

    AWAITING_CUSTOMER = "awaiting_customer"
    LINK_SENT = "link_sent"
    LINK_OPENED = "link_opened"
    CODE_VERIFIED = "code_verified"
    IDENTITY_VERIFIED = "identity_verified"
    PAYMENT_METHOD_ATTACHED = "payment_method_attached"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    FAILED = "failed"
    LOCKED = "locked"
    ALL = frozenset(
        {
            AWAITING_CUSTOMER,
            LINK_SENT,
            LINK_OPENED,
            CODE_VERIFIED,
            IDENTITY_VERIFIED,
            PAYMENT_METHOD_ATTACHED,
            COMPLETED,
            EXPIRED,
            CANCELLED,
            FAILED,
            LOCKED,
        }
    )


S = SessionStatus
TERMINAL = frozenset({S.COMPLETED, S.EXPIRED, S.CANCELLED, S.FAILED, S.LOCKED})
# A payment is in flight with the processor: only its outcome may end the session.
IN_FLIGHT = frozenset({S.PAYMENT_METHOD_ATTACHED})


class CodeCheck(StrEnum):
    VERIFIED = "verified"
    INCORRECT = "incorrect"
    LOCKED = "locked"


def check_metadata(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping) or len(metadata) > MAX_METADATA_KEYS:
        raise InvalidField(f"metadata is an object of at most {MAX_METADATA_KEYS} strings", field="metadata")
    for key, value in metadata.items():
        check_text("metadata key", key, max_length=40)
        check_text(f"metadata[{key}]", value, max_length=500, required=False)
    return dict(metadata)


class PaymentSession(Aggregate):
    # A default for state added after the first release: a snapshot taken before it lacks it.
    identity_on_file = False
    if TYPE_CHECKING:  # their types, for mypy only (a class annotation would make a dataclass field)
        splits: list[dict[str, Any]]
        sms_sent: tuple[str, ...]
        order_delivered: bool
    sms_sent = ()
    order_delivered = False
    # Sessions snapshotted before personal data was sealed have neither (their state holds
    # ``customer_phone`` and ``metadata`` as they were).
    customer_id: UUID | None = None
    personal: dict[str, Any] | None = None
    cancel_personal: dict[str, Any] | None = None  # the cancellation's reason, sealed
    splits = []  # type: ignore[var-annotated]  # noqa: RUF012 - for sessions snapshotted before splits; never changed

    class Opened(Aggregate.Created):
        merchant_id: UUID
        amount_minor: int
        currency: str
        # The customer's pseudonymous id (application/privacy.py: one per data key, never derived
        # from the phone alone) and, sealed under that key, ``phone`` and ``metadata`` (v3; v1-v2
        # events carried both in plain text, and read as ``customer_id`` None and ``personal``
        # {"plain": {...}}).
        customer_id: UUID | None
        personal: dict[str, Any]
        order_reference: str
        line_items: list[dict[str, Any]]
        voice_platform: str
        conversation_id: str
        callback_url: str | None
        identity_required: bool
        expires_at: datetime
        # Shares of the payment for the platform and partner merchants (domain/ledger.py Split);
        # v1 sessions had none.
        splits: list[dict[str, Any]]
        class_version = 3

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["splits"] = []

        @staticmethod
        def upcast_v2_v3(state: dict[str, Any]) -> None:
            state["customer_id"] = None
            state["personal"] = {"plain": {"phone": state.pop("customer_phone"),
                                           "metadata": state.pop("metadata", {})}}

    class LinkSent(Aggregate.Event):
        link_token_hash: str
        code_hash: str

    class LinkOpened(Aggregate.Event):
        """The customer opened the payment page: from where (``ip``), with what (``user_agent``),
        sealed under the customer's key in ``personal`` (v3): evidence in a dispute. v1 events
        recorded neither; v2 events both in plain text, read as ``personal`` {"plain": {...}}.
        None when nothing was known, or the customer's key was already destroyed."""

        personal: dict[str, Any] | None
        class_version = 3

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["ip"] = None
            state["user_agent"] = None

        @staticmethod
        def upcast_v2_v3(state: dict[str, Any]) -> None:
            ip, user_agent = state.pop("ip"), state.pop("user_agent")
            state["personal"] = {"plain": {"ip": ip, "user_agent": user_agent}} if ip or user_agent else None

    class SmsFailed(Aggregate.Event):
        reason: str

    class OrderDelivered(Aggregate.Event):
        """The merchant's commerce backend accepted the paid order (its answer's status code):
        evidence in a dispute."""

        status_code: int

    class SmsSent(Aggregate.Event):
        """The provider took an SMS of this session (evidence in a dispute: when, and its id)."""

        message_id: str
        provider_reference: str

    class CodeResent(Aggregate.Event):
        code_hash: str
        resends: int

    class CodeRejected(Aggregate.Event):
        attempts: int

    class Locked(Aggregate.Event):
        attempts: int

    class CodeVerified(Aggregate.Event):
        pass

    class IdentityVerified(Aggregate.Event):
        verifier: str

    class IdentityRecognized(Aggregate.Event):
        """The customer passed the identity check on an earlier purchase, recently enough: this
        session needs no new check."""

        customer_id: UUID
        verified_at: datetime

    class IdentityRejected(Aggregate.Event):
        verifier: str
        attempts: int
        reason: str

    class PaymentMethodAttached(Aggregate.Event):
        payment_id: UUID
        card_token: str
        card_brand: str
        card_last4: str

    class PaymentDeclined(Aggregate.Event):
        payment_id: UUID
        reason_code: str
        declines: int

    class Completed(Aggregate.Event):
        payment_id: UUID

    class Expired(Aggregate.Event):
        pass

    class Cancelled(Aggregate.Event):
        """``personal``: the reason given (it may name the customer), sealed under the customer's
        key (v2; v1 carried ``reason`` in plain text, read as ``{"plain": {"reason": ...}}``)."""

        personal: dict[str, Any] | None
        class_version = 2

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["personal"] = {"plain": {"reason": state.pop("reason")}}

    class Failed(Aggregate.Event):
        reason: str

    # -- creation ------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        session_id: UUID,
        *,
        merchant_id: UUID,
        amount_minor: int,
        currency: str,
        customer_phone: str,
        customer_id: UUID | None,
        seal: Seal,
        order_reference: str,
        line_items: Sequence[Mapping[str, Any]],
        voice_platform: str,
        conversation_id: str,
        callback_url: str | None,
        identity_threshold_minor: int,
        expires_at: datetime,
        metadata: Mapping[str, Any] | None = None,
        splits: Sequence[Split] = (),
    ) -> PaymentSession:
        """``customer_id``: the customer's pseudonym; ``seal``: what seals personal data under the
        customer's data key (the phone and metadata are checked here, then recorded only sealed)."""
        assert expires_at.tzinfo is not None, "expiry times are timezone-aware"
        check_currency(currency)
        check_amount(amount_minor, currency)
        items = check_line_items(line_items, amount_minor, currency)
        phone = check_phone(customer_phone)
        reference = check_text("order.reference", order_reference, max_length=100)
        platform = check_text("voice.platform", voice_platform, max_length=50)
        conversation = check_text("voice.conversation_id", conversation_id)
        callback = check_url("callback_url", callback_url)
        checked_metadata = check_metadata(metadata)
        checked_splits = [s.as_dict() for s in check_splits(splits, amount_minor, merchant_id)]
        return cls._create(
            cls.Opened,
            id=session_id,
            merchant_id=merchant_id,
            amount_minor=amount_minor,
            currency=currency,
            customer_id=customer_id,
            personal=seal({"phone": phone, "metadata": checked_metadata}),
            order_reference=reference,
            line_items=[item.as_dict() for item in items],
            voice_platform=platform,
            conversation_id=conversation,
            callback_url=callback,
            identity_required=amount_minor > identity_threshold_minor,
            expires_at=expires_at,
            splits=checked_splits,
        )

    @event(Opened)
    def __init__(
        self,
        *,
        merchant_id: UUID,
        amount_minor: int,
        currency: str,
        customer_id: UUID | None,
        personal: dict[str, Any],
        order_reference: str,
        line_items: list[dict[str, Any]],
        voice_platform: str,
        conversation_id: str,
        callback_url: str | None,
        identity_required: bool,
        expires_at: datetime,
        splits: list[dict[str, Any]],
    ) -> None:
        self.merchant_id = merchant_id
        self.splits = splits
        self.amount_minor = amount_minor
        self.currency = currency
        self.customer_id = customer_id
        self.personal = personal
        self.order_reference = order_reference
        self.line_items = line_items
        self.voice_platform = voice_platform
        self.conversation_id = conversation_id
        self.callback_url = callback_url
        self.identity_required = identity_required
        self.expires_at = expires_at
        self.status = S.AWAITING_CUSTOMER
        self.link_token_hash: str | None = None
        self.code_hash: str | None = None
        self.code_attempts = 0
        self.code_resends = 0
        self.identity_attempts = 0
        self.declines = 0
        self.sms_failures = 0
        self.payment_id: UUID | None = None
        self.card_token: str | None = None
        self.card_brand: str | None = None
        self.card_last4: str | None = None
        self.end_reason: str | None = None
        self.identity_on_file = False

    # -- guards ----------------------------------------------------------------------------

    def _require(self, command: str, *allowed: str) -> None:
        if self.status == S.LOCKED and S.LOCKED not in allowed:
            raise SessionLocked("this session is locked after too many wrong codes")
        if self.status not in allowed:
            raise InvalidTransition("payment session", command, self.status)

    def _require_live(self, command: str, now: datetime, *allowed: str) -> None:
        self._require(command, *allowed)
        if now >= self.expires_at:
            raise LinkExpired("the payment link has expired")

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def needs_identity_check(self) -> bool:
        """Above the threshold, and no recent check on file for this customer."""
        return self.identity_required and not self.identity_on_file

    @property
    def ready_for_payment_method(self) -> bool:
        if self.needs_identity_check:
            return self.status == S.IDENTITY_VERIFIED
        return self.status == S.CODE_VERIFIED

    # -- the customer's journey -----------------------------------------------------------

    def recognize_identity(self, customer_id: UUID, verified_at: datetime) -> None:
        """Right after opening: the customer's earlier check stands in for a new one."""
        self._require("recognize the identity on", S.AWAITING_CUSTOMER)
        if not self.identity_required:
            raise IdentityCheckNotRequired("this amount does not need an identity check")
        if self.identity_on_file:
            return
        self._identity_recognized(customer_id=customer_id, verified_at=verified_at)

    @event(IdentityRecognized)
    def _identity_recognized(self, customer_id: UUID, verified_at: datetime) -> None:
        self.identity_on_file = True

    def send_link(self, link_token_hash: str, code_hash: str, now: datetime) -> None:
        self._require_live("send the link of", now, S.AWAITING_CUSTOMER)
        self._link_sent(link_token_hash=link_token_hash, code_hash=code_hash)

    @event(LinkSent)
    def _link_sent(self, link_token_hash: str, code_hash: str) -> None:
        self.link_token_hash = link_token_hash
        self.code_hash = code_hash
        self.status = S.LINK_SENT

    def record_sms_failure(self, reason: str) -> None:
        """The provider gave up on the link's SMS: recorded so the voice platform hears of it
        and can re-prompt or resend; the session itself goes on."""
        self._require("record an SMS failure on", S.LINK_SENT, S.LINK_OPENED)
        self._sms_failed(reason=check_text("reason", reason, max_length=500, required=False))

    @event(SmsFailed)
    def _sms_failed(self, reason: str) -> None:
        self.sms_failures += 1

    def record_sms_sent(self, message_id: str, provider_reference: str) -> None:
        """Recorded whatever the session's state by now (the customer may be faster than the
        dispatcher's record); each message once."""
        if message_id not in self.sms_sent:
            self._sms_sent(message_id=check_text("message_id", message_id, max_length=64),
                           provider_reference=check_text("provider_reference", provider_reference, max_length=100,
                                                         required=False))

    @event(SmsSent)
    def _sms_sent(self, message_id: str, provider_reference: str) -> None:
        self.sms_sent = (*self.sms_sent, message_id)

    def record_order_delivered(self, status_code: int) -> None:
        if not self.order_delivered:
            self._order_delivered(status_code=status_code)

    @event(OrderDelivered)
    def _order_delivered(self, status_code: int) -> None:
        self.order_delivered = True

    def link_token_matches(self, link_token_hash: str) -> bool:
        return self.link_token_hash is not None and hmac.compare_digest(
            self.link_token_hash, link_token_hash
        )

    def open_link(self, now: datetime, *, ip: str | None = None, user_agent: str | None = None,
                  seal: Seal | None = None) -> None:
        """The customer opened the page; opening it again is not a new event. ``ip`` and
        ``user_agent`` are recorded sealed with ``seal`` (none: the customer's key is gone, so
        they are not recorded)."""
        if self.status == S.LINK_OPENED:
            return
        self._require_live("open the link of", now, S.LINK_SENT)
        seen = {"ip": (ip or None) and ip[:64], "user_agent": (user_agent or None) and user_agent[:300]}
        self._link_opened(personal=seal(seen) if seal is not None and any(seen.values()) else None)

    @event(LinkOpened)
    def _link_opened(self, personal: dict[str, Any] | None) -> None:
        self.status = S.LINK_OPENED

    def resend_code(self, code_hash: str, now: datetime) -> None:
        self._require_live("resend the code of", now, S.LINK_SENT, S.LINK_OPENED)
        if self.code_resends >= MAX_CODE_RESENDS:
            raise ResendLimitReached(f"the code was already resent {MAX_CODE_RESENDS} times")
        self._code_resent(code_hash=code_hash, resends=self.code_resends + 1)

    @event(CodeResent)
    def _code_resent(self, code_hash: str, resends: int) -> None:
        # Attempts are not reset: a resend must not buy a brute-forcer more guesses.
        self.code_hash = code_hash
        self.code_resends = resends

    def verify_code(self, code_hash: str, now: datetime) -> CodeCheck:
        """Record the outcome of one guess. A wrong guess is an event, not an exception,
        so it is saved; the caller turns INCORRECT / LOCKED into the customer's message."""
        self._require_live("verify the code of", now, S.LINK_SENT, S.LINK_OPENED)
        assert self.code_hash is not None
        if hmac.compare_digest(self.code_hash, code_hash):
            self._code_verified()
            return CodeCheck.VERIFIED
        attempts = self.code_attempts + 1
        self._code_rejected(attempts=attempts)
        if attempts >= MAX_CODE_ATTEMPTS:
            self._locked(attempts=attempts)
            return CodeCheck.LOCKED
        return CodeCheck.INCORRECT

    @property
    def code_attempts_left(self) -> int:
        return max(0, MAX_CODE_ATTEMPTS - self.code_attempts)

    @event(CodeVerified)
    def _code_verified(self) -> None:
        self.status = S.CODE_VERIFIED

    @event(CodeRejected)
    def _code_rejected(self, attempts: int) -> None:
        self.code_attempts = attempts

    @event(Locked)
    def _locked(self, attempts: int) -> None:
        self.status = S.LOCKED
        self.end_reason = "too_many_code_attempts"

    def record_identity_check(self, *, verified: bool, verifier: str, reason: str, now: datetime) -> None:
        self._require_live("verify the identity on", now, S.CODE_VERIFIED)
        if not self.needs_identity_check:
            raise IdentityCheckNotRequired("this amount does not need an identity check")
        if verified:
            self._identity_verified(verifier=verifier)
            return
        attempts = self.identity_attempts + 1
        self._identity_rejected(verifier=verifier, attempts=attempts, reason=reason)
        if attempts >= MAX_IDENTITY_ATTEMPTS:
            self._failed(reason="identity_not_verified")

    @event(IdentityVerified)
    def _identity_verified(self, verifier: str) -> None:
        self.status = S.IDENTITY_VERIFIED

    @event(IdentityRejected)
    def _identity_rejected(self, verifier: str, attempts: int, reason: str) -> None:
        self.identity_attempts = attempts

    def attach_payment_method(
        self, *, payment_id: UUID, card_token: str, card_brand: str, card_last4: str, now: datetime
    ) -> None:
        self._require_live("attach a payment method to", now, S.CODE_VERIFIED, S.IDENTITY_VERIFIED)
        if not self.ready_for_payment_method:
            raise IdentityCheckRequired(
                "amounts above the identity threshold need an identity check before payment"
            )
        check_text("card_token", card_token, max_length=64)
        if card_brand not in CARD_BRANDS:
            raise InvalidPaymentMethod(f"unknown card brand {card_brand!r}")
        if not (isinstance(card_last4, str) and len(card_last4) == 4 and card_last4.isascii()
                and card_last4.isdigit()):
            raise InvalidPaymentMethod("card_last4 must be exactly four digits")
        self._payment_method_attached(
            payment_id=payment_id, card_token=card_token, card_brand=card_brand, card_last4=card_last4
        )

    @event(PaymentMethodAttached)
    def _payment_method_attached(
        self, payment_id: UUID, card_token: str, card_brand: str, card_last4: str
    ) -> None:
        self.payment_id = payment_id
        self.card_token = card_token
        self.card_brand = card_brand
        self.card_last4 = card_last4
        self.status = S.PAYMENT_METHOD_ATTACHED

    # -- outcomes of the payment ----------------------------------------------------------

    def _require_current_payment(self, command: str, payment_id: UUID) -> None:
        self._require(command, S.PAYMENT_METHOD_ATTACHED)
        if payment_id != self.payment_id:
            raise InvalidField(
                f"payment {payment_id} is not this session's current payment", field="payment_id"
            )

    def complete(self, payment_id: UUID) -> None:
        self._require_current_payment("complete", payment_id)
        self._completed(payment_id=payment_id)

    @event(Completed)
    def _completed(self, payment_id: UUID) -> None:
        self.status = S.COMPLETED

    def record_decline(self, payment_id: UUID, reason_code: str) -> None:
        """A declined card sends the customer back to choose another, a few times at most."""
        self._require_current_payment("record a decline on", payment_id)
        declines = self.declines + 1
        self._payment_declined(payment_id=payment_id, reason_code=reason_code, declines=declines)
        if declines >= MAX_DECLINES:
            self._failed(reason="too_many_declines")

    @event(PaymentDeclined)
    def _payment_declined(self, payment_id: UUID, reason_code: str, declines: int) -> None:
        self.declines = declines
        self.payment_id = None
        self.card_token = self.card_brand = self.card_last4 = None
        self.status = S.IDENTITY_VERIFIED if self.needs_identity_check else S.CODE_VERIFIED

    # -- ends -----------------------------------------------------------------------------

    def expire(self, now: datetime) -> None:
        self._require("expire", *(S.ALL - TERMINAL - IN_FLIGHT))
        if now < self.expires_at:
            raise LinkNotExpired(f"the link is valid until {self.expires_at.isoformat()}")
        self._expired()

    @event(Expired)
    def _expired(self) -> None:
        self.status = S.EXPIRED
        self.end_reason = "link_expired"

    def cancel(self, reason: str, *, seal: Seal) -> None:
        """``seal``: seals the reason under the customer's data key."""
        self._require("cancel", *(S.ALL - TERMINAL - IN_FLIGHT))
        self._cancelled(personal=seal({"reason": check_text("reason", reason, max_length=200)}))

    @event(Cancelled)
    def _cancelled(self, personal: dict[str, Any] | None) -> None:
        self.status = S.CANCELLED
        # The words are sealed; the aggregate (rebuilt without keys) knows only that it was cancelled
        # (the application opens them: application/privacy.py ``cancel_reason``).
        self.end_reason = CANCELLED_REASON
        self.cancel_personal = personal

    def fail(self, reason: str) -> None:
        # Not while a payment is in flight: only its outcome may end the session then, or an
        # authorization could land on a session that already told the customer it failed.
        self._require("fail", *(S.ALL - TERMINAL - IN_FLIGHT))
        self._failed(reason=check_text("reason", reason, max_length=200))

    @event(Failed)
    def _failed(self, reason: str) -> None:
        self.status = S.FAILED
        self.end_reason = reason

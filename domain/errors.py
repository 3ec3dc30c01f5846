"""Named business rejections, each with a stable code the API maps to problem+json."""

from __future__ import annotations

from typing import Any, ClassVar


class DomainError(Exception):
    """A business rule said no. ``code`` is stable; ``message`` says why in words."""

    code: ClassVar[str] = "domain_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidAmount(DomainError):
    code = "invalid_amount"


class AmountTooLarge(DomainError):
    code = "amount_too_large"


class UnknownCurrency(DomainError):
    code = "unknown_currency"


class CurrencyMismatch(DomainError):
    code = "currency_mismatch"


class InvalidPhone(DomainError):
    code = "invalid_phone"


class InvalidLineItem(DomainError):
    code = "invalid_line_item"


class ItemsDoNotSum(DomainError):
    code = "items_do_not_sum"


class InvalidField(DomainError):
    """A field outside the shapes above is malformed (URL, reference, name...)."""

    code = "invalid_field"


class InvalidFeeSchedule(DomainError):
    code = "invalid_fee_schedule"


class InvalidTransition(DomainError):
    """The command is not allowed in the aggregate's current state."""

    code = "invalid_transition"

    def __init__(self, aggregate: str, command: str, state: str) -> None:
        super().__init__(
            f"cannot {command} a {aggregate} that is {state}",
            aggregate=aggregate,
            command=command,
            state=state,
        )


class LinkExpired(DomainError):
    code = "link_expired"


class SessionLocked(DomainError):
    code = "session_locked"


class IncorrectCode(DomainError):
    code = "incorrect_code"


class ResendLimitReached(DomainError):
    code = "resend_limit_reached"


class IdentityCheckRequired(DomainError):
    code = "identity_check_required"


class IdentityCheckNotRequired(DomainError):
    code = "identity_check_not_required"


class InvalidPaymentMethod(DomainError):
    code = "invalid_payment_method"


class CaptureExceedsAuthorized(DomainError):
    code = "capture_exceeds_authorized"


class RefundExceedsCaptured(DomainError):
    code = "refund_exceeds_captured"


class AuthorizationLapsed(DomainError):
    code = "authorization_expired"


class AuthorizationNotExpired(DomainError):
    code = "authorization_not_expired"


class LinkNotExpired(DomainError):
    code = "link_not_expired"


class MerchantLimitExceeded(DomainError):
    code = "merchant_limit_exceeded"


class MerchantInactive(DomainError):
    code = "merchant_inactive"


class RiskNotAssessed(DomainError):
    """A payment goes to a processor only after the risk rules have passed it."""

    code = "risk_not_assessed"


class InvalidSplit(DomainError):
    """A payment's splits name an unknown party, repeat one, or add up to more than the amount."""

    code = "invalid_split"


class SplitsExceedCapture(DomainError):
    """What the splits take of this capture, with our fee, is more than the capture: capture more."""

    code = "splits_exceed_capture"


class NothingToPayOut(DomainError):
    """No settled payment has money due, nothing is carried forward and the reserve releases
    nothing: there is no payout to make."""

    code = "nothing_to_pay_out"


class DisputeClosed(DomainError):
    """The dispute no longer takes this: evidence after submission, after the due date, or on a
    dispute decided already."""

    code = "dispute_closed"


class DisputeOpen(DomainError):
    """A dispute is open on this payment: it cannot be refunded until the dispute is decided (the
    cardholder would be paid twice)."""

    code = "dispute_open"

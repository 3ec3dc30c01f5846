"""Rejections raised by the application layer (not business rules), with stable codes."""

from __future__ import annotations

from domain.errors import DomainError


class ApplicationError(DomainError):
    code = "application_error"


class NotFound(ApplicationError):
    code = "not_found"


class IdempotencyKeyReused(ApplicationError):
    code = "idempotency_key_reused"


class ConcurrencyConflict(ApplicationError):
    """Other writers kept winning the race for this aggregate; the caller may retry."""

    code = "concurrency_conflict"


class ProcessorRejected(ApplicationError):
    code = "processor_rejected"


class ProcessorUnavailable(ApplicationError):
    """The processor did not answer; the outcome is unknown and will be settled by asking it."""

    code = "processor_unavailable"


class BankTransferRejected(ApplicationError):
    """The bank refused a payout's transfer for good; the payout fails and its amount returns to
    the merchant's available balance."""

    code = "bank_transfer_rejected"


class BankUnavailable(ApplicationError):
    """The bank did not answer, or answered that it cannot now: the transfer's outcome is unknown
    until it is sent again with the same key."""

    code = "bank_unavailable"

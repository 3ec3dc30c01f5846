"""The ports the application needs from the outside world, as small protocols.

Adapters implement them for real (HTTP processor, SMS provider) and for development (sandbox);
the composition root picks which.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable
from uuid import UUID

# The outbox row is defined beside the envelope it carries (the read side imports that module,
# not this one); the event store's recorder takes it from here, with the other ports.
from application.envelope import OutboxMessage as OutboxMessage
from domain.fx import FxRate
from domain.money import Money
from domain.reconciliation import Expected, SettlementReport


class Clock(Protocol):
    def now(self) -> datetime:
        """Timezone-aware UTC now."""
        ...


class Decision(StrEnum):
    APPROVED = "approved"
    DECLINED = "declined"
    # The processor did not answer in time: the charge may or may not exist. Never retried
    # as a new charge; settled later by ``PaymentProcessor.status`` with the same key.
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class ProcessorOutcome:
    decision: Decision
    processor: str
    reference: str = ""
    amount_minor: int = 0
    reason_code: str = ""
    message: str = ""
    expires_at: datetime | None = None
    # False only when the request provably never reached the processor (connection refused,
    # circuit open): an UNKNOWN that may safely be sent to another processor with the same key.
    sent: bool = True


class PaymentProcessor(Protocol):
    """Every call carries an idempotency key: the same key never moves money twice."""

    name: str

    def authorize(
        self,
        *,
        idempotency_key: str,
        amount_minor: int,
        currency: str,
        card_token: str,
        card_last4: str,
        merchant_id: str,
        cvv: str | None = None,
    ) -> ProcessorOutcome: ...

    def capture(
        self, *, idempotency_key: str, authorization_reference: str, amount_minor: int, currency: str
    ) -> ProcessorOutcome: ...

    def void(self, *, idempotency_key: str, authorization_reference: str) -> ProcessorOutcome: ...

    def refund(
        self, *, idempotency_key: str, authorization_reference: str, amount_minor: int, currency: str
    ) -> ProcessorOutcome: ...

    def status(self, *, idempotency_key: str) -> ProcessorOutcome | None:
        """The outcome of an earlier call with this key, or None if the processor never saw it."""
        ...


@runtime_checkable
class ProcessorRouter(Protocol):
    """Which processor gets a new authorization (the primary unless its circuit is open), which
    one may take over an authorization the chosen one provably never received (``alternative``:
    a refused connection), and which one holds an earlier call (captures, refunds and status
    questions go back to the processor that authorized)."""

    def select(self) -> PaymentProcessor: ...

    def named(self, name: str) -> PaymentProcessor: ...

    def alternative(self, name: str) -> PaymentProcessor | None:
        """Another processor that can take a call now, or None."""
        ...


class SingleProcessor:
    """A router over one processor."""

    def __init__(self, processor: PaymentProcessor) -> None:
        self.processor = processor

    def select(self) -> PaymentProcessor:
        return self.processor

    def named(self, name: str) -> PaymentProcessor:
        return self.processor

    def alternative(self, name: str) -> PaymentProcessor | None:
        return None


@dataclass(frozen=True)
class IdentityClaim:
    date_of_birth: str  # YYYY-MM-DD
    postal_code: str


@dataclass(frozen=True)
class IdentityOutcome:
    verified: bool
    verifier: str
    reason: str = ""


class IdentityVerifier(Protocol):
    def verify(self, *, phone: str, claim: IdentityClaim) -> IdentityOutcome: ...


@dataclass(frozen=True)
class CommandRecord:
    """What the command log keeps of one command, written in the same transaction as its events."""

    command_id: str
    command_name: str
    request_hash: str
    aggregate_id: Any
    result: dict[str, Any] = field(default_factory=dict)
    position: int | None = None


class CommandLog(Protocol):
    """Implemented by the event store's recorder: the command log lives beside the events."""

    def get_command(self, command_id: str) -> CommandRecord | None: ...


@dataclass(frozen=True)
class OutboxSms:
    """An SMS to send once the transaction that asked for it commits."""

    message_id: Any
    session_id: Any
    payload: bytes  # encrypted JSON {"to": ..., "body": ...}


@dataclass(frozen=True)
class SmsResult:
    sent: bool
    retryable: bool = False
    provider_reference: str = ""
    error: str = ""


class MessageWording(Protocol):
    """The words of the texts the ledger sends a customer; the notification adapter owns them
    (language, tone, format of amounts), the ledger only supplies the facts."""

    def payment_link(
        self, *, merchant_name: str, amount: Money, order_reference: str, link_url: str, code: str,
        expires_in: timedelta,
    ) -> str:
        """The SMS that carries the payment link and its one-time code."""
        ...

    def new_code(self, *, merchant_name: str, code: str) -> str:
        """The SMS that carries a new one-time code for a link already sent."""
        ...


class SmsSender(Protocol):
    """Sends one SMS. ``message_id`` is the provider's idempotency key: sending the same id
    twice delivers one message."""

    def send(self, *, message_id: str, to: str, body: str) -> SmsResult: ...


class VelocityCounter(Protocol):
    """How many payment attempts each key (a keyed hash of a phone or a card) made in a window.

    ``record_and_count`` records ``attempt_id`` at ``at`` under every key (idempotent: recording
    the same attempt again keeps its first time) and returns, per key, the attempts in the
    window ending at that attempt's recorded time, itself included. Attempts on one key are
    counted one at a time, so parallel attempts see each other. Asking again for the same
    attempt counts it once; it may then also see attempts recorded at the same instant since."""

    def record_and_count(
        self, attempt_id: str, at: datetime, window_seconds: int, keys: dict[str, str]
    ) -> dict[str, int]: ...


class Locks(Protocol):
    """Mutual exclusion per key across every process of the deployment."""

    def hold(self, key: str) -> AbstractContextManager[None]: ...


class SettlementReports(Protocol):
    """Processors' daily settlement reports (adapters/processors/settlement.py). Raises
    MalformedReport for a report that cannot be read or contradicts itself, and
    ProcessorUnavailable when the processor cannot be asked now."""

    def fetch(self, processor: str, day: date, currency: str) -> SettlementReport: ...


class ProcessorTransactions(Protocol):
    """Our side of a settlement report (adapters/postgres/settlement.py): the captures and refunds
    we recorded with ``processor`` in ``currency`` up to ``day``, of payments not yet settled."""

    def expected(self, processor: str, currency: str, day: date) -> list[Expected]: ...


@dataclass(frozen=True)
class BankTransfer:
    """A transfer the bank accepted: its reference, for the payout's record."""

    reference: str


class Bank(Protocol):
    """The platform's bank, which pays merchants out (adapters/banks/http.py; the sandbox bank is
    adapters/dev/bank_server.py).

    ``key`` is the bank's idempotency key: the same key sent again (after a timeout, by a loop
    that restarted) answers the first transfer and moves no money twice. Raises
    BankTransferRejected when the bank refuses the transfer for good (closed account, a currency
    it cannot pay), BankUnavailable when the outcome is unknown or the bank cannot be asked now
    (timeout, refused connection, 5xx): the caller retries later with the same key."""

    def transfer(
        self, *, key: str, merchant_id: str, amount_minor: int, currency: str, description: str
    ) -> BankTransfer: ...


class PayoutCandidates(Protocol):
    """The read side's hints for payouts (adapters/postgres/payouts.py). Hints only: the payments
    and the payout account decide what is due, so a stale answer pays nothing twice; a payment
    the read side has not seen settle yet goes in a later payout."""

    def balances(self) -> list[tuple[UUID, str]]:
        """Merchants and currencies with money available or reserved."""
        ...

    def dues(self, merchant_id: UUID, currency: str) -> list[UUID]:
        """The merchant's settled payments in ``currency`` with something not yet paid out."""
        ...

    def unsent(self) -> list[UUID]:
        """Payouts created and not yet paid or failed."""
        ...


class FxRates(Protocol):
    """Exchange rates (adapters/dev/fx.py is the sandbox source): the rate now from one currency
    to another. Raises ValueError for a pair it does not quote."""

    def rate(self, from_currency: str, to_currency: str) -> FxRate: ...


class PaymentReferences(Protocol):
    """Our payment behind a processor's reference of its capture, as processors' notifications
    name it (adapters/postgres/disputes.py, from the read side)."""

    def find(self, processor: str, reference: str) -> UUID | None: ...

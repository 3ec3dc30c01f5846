"""Checkout: the customer pays a session by card, the use case behind the payment page.

The card goes to the vault (a port: it validates, encrypts and keeps the number, and hands back a
token), the token is attached to the session (which creates the Payment), and the payment is sent
for authorization. Every step is idempotent on the one command id the caller derives from its
form, so a form sent twice tokenizes, attaches and charges once; a second submission that finds
the first still with the processor waits for that answer instead of asking again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol
from uuid import UUID

from application.errors import IdempotencyKeyReused, ProcessorUnavailable
from application.ledger import Ledger
from domain.payment import PaymentStatus
from domain.payment_session import PaymentSession

OUTCOME_WAIT_S = 5.0
_OUTCOME_POLL_S = 0.1


class TokenizedCard(Protocol):
    """What the vault hands back: all the rest of the system may know about a card."""

    @property
    def token(self) -> str: ...

    @property
    def brand(self) -> str: ...

    @property
    def last4(self) -> str: ...

    @property
    def fingerprint(self) -> str:
        """A keyed hash of the number (the same card, the same value); empty if the vault has none."""
        ...


class CardVault(Protocol):
    """The card vault port (adapters/postgres/vault.py in production)."""

    def tokenize(
        self, number: str, exp_month: int, exp_year: int, *, now: datetime, idempotency_key: str | None = None,
    ) -> TokenizedCard:
        """Raises InvalidPaymentMethod for a card it refuses; IdempotencyKeyReused when the key
        was used before for another card."""
        ...


class CardPaymentsUnavailable(ProcessorUnavailable):
    """This deployment has no card vault, so it cannot take cards at all."""


class FormSentWithAnotherCard(IdempotencyKeyReused):
    """The same form (command id) came back with a different card: the vault keeps the first."""


@dataclass(frozen=True)
class CardEntry:
    """The card as the customer typed it. Neither the number nor the CVV is ever shown in a repr."""

    number: str = field(repr=False)
    exp_month: int
    exp_year: int
    cvv: str = field(repr=False)


@dataclass(frozen=True)
class CheckoutOutcome:
    """Where the payment stands after checkout. ``status`` is a PaymentStatus value: processing
    means the answer is still on its way (a timeout, or no processor reachable); ``failure_code``
    is the decline's reason when it failed."""

    payment_id: UUID
    status: str
    failure_code: str | None = None


class Checkout:
    def __init__(self, ledger: Ledger, vault: CardVault | None, *, outcome_wait_s: float = OUTCOME_WAIT_S) -> None:
        self.ledger = ledger
        self.vault = vault
        self.outcome_wait_s = outcome_wait_s

    def accepts_card(self, command_id: str, session: PaymentSession) -> bool:
        """Whether a card form should be run: a form sent again replays its recorded commands
        whatever the session's state since; a new one only while the session waits for a card
        and its link has not expired."""
        if self.ledger.command_log.get_command(command_id) is not None:
            return True
        return session.ready_for_payment_method and self.ledger.clock.now() < session.expires_at

    def pay_by_card(self, command_id: str, session_id: UUID, card: CardEntry) -> CheckoutOutcome:
        """Tokenize, attach and authorize, each idempotent on ``command_id``.

        Raises CardPaymentsUnavailable without a vault; the vault's InvalidPaymentMethod;
        FormSentWithAnotherCard; and the ledger's rejections (InvalidTransition when the session
        has moved on, IdentityCheckRequired, IdempotencyKeyReused). A processor that cannot be
        reached is not an error here: the outcome is "processing", settled later by asking it.
        """
        if self.vault is None:
            raise CardPaymentsUnavailable("card payments are not configured here (no vault key)")
        ledger = self.ledger
        try:
            vaulted = self.vault.tokenize(card.number, card.exp_month, card.exp_year, now=ledger.clock.now(),
                                          idempotency_key=command_id)
        except IdempotencyKeyReused as reused:
            raise FormSentWithAnotherCard(reused.message) from None
        attached = ledger.attach_payment_method(
            command_id, session_id, card_token=vaulted.token, card_brand=vaulted.brand, card_last4=vaulted.last4,
            card_fingerprint=vaulted.fingerprint or None)
        payment_id = UUID(attached.result["payment_id"])
        try:
            if attached.replayed and ledger.get_payment(payment_id).status == PaymentStatus.PROCESSING:
                # The same form, sent again while its first submission is with the processor: wait
                # for that answer instead of asking the processor a second time.
                status = self._await_outcome(payment_id)
            else:
                # From the payment and session as attach saved them: not loaded again.
                status = ledger.authorize_payment(payment_id, cvv=card.cvv, known=attached.saved).result["status"]
        except ProcessorUnavailable:
            status = PaymentStatus.PROCESSING
        return self._outcome(payment_id, status)

    def settle_in_flight(self, payment_id: UUID) -> CheckoutOutcome:
        """A payment whose answer was lost: ask again, never charge again."""
        ledger = self.ledger
        try:
            payment = ledger.get_payment(payment_id)
            if payment.status == PaymentStatus.INITIATED:
                # Attached but never sent (a crash in between): the CVV is gone, so authorize
                # without it; the processor's idempotency key still makes this one charge.
                ledger.authorize_payment(payment_id)
            elif payment.status == PaymentStatus.PROCESSING:
                ledger.resolve_authorization(payment_id)
        except ProcessorUnavailable:
            return CheckoutOutcome(payment_id, PaymentStatus.PROCESSING)
        return self._outcome(payment_id, ledger.get_payment(payment_id).status)

    def _outcome(self, payment_id: UUID, status: str) -> CheckoutOutcome:
        failure_code = None
        if status == PaymentStatus.FAILED:
            failure_code = self.ledger.get_payment(payment_id).failure_code or ""
        return CheckoutOutcome(payment_id, status, failure_code)

    def _await_outcome(self, payment_id: UUID) -> str:
        """The payment's status once it leaves processing, or still processing after the wait."""
        deadline = time.monotonic() + self.outcome_wait_s
        while True:
            status: str = self.ledger.get_payment(payment_id).status
            if status != PaymentStatus.PROCESSING or time.monotonic() >= deadline:
                return status
            time.sleep(_OUTCOME_POLL_S)

"""Customers' personal data: sealed under a per-customer data key, erased by destroying the key
(crypto-shredding), exported for a subject access request.

A customer is known by a pseudonym, ``customer_id``: the id of the holder of a data key, found
through a keyed hash of the normalized phone (``customer_key`` purpose) in the ``CustomerKeys``
port (adapters/postgres/customer_keys.py). It is random, not derived from the phone, so once the
key and its lookup hash are gone nothing links it back to a phone; a new session of the same
phone after an erasure gets a new key and a new pseudonym, and starts as a stranger.

Events hold the phone, metadata, IP address and user agent only sealed under the key (see
domain/payment_session.py ``personal``), and so the free text a person types that may name the
customer: the reasons given for a cancellation, a void or a refund, and a dispute's evidence
(sealed under the key of the payment's session's customer; ``_seal_for_session``). Erasure
records ``customer.erased`` and then destroys the key, deletes the lookup hash and scrubs the
side tables that held the phone (queued SMS, the development mailbox, velocity rows, the status
read model's last four); events, postings and the audit chain are untouched. Events written
before sealing existed still hold the phone in plain text (they read as ``{"plain": {...}}``):
the ledger cannot rewrite them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid4, uuid5

from eventsourcing.application import AggregateNotFoundError
from eventsourcing.domain import Aggregate

from application.errors import NotFound
from application.unit_of_work import CommandResult, LedgerBase, project
from domain.customer import Customer
from domain.dispute import Dispute
from domain.payment import Payment
from domain.payment_session import PaymentSession
from domain.values import ERASED, Seal, check_phone, check_text, mask_phone

# The namespace of customer ids derived from a keyed hash of the phone, before pseudonyms were
# random (customers remembered then keep their id).
_CUSTOMER_NAMESPACE = uuid5(NAMESPACE_URL, "https://echotransact.example/customers")


@dataclass(frozen=True)
class CustomerKey:
    """A customer's data key, unwrapped: only in memory, never in a repr."""

    key_id: UUID
    customer_id: UUID
    material: bytes = field(repr=False)


@dataclass(frozen=True)
class Scrubbed:
    """What an erasure removed besides the key (for the report; rows, by table)."""

    keys_destroyed: int
    session_ids: tuple[UUID, ...]
    rows: Mapping[str, int]


class CustomerKeys(ABC):
    """The customers' data keys, wrapped under the master key, and the sessions each sealed."""

    @abstractmethod
    def key_for(self, lookup_hash: str, *, session_id: UUID | None = None, saved_after: bool = False) -> CustomerKey:
        """The live key of this lookup hash, made (with a new random pseudonym) when there is
        none; ``session_id`` is remembered as sealed under it (for erasure and export).
        ``saved_after``: the caller saves durably after this returns whatever depends on the key
        (a new session sealed under it), so a store may leave its own write's durability to that
        save; without it, what this writes is durable when it returns."""

    @abstractmethod
    def find(self, lookup_hash: str) -> CustomerKey | None:
        """The live key of this lookup hash, if any (none made)."""

    @abstractmethod
    def key(self, key_id: UUID) -> CustomerKey | None:
        """A key by its id; None once destroyed."""

    @abstractmethod
    def seal(self, key: CustomerKey, data: Mapping[str, Any]) -> dict[str, Any]:
        """``data`` encrypted under ``key``: ``{"key_id", "sealed"}``."""

    @abstractmethod
    def open(self, sealed: Mapping[str, Any]) -> dict[str, Any] | None:
        """What ``seal`` sealed; None when its key is destroyed."""

    @abstractmethod
    def sessions_of(self, customer_id: UUID) -> list[UUID]:
        """The sessions that sealed personal data under this customer's keys."""

    @abstractmethod
    def key_created_at(self, customer_id: UUID) -> datetime | None: ...

    @abstractmethod
    def destroy(self, customer_id: UUID, *, phone: str, velocity_keys: Sequence[str]) -> Scrubbed:
        """Destroy the customer's keys and their lookup hash, and scrub what side tables hold of
        this phone. Idempotent: a second call destroys and scrubs nothing more."""


# What a command seals where the customer's key is already destroyed: nothing of the text is
# recorded (it opens, like anything sealed under a destroyed key, to nothing: ``erased``).
NOT_SEALED_ERASED: Mapping[str, Any] = {"erased": True}


def _seal_nothing(data: dict[str, Any]) -> dict[str, Any]:
    return dict(NOT_SEALED_ERASED)


def plain_of(sealed: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Personal data recorded before sealing existed (upcast as ``{"plain": {...}}``)."""
    if isinstance(sealed, Mapping) and isinstance(sealed.get("plain"), Mapping):
        return dict(sealed["plain"])
    return None


@dataclass(frozen=True)
class Erasure:
    result: CommandResult
    scrubbed: tuple[Scrubbed, ...]

    @property
    def session_ids(self) -> list[UUID]:
        return [s for part in self.scrubbed for s in part.session_ids]


class PrivacyCommands(LedgerBase):
    # Given by the composition root (through Ledger's constructor).
    customer_keys: CustomerKeys

    # -- pseudonyms and keys ----------------------------------------------------------------

    def _lookup_hash(self, phone: str) -> str:
        return self.keyed_hash("customer_key", phone)

    def _legacy_customer_id(self, phone: str) -> UUID:
        return uuid5(_CUSTOMER_NAMESPACE, self.keyed_hash("customer", phone))

    def _customer_key(self, phone: str, session_id: UUID | None = None, *, saved_after: bool = False) -> CustomerKey:
        return self.customer_keys.key_for(self._lookup_hash(phone), session_id=session_id, saved_after=saved_after)

    def _sealer(self, key: CustomerKey) -> Seal:
        def seal(data: dict[str, Any]) -> dict[str, Any]:
            return self.customer_keys.seal(key, data)
        return seal

    def _find_customer_by_id(self, customer_id: UUID) -> Customer | None:
        try:
            customer: Any = self.repository.get(customer_id, projector_func=project)
        except AggregateNotFoundError:
            return None
        return customer if isinstance(customer, Customer) else None

    def open_personal(self, sealed: Mapping[str, Any] | None) -> dict[str, Any] | None:
        """Sealed personal data opened (legacy plain text as it was); None when erased or absent."""
        if sealed is None:
            return None
        plain = plain_of(sealed)
        if plain is not None:
            return plain
        return self.customer_keys.open(sealed)

    def session_personal(self, session: PaymentSession) -> dict[str, Any] | None:
        """The session's phone and metadata; None once its customer was erased."""
        if session.personal is None and "customer_phone" in session.__dict__:  # a snapshot from before
            return {"phone": session.__dict__["customer_phone"], "metadata": session.__dict__.get("metadata", {})}
        return self.open_personal(session.personal)

    def session_phone(self, session: PaymentSession) -> str | None:
        personal = self.session_personal(session)
        return None if personal is None else personal.get("phone")

    def session_phone_masked(self, session: PaymentSession) -> str:
        """The phone as the read side shows it (``+1******0123``), or ``erased``."""
        phone = self.session_phone(session)
        return ERASED if phone is None else mask_phone(phone)

    def _session_key(self, session: PaymentSession) -> CustomerKey | None:
        """The key the session's personal data is sealed under (a legacy session gets its
        customer's key now); None when it was destroyed."""
        sealed = session.personal
        if isinstance(sealed, Mapping) and "key_id" in sealed:
            return self.customer_keys.key(UUID(str(sealed["key_id"])))
        phone = self.session_phone(session)
        return None if phone is None else self._customer_key(phone, session.id)

    def _seal_for_session(self, session: PaymentSession) -> Seal:
        """What seals a person's free text about this session's customer (a reason, evidence)
        under their key; once the key is destroyed, the text is not recorded at all."""
        key = self._session_key(session)
        return _seal_nothing if key is None else self._sealer(key)

    def _seal_for_payment(self, payment: Payment) -> Seal:
        """As ``_seal_for_session``, for the customer of the payment's session."""
        if payment.session_id is None:  # a payment always has its session; without one, no key to use
            return _seal_nothing
        try:
            session: PaymentSession = self._get(PaymentSession, payment.session_id)
        except NotFound:  # a payment always has its session; without one there is no key to use
            return _seal_nothing
        return self._seal_for_session(session)

    def opened_text(self, sealed: Mapping[str, Any] | None, name: str) -> str | None:
        """A sealed free-text field opened: None when nothing was given, ``erased`` once the
        customer's key is destroyed."""
        if sealed is None:
            return None
        opened = self.open_personal(sealed)
        return ERASED if opened is None else opened.get(name)

    def cancel_reason(self, session: PaymentSession) -> str | None:
        """The reason a cancelled session was given (``erased`` once its customer was erased)."""
        return self.opened_text(session.cancel_personal, "reason")

    def dispute_evidence(self, dispute: Dispute) -> dict[str, str]:
        """The dispute's staged (or submitted) evidence opened; each field ``erased`` once the
        customer was erased."""
        if dispute.evidence_personal is None:
            return {}
        opened = self.open_personal(dispute.evidence_personal)
        if opened is None:
            return dict.fromkeys(dispute.evidence_fields, ERASED)
        return dict(opened.get("evidence") or {})

    def _session_customer_id(self, session: PaymentSession) -> UUID | None:
        if session.customer_id is not None:
            return session.customer_id
        key = self._session_key(session)
        return None if key is None else key.customer_id

    # -- erasure ------------------------------------------------------------------------------

    def erase_customer(self, command_id: str, *, phone: str, erased_by: str, reason: str) -> Erasure:
        """Erase what is held about this phone: record ``customer.erased`` on its customer (and on
        the customer remembered under the phone-derived id from before pseudonyms, if any), then
        destroy the data key and scrub the side tables. Idempotent by command id; erasing a phone
        nothing is held about records nothing (``erased``: false)."""
        phone = check_phone(phone)
        check_text("erased_by", erased_by, max_length=100)
        check_text("reason", reason, max_length=500)
        held = self.customer_keys.find(self._lookup_hash(phone))
        legacy_id = self._legacy_customer_id(phone)

        def decide() -> tuple[Sequence[Aggregate], dict[str, Any]]:
            now = self.clock.now()
            ids = [held.customer_id] if held is not None else []
            if legacy_id not in ids and self._find_customer_by_id(legacy_id) is not None:
                ids.append(legacy_id)
            changed: list[Aggregate] = []
            for customer_id in ids:
                customer = self._find_customer_by_id(customer_id) or Customer.register(customer_id)
                customer.erase(erased_by=erased_by, reason=reason, now=now)
                if customer.pending_events:
                    changed.append(customer)
            return changed, {"customer_ids": [str(i) for i in ids], "erased": bool(ids),
                             "erased_at": now.isoformat()}

        request = {"phone": self._lookup_hash(phone), "erased_by": erased_by, "reason": reason}
        result = self._execute(command_id, "erase_customer", request,
                               held.customer_id if held is not None else legacy_id, decide)
        velocity_keys = [self.keyed_hash("velocity", "phone", phone)]
        scrubbed = []
        for customer_id in (UUID(i) for i in result.result["customer_ids"]):
            keys = [*velocity_keys, self.keyed_hash("velocity", "customer", customer_id)]
            scrubbed.append(self.customer_keys.destroy(customer_id, phone=phone, velocity_keys=keys))
        if not result.result["customer_ids"]:  # nothing held, but the mailbox may still have the phone
            scrubbed.append(self.customer_keys.destroy(uuid4(), phone=phone, velocity_keys=velocity_keys))
        return Erasure(result, tuple(scrubbed))

    # -- subject access -----------------------------------------------------------------------

    def export_customer(self, phone: str) -> dict[str, Any]:
        """Everything held about this phone: the customer, identity checks on file, each session
        sealed under the customer's key with its personal data opened, and the payments of those
        sessions. After an erasure nothing links the phone to anything: ``held`` is false."""
        phone = check_phone(phone)
        held = self.customer_keys.find(self._lookup_hash(phone))
        customers = []
        legacy = self._find_customer_by_id(self._legacy_customer_id(phone))
        if held is not None:
            customer = self._find_customer_by_id(held.customer_id)
            customers.append(_customer_export(held.customer_id, customer))
        if legacy is not None and legacy.erased_at is None:
            customers.append(_customer_export(legacy.id, legacy))
        sessions = []
        if held is not None:
            for session_id in self.customer_keys.sessions_of(held.customer_id):
                exported = self._session_export(session_id)
                if exported is not None:
                    sessions.append(exported)
        return {
            "phone": phone,
            "held": held is not None or bool(customers),
            "customer_id": str(held.customer_id) if held is not None else None,
            "data_key_created_at": (
                created.isoformat() if held is not None
                and (created := self.customer_keys.key_created_at(held.customer_id)) else None),
            "customers": customers,
            "sessions": sessions,
        }

    def _session_export(self, session_id: UUID) -> dict[str, Any] | None:
        events = list(self.repository.event_store.get(session_id))
        if not events:
            return None
        session: PaymentSession = self._fold(events)
        if not isinstance(session, PaymentSession):
            return None
        personal = self.session_personal(session) or {}
        opened_from = []
        payment_ids: list[UUID] = []
        for e in events:
            if isinstance(e, PaymentSession.LinkOpened):
                seen = self.open_personal(e.personal) or {}
                opened_from.append({"at": e.timestamp.isoformat(), "ip": seen.get("ip"),
                                    "user_agent": seen.get("user_agent")})
            elif isinstance(e, PaymentSession.PaymentMethodAttached):
                payment_ids.append(e.payment_id)
        payments = []
        for payment_id in payment_ids:
            exported = self._payment_export(payment_id)
            if exported is not None:  # else a payment not saved with its session's attach: nothing held
                payments.append(exported)
        return {
            "session_id": str(session.id), "merchant_id": str(session.merchant_id),
            "opened_at": session.created_on.isoformat(), "status": session.status,
            "amount_minor": session.amount_minor, "currency": session.currency,
            "phone": personal.get("phone"), "metadata": personal.get("metadata") or {},
            "order_reference": session.order_reference, "line_items": session.line_items,
            "voice_platform": session.voice_platform, "conversation_id": session.conversation_id,
            "cancel_reason": self.cancel_reason(session),
            "link_opened": opened_from, "payments": payments,
        }

    def _payment_export(self, payment_id: UUID) -> dict[str, Any] | None:
        """A payment of the customer's, with the words people gave about it opened: the void's
        and each refund's reason, each dispute's evidence."""
        events = list(self.repository.event_store.get(payment_id))
        if not events:
            return None
        payment: Payment = self._fold(events)
        voided_reason = None
        refunds, disputes = [], []
        for e in events:
            if isinstance(e, Payment.Voided):
                voided_reason = self.opened_text(e.personal, "reason")
            elif isinstance(e, Payment.Refunded):
                refunds.append({"refund_id": e.refund_id, "amount_minor": e.amount_minor,
                                "at": e.timestamp.isoformat(), "reason": self.opened_text(e.personal, "reason")})
            elif isinstance(e, Payment.DisputeOpened):
                try:
                    dispute: Dispute = self._get(Dispute, UUID(e.dispute_id))
                except NotFound:
                    continue
                disputes.append({"dispute_id": str(dispute.id), "status": dispute.status, "reason": dispute.reason,
                                 "evidence": self.dispute_evidence(dispute)})
        return {
            "payment_id": str(payment.id), "status": payment.status, "amount_minor": payment.amount_minor,
            "currency": payment.currency, "card_brand": payment.card_brand, "card_last4": payment.card_last4,
            "captured_minor": payment.captured_minor, "refunded_minor": payment.refunded_minor,
            "created_at": payment.created_on.isoformat(), "void_reason": voided_reason, "refunds": refunds,
            "disputes": disputes,
        }


def _customer_export(customer_id: UUID, customer: Customer | None) -> dict[str, Any]:
    if customer is None:
        return {"customer_id": str(customer_id), "identity_verified_at": None, "identity_verifier": None,
                "erased_at": None}
    return {
        "customer_id": str(customer_id),
        "identity_verified_at": customer.identity_verified_at.isoformat() if customer.identity_verified_at else None,
        "identity_verifier": customer.identity_verifier,
        "erased_at": customer.erased_at.isoformat() if customer.erased_at else None,
    }

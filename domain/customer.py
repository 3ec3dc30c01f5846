"""The Customer aggregate: what the platform remembers about a payer across purchases, keyed by
their phone number, so a customer who passed the identity check is not asked again.

It holds no phone number: the application derives the customer's id from a keyed hash of it
(``Ledger._customer_id``), so only someone holding the hash key can tell whose record it is.
A remembered check is valid for ``reuse_for`` after it passed (the business chooses how long).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from uuid import UUID

from eventsourcing.domain import Aggregate, event

from domain.values import check_text


class Customer(Aggregate):
    class Registered(Aggregate.Created):
        pass

    class IdentityVerified(Aggregate.Event):
        verifier: str
        session_id: UUID
        verified_at: datetime

    # A customer belongs to no merchant: merchants never read another's customers (row-level
    # security keys on merchant_id, and a customer's events have none).
    merchant_id = None

    @classmethod
    def register(cls, customer_id: UUID) -> Customer:
        return cls._create(cls.Registered, id=customer_id)

    @event(Registered)
    def __init__(self) -> None:
        self.identity_verified_at: datetime | None = None
        self.identity_verifier: str | None = None

    def record_identity_verified(self, *, verifier: str, session_id: UUID, now: datetime) -> None:
        assert now.tzinfo is not None, "times are timezone-aware"
        self._identity_verified(verifier=check_text("verifier", verifier, max_length=50),
                                session_id=session_id, verified_at=now)

    @event(IdentityVerified)
    def _identity_verified(self, verifier: str, session_id: UUID, verified_at: datetime) -> None:
        self.identity_verified_at = verified_at
        self.identity_verifier = verifier

    def identity_on_file(self, now: datetime, reuse_for: timedelta) -> bool:
        """Whether a passed identity check may stand in for a new one at ``now``."""
        verified = self.identity_verified_at
        return verified is not None and verified <= now < verified + reuse_for

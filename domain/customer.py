"""The Customer aggregate: what the platform remembers about a payer across purchases, so a
customer who passed the identity check is not asked again, and the customer's erasure.

It holds no phone number: its id is the customer's pseudonym (application/privacy.py: the id of
the customer's data key's holder, found through a keyed hash of the phone; customers remembered
before pseudonyms existed keep the id derived from that hash). A remembered check is valid for
``reuse_for`` after it passed (the business chooses how long). An erased customer remembers no
check: after an erasure the same phone starts as a stranger.
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

    class Erased(Aggregate.Event):
        """The customer's personal data was erased on request: their data key destroyed (who asked
        for it, when, the reason they gave)."""

        erased_by: str
        erased_at: datetime
        reason: str

    # A customer belongs to no merchant: merchants never read another's customers (row-level
    # security keys on merchant_id, and a customer's events have none).
    merchant_id = None

    @classmethod
    def register(cls, customer_id: UUID) -> Customer:
        return cls._create(cls.Registered, id=customer_id)

    # Customers snapshotted before erasure existed were not erased.
    erased_at: datetime | None = None

    @event(Registered)
    def __init__(self) -> None:
        self.identity_verified_at: datetime | None = None
        self.identity_verifier: str | None = None
        self.erased_at = None

    def erase(self, *, erased_by: str, reason: str, now: datetime) -> None:
        """Record the erasure; erasing again records nothing (the first one stands)."""
        assert now.tzinfo is not None, "times are timezone-aware"
        if self.erased_at is not None:
            return
        self._erased(erased_by=check_text("erased_by", erased_by, max_length=100),
                     erased_at=now, reason=check_text("reason", reason, max_length=500))

    @event(Erased)
    def _erased(self, erased_by: str, erased_at: datetime, reason: str) -> None:
        self.erased_at = erased_at
        self.identity_verified_at = None
        self.identity_verifier = None

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
        return self.erased_at is None and verified is not None and verified <= now < verified + reuse_for

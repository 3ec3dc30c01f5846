"""The ApiKey aggregate: who may call the API, in which role, for which merchant.

Only a keyed hash of the secret is ever recorded; the key itself is shown once to its owner.
Issuing and revoking are events, so the audit trail says who could act when.
"""

from __future__ import annotations

from uuid import UUID

from eventsourcing.domain import Aggregate, event

from domain.errors import InvalidField, InvalidTransition
from domain.values import check_text

ROLES = ("merchant", "analyst", "compliance", "admin")


class ApiKey(Aggregate):
    class Issued(Aggregate.Created):
        role: str
        merchant_id: UUID | None
        key_hash: str
        label: str

    class Revoked(Aggregate.Event):
        reason: str

    @classmethod
    def issue(
        cls, key_id: UUID, *, role: str, merchant_id: UUID | None, key_hash: str, label: str = ""
    ) -> ApiKey:
        if role not in ROLES:
            raise InvalidField(f"role must be one of {', '.join(ROLES)}", field="role")
        if (role == "merchant") != (merchant_id is not None):
            raise InvalidField(
                "a merchant key needs a merchant id, and only a merchant key has one", field="merchant_id"
            )
        return cls._create(
            cls.Issued,
            id=key_id,
            role=role,
            merchant_id=merchant_id,
            key_hash=check_text("key_hash", key_hash, max_length=128),
            label=check_text("label", label, max_length=100, required=False),
        )

    @event(Issued)
    def __init__(self, *, role: str, merchant_id: UUID | None, key_hash: str, label: str) -> None:
        self.role = role
        self.merchant_id = merchant_id
        self.key_hash = key_hash
        self.label = label
        self.revoked = False

    def revoke(self, reason: str) -> None:
        if self.revoked:
            raise InvalidTransition("API key", "revoke", "revoked")
        self._revoked(reason=check_text("reason", reason, max_length=200))

    @event(Revoked)
    def _revoked(self, reason: str) -> None:
        self.revoked = True

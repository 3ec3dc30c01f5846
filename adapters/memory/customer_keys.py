"""Customers' data keys in memory, for tests and examples (the PostgreSQL adapter is
adapters/postgres/customer_keys.py): the same cryptography, nothing kept past the process."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from uuid import UUID, uuid4

from adapters.personal_data import KeyCipher, SealingCustomerKeys
from application.privacy import CustomerKey, Scrubbed


@dataclass
class _Row:
    key_id: UUID
    customer_id: UUID
    lookup_hash: str | None
    wrapped: bytes | None
    master_key_id: str | None
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    sessions: set[UUID] = field(default_factory=set)


class InMemoryCustomerKeys(SealingCustomerKeys):
    def __init__(self, cipher: KeyCipher) -> None:
        self._cipher = cipher
        self._rows: dict[UUID, _Row] = {}
        self._lock = threading.Lock()

    def _key(self, row: _Row | None) -> CustomerKey | None:
        if row is None or row.wrapped is None:
            return None
        assert row.master_key_id is not None, "a live key names its master key"
        return CustomerKey(row.key_id, row.customer_id, self._cipher.unwrap(row.master_key_id, row.key_id, row.wrapped))

    def key_for(self, lookup_hash: str, *, session_id: UUID | None = None, saved_after: bool = False) -> CustomerKey:
        with self._lock:
            row = next((r for r in self._rows.values() if r.lookup_hash == lookup_hash), None)
            if row is None:
                key_id = uuid4()
                row = self._rows[key_id] = _Row(key_id, uuid4(), lookup_hash,
                                                self._cipher.wrap(key_id, KeyCipher.new_key_material()),
                                                self._cipher.master_key_id)
            if session_id is not None:
                row.sessions.add(session_id)
        key = self._key(row)
        assert key is not None
        return key

    def find(self, lookup_hash: str) -> CustomerKey | None:
        return self._key(next((r for r in self._rows.values() if r.lookup_hash == lookup_hash), None))

    def key(self, key_id: UUID) -> CustomerKey | None:
        return self._key(self._rows.get(key_id))

    def sessions_of(self, customer_id: UUID) -> list[UUID]:
        return sorted({s for r in self._rows.values() if r.customer_id == customer_id for s in r.sessions})

    def key_created_at(self, customer_id: UUID) -> datetime | None:
        return min((r.created_at for r in self._rows.values() if r.customer_id == customer_id), default=None)

    def destroy(self, customer_id: UUID, *, phone: str, velocity_keys: Sequence[str]) -> Scrubbed:
        destroyed = 0
        with self._lock:
            for row in self._rows.values():
                if row.customer_id == customer_id and row.wrapped is not None:
                    row.wrapped, row.lookup_hash = None, None
                    destroyed += 1
        return Scrubbed(destroyed, tuple(self.sessions_of(customer_id)), {})

"""What the read side may show of an event: personal data masked, secrets' hashes dropped; and
the port through which a projection opens personal data sealed under a customer's key (given to
each projection and read view by the composition root, api/bootstrap.py: never a process global,
so two ledgers in one process never open each other's data).

Events carry personal data sealed (``personal``: the key's id and ciphertext, application/
privacy.py) beside the customer's pseudonymous ``customer_id``; both pass through as they are
(ciphertext under a key that erasure destroys). Envelopes from before sealing existed carry
``customer_phone``, masked here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from domain.values import mask_phone

PHONE_FIELDS = frozenset({"customer_phone"})
# Keyed hashes of link tokens and one-time codes are not personal data, but nobody reading
# the audit trail needs them and they would help an offline guesser.
# A card's fingerprint is stable across tokenizations and merchants: only the risk rules need it,
# a reader of the audit trail or a merchant's timeline must not be able to link cards by it.
SECRET_FIELDS = frozenset({"link_token_hash", "code_hash", "key_hash", "card_fingerprint"})


def mask_event_data(data: dict[str, Any]) -> dict[str, Any]:
    masked = {}
    for key, value in data.items():
        if key in PHONE_FIELDS and isinstance(value, str):
            masked[key] = mask_phone(value)
        elif key in SECRET_FIELDS:
            masked[key] = "***"
        else:
            masked[key] = value
    return masked


class PersonalDataReader(Protocol):
    """Opens sealed personal data on the read side (adapters/postgres/customer_keys.py), with the
    projection's own cursor; None for each value whose key is destroyed (or that is None)."""

    def open_many(self, cur: Any, sealed: Sequence[Mapping[str, Any] | None]) -> list[dict[str, Any] | None]: ...


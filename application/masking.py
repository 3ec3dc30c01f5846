"""What the read side may show of an event: personal data masked, secrets' hashes dropped."""

from __future__ import annotations

from typing import Any

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

"""Keyed hashes (HMAC-SHA256 under the platform's hash key): of one-time codes, link tokens, API
key secrets, request bodies for idempotency, velocity keys, and the merchants' webhook signing
secrets. One construction, so every process that holds the key derives the same value."""

from __future__ import annotations

import hashlib
import hmac


def keyed_hash(key: bytes, purpose: str, *parts: object) -> str:
    """Hex HMAC-SHA256 of ``purpose:part:part...``; the purpose keeps uses apart."""
    message = ":".join([purpose, *map(str, parts)]).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()

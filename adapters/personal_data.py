"""The cryptography of customers' data keys (crypto-shredding): a random 256-bit AES-GCM key per
customer, kept wrapped (AES-GCM) under a master key, and the sealing of personal data under it.

The master key is derived with HKDF from the deployment's hash key (``ECHOTRANSACT_HASH_KEY``,
always set) for this purpose alone, so it never equals a key used for anything else. A sealed
value is ``{"key_id": <uuid>, "sealed": <base64 of nonce + ciphertext>}``; the key id is bound in
as associated data, so a ciphertext moved under another customer's key does not open.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Mapping
from typing import Any
from uuid import UUID

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from application.privacy import CustomerKey, CustomerKeys

_NONCE_BYTES = 12
_KEY_BYTES = 32
_MASTER_INFO = b"echotransact customer data keys v1"
_json = msgspec.json.Encoder(order="sorted")


def master_key(hash_key: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=_KEY_BYTES, salt=None, info=_MASTER_INFO).derive(hash_key)


class KeyCipher:
    """Wraps and unwraps data keys under the master key; seals and opens personal data."""

    def __init__(self, hash_key: bytes) -> None:
        self._master = AESGCM(master_key(hash_key))

    @staticmethod
    def new_key_material() -> bytes:
        return secrets.token_bytes(_KEY_BYTES)

    def wrap(self, key_id: UUID, material: bytes) -> bytes:
        nonce = secrets.token_bytes(_NONCE_BYTES)
        return nonce + self._master.encrypt(nonce, material, key_id.bytes)

    def unwrap(self, key_id: UUID, wrapped: bytes) -> bytes:
        wrapped = bytes(wrapped)
        return self._master.decrypt(wrapped[:_NONCE_BYTES], wrapped[_NONCE_BYTES:], key_id.bytes)

    @staticmethod
    def seal(key: CustomerKey, data: Mapping[str, Any]) -> dict[str, Any]:
        nonce = secrets.token_bytes(_NONCE_BYTES)
        ciphertext = AESGCM(key.material).encrypt(nonce, _json.encode(dict(data)), key.key_id.bytes)
        return {"key_id": str(key.key_id), "sealed": base64.b64encode(nonce + ciphertext).decode()}

    @staticmethod
    def open_with(material: bytes, sealed: Mapping[str, Any]) -> dict[str, Any] | None:
        """The sealed data, or None when it does not open under this key (tampered, or another's)."""
        try:
            raw = base64.b64decode(sealed["sealed"])
            plain = AESGCM(material).decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], UUID(sealed["key_id"]).bytes)
        except (InvalidTag, ValueError, KeyError):
            return None
        opened: dict[str, Any] = msgspec.json.decode(plain)
        return opened


def key_id_of(sealed: Mapping[str, Any] | None) -> UUID | None:
    """The data key a sealed value needs (None for anything else: nothing, or legacy plain text)."""
    if not isinstance(sealed, Mapping) or "key_id" not in sealed:
        return None
    try:
        return UUID(str(sealed["key_id"]))
    except ValueError:
        return None


class SealingCustomerKeys(CustomerKeys):
    """Sealing and opening with a ``KeyCipher``, the same for every store of keys: a store gives
    ``_cipher`` and ``key``."""

    _cipher: KeyCipher

    def seal(self, key: CustomerKey, data: Mapping[str, Any]) -> dict[str, Any]:
        return self._cipher.seal(key, data)

    def open(self, sealed: Mapping[str, Any]) -> dict[str, Any] | None:
        key_id = key_id_of(sealed)
        key = self.key(key_id) if key_id is not None else None
        return None if key is None else self._cipher.open_with(key.material, sealed)

"""The cryptography of customers' data keys (crypto-shredding): a random 256-bit AES-GCM key per
customer, kept wrapped (AES-GCM) under a master key, and the sealing of personal data under it.

The master key is a key of its own (``ECHOTRANSACT_MASTER_KEY``), never derived from another, so
rotating the hash key or leaking it does not expose data keys. Each wrapped key records the id of
the master key that wrapped it (a keyed fingerprint, ``master_key_id``); ``MasterKeys`` unwraps
with whichever it names and wraps only under the current one, so a new master key is rolled out by
setting it, keeping the old one in ``ECHOTRANSACT_PREVIOUS_MASTER_KEYS`` and re-wrapping
(``echotransact customers rewrap``). Keys wrapped before 0026 were wrapped under a key derived
with HKDF from the hash key (``LEGACY_MASTER_KEY_ID``): still unwrapped, never used to wrap.

A sealed value is ``{"key_id": <uuid>, "sealed": <base64 of nonce + ciphertext>}``; the key id is
bound in as associated data, so a ciphertext moved under another customer's key does not open.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Mapping, Sequence
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
# The id recorded (migrations/0026) for data keys wrapped before master keys had their own setting.
LEGACY_MASTER_KEY_ID = "derived-from-hash-key"


def legacy_master_key(hash_key: bytes) -> bytes:
    """The master key of data keys wrapped before 0026: derived from the hash key. Only unwraps."""
    return HKDF(algorithm=hashes.SHA256(), length=_KEY_BYTES, salt=None, info=_MASTER_INFO).derive(hash_key)


def master_key_id(master: bytes) -> str:
    """A master key's id: a keyed fingerprint, which names the key without revealing it."""
    return "mk-" + hmac.new(master, b"echotransact master key id", hashlib.sha256).hexdigest()[:24]


class UnknownMasterKey(LookupError):
    """A data key was wrapped under a master key this process was not given (the variable named
    says where to put it)."""


class MasterKeys:
    """The current master key (wraps every new or re-wrapped data key) and the older ones that
    may still unwrap some, by id."""

    def __init__(self, current: bytes, previous: Sequence[bytes] = (), *, legacy_hash_key: bytes | None = None) -> None:
        self.current_id = master_key_id(current)
        self._current = AESGCM(current)
        self._by_id = {master_key_id(k): AESGCM(k) for k in previous}
        self._by_id[self.current_id] = self._current
        if legacy_hash_key is not None:
            self._by_id[LEGACY_MASTER_KEY_ID] = AESGCM(legacy_master_key(legacy_hash_key))

    def wrap(self, key_id: UUID, material: bytes) -> bytes:
        nonce = secrets.token_bytes(_NONCE_BYTES)
        return nonce + self._current.encrypt(nonce, material, key_id.bytes)

    def unwrap(self, master_id: str, key_id: UUID, wrapped: bytes) -> bytes:
        master = self._by_id.get(master_id)
        if master is None:
            raise UnknownMasterKey(f"data key {key_id} is wrapped under master key {master_id}: set it in"
                                   " ECHOTRANSACT_PREVIOUS_MASTER_KEYS until `echotransact customers rewrap` ran")
        wrapped = bytes(wrapped)
        return master.decrypt(wrapped[:_NONCE_BYTES], wrapped[_NONCE_BYTES:], key_id.bytes)


class KeyCipher:
    """Wraps and unwraps data keys under the master keys; seals and opens personal data."""

    def __init__(self, masters: MasterKeys) -> None:
        self.masters = masters

    @property
    def master_key_id(self) -> str:
        """The id of the master key that wraps (recorded beside each wrapped key)."""
        return self.masters.current_id

    @staticmethod
    def new_key_material() -> bytes:
        return secrets.token_bytes(_KEY_BYTES)

    def wrap(self, key_id: UUID, material: bytes) -> bytes:
        return self.masters.wrap(key_id, material)

    def unwrap(self, master_id: str, key_id: UUID, wrapped: bytes) -> bytes:
        return self.masters.unwrap(master_id, key_id, wrapped)

    @staticmethod
    def seal(key: CustomerKey, data: Mapping[str, Any]) -> dict[str, Any]:
        nonce = secrets.token_bytes(_NONCE_BYTES)
        ciphertext = AESGCM(key.material).encrypt(nonce, _json.encode(dict(data)), key.key_id.bytes)
        return {"key_id": str(key.key_id), "sealed": base64.b64encode(nonce + ciphertext).decode()}

    @staticmethod
    def open_with(material: bytes, sealed: Mapping[str, Any]) -> dict[str, Any] | None:
        """The sealed data, or None when it does not open under this key (tampered, or another's)."""
        try:
            key_id = UUID(sealed["key_id"])
        except (ValueError, KeyError, TypeError):
            return None
        return KeyCipher.open_under(AESGCM(material), key_id, sealed)

    @staticmethod
    def open_under(key: AESGCM, key_id: UUID, sealed: Mapping[str, Any]) -> dict[str, Any] | None:
        """``open_with`` for a caller that keeps the key's AESGCM object and id across many values
        (a batch of events sealed under a few customers' keys: making the object and parsing the
        id were half the cost of an opening)."""
        try:
            raw = base64.b64decode(sealed["sealed"])
            plain = key.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], key_id.bytes)
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

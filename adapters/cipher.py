"""The event store's cipher: the eventsourcing library's AES-GCM (``AESCipher``, same key, same
layout of nonce, tag and data), with its AESGCM object made once instead of at every call.

Making it was more than half the cost of deciphering an envelope or a stored event (about 1 of
2 microseconds), paid by every aggregate load, every relayed message and every replayed event.
Named by ``CIPHER_TOPIC`` for the event store and used by ``api.bootstrap.envelope_opener``.
"""

from __future__ import annotations

import base64

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from eventsourcing.cryptography import AESCipher
from eventsourcing.utils import Environment

_NONCE = 12
_TAG = 16


class KeptKeyAESCipher(AESCipher):
    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self._aesgcm = AESGCM(self.key)

    @classmethod
    def from_key(cls, key: bytes) -> KeptKeyAESCipher:
        return cls(Environment("CIPHER", {cls.CIPHER_KEY: base64.b64encode(key).decode()}))

    def encrypt(self, plaintext: bytes) -> bytes:
        nonce = AESCipher.random_bytes(_NONCE)
        sealed = self._aesgcm.encrypt(nonce, plaintext, None)
        return nonce + sealed[-_TAG:] + sealed[:-_TAG]  # the tag in front, as the library puts it

    def decrypt(self, ciphertext: bytes) -> bytes:
        if len(ciphertext) < _NONCE + _TAG:
            raise ValueError("Damaged cipher text: shorter than a nonce and a tag")
        try:
            return self._aesgcm.decrypt(
                ciphertext[:_NONCE], ciphertext[_NONCE + _TAG:] + ciphertext[_NONCE:_NONCE + _TAG], None
            )
        except InvalidTag as error:
            raise ValueError("Invalid cipher tag") from error

"""The card vault's cipher (adapters/postgres/vault.py) opens what the vault stored before it moved
from pycryptodome to ``cryptography``: cards already in a database must still decrypt."""

from __future__ import annotations

import pytest

from adapters.postgres.vault import seal, unseal

KEY = bytes(range(32))
TOKEN = "card_abcdefghijklmnopqrstuvwxyzabcd"
NONCE = bytes.fromhex("000102030405060708090a0b")  # the nonce column: 12 bytes
PLAINTEXT = b'{"number":"4242424242424242","exp_month":12,"exp_year":2031}'
# The ciphertext column as the pycryptodome vault wrote it, computed with pycryptodome before it was
# removed: AES.new(KEY, AES.MODE_GCM, nonce=NONCE), update(TOKEN) as associated data, then
# encrypt_and_digest(PLAINTEXT) -> (ciphertext, tag), stored as ciphertext + tag.
LEGACY_CIPHERTEXT = bytes.fromhex(
    "3c20b86ea887a769af7bb5bf83dd4a59b1e2b500c24f6d480a53d7a7314b65ca714fc393c1b57aba4e954dc1aae25048b120"
    "05ec28f499e80fa41b6445239cb437747136c9f5d5ee5891af74"
)
TAG_BYTES = 16


def test_a_card_sealed_by_the_old_vault_opens() -> None:
    assert unseal(KEY, TOKEN, NONCE, LEGACY_CIPHERTEXT) == PLAINTEXT


def test_the_stored_layout_is_unchanged_ciphertext_then_tag() -> None:
    sealed = seal(KEY, TOKEN, NONCE, PLAINTEXT)
    assert sealed == LEGACY_CIPHERTEXT
    assert len(sealed) == len(PLAINTEXT) + TAG_BYTES  # GCM adds no padding; the tag comes last


@pytest.mark.parametrize(
    ("key", "token", "nonce", "ciphertext"),
    [
        (b"w" * 32, TOKEN, NONCE, LEGACY_CIPHERTEXT),  # another key
        (KEY, "card_" + "z" * 30, NONCE, LEGACY_CIPHERTEXT),  # copied to another token's row
        (KEY, TOKEN, bytes(12), LEGACY_CIPHERTEXT),  # another row's nonce
        (KEY, TOKEN, NONCE, bytes([LEGACY_CIPHERTEXT[0] ^ 1]) + LEGACY_CIPHERTEXT[1:]),  # a changed byte
        (KEY, TOKEN, NONCE, LEGACY_CIPHERTEXT[:-TAG_BYTES]),  # the tag cut off
    ],
)
def test_anything_but_the_sealed_row_fails_as_a_value_error(
    key: bytes, token: str, nonce: bytes, ciphertext: bytes
) -> None:
    with pytest.raises(ValueError):
        unseal(key, token, nonce, ciphertext)

"""The card vault: the only place a card number is kept, AES-GCM encrypted under the vault's own key
in the ``card_vault`` table, and referred to everywhere else by a token (plus brand and last four).

Tokens are random; the same number tokenized twice gives two tokens. The one exception is a
retried submission: ``tokenize(..., idempotency_key=...)`` derives the token from the key, so a
form submitted twice yields one token (and the ledger's attach command, keyed by the same form,
sees the same request). Tokenizing also returns a fingerprint, an HMAC of the number under a key
derived from the vault key (not stored here): the same card gives the same fingerprint whatever
its token, which is what card velocity in the risk rules counts on. The read side masks it.

Tokens are letters only (``card_`` + 30 lowercase letters, about 141 bits), so no token can look
like a card number to a scanner. The CVV never reaches this module.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
from dataclasses import dataclass, field
from datetime import datetime

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from psycopg_pool import ConnectionPool

from application.errors import IdempotencyKeyReused, NotFound
from domain.errors import InvalidPaymentMethod

TOKEN_PREFIX = "card_"
_TOKEN_LETTERS = 30
_ALPHABET = string.ascii_lowercase
_NONCE_BYTES = 12
_MAX_YEARS_AHEAD = 20

# (brand, IIN ranges as (low, high) inclusive over the first len(low) digits, valid lengths).
# Ordered: a Discover range lies inside UnionPay's 62, so Discover is checked first.
_BRANDS: tuple[tuple[str, tuple[tuple[str, str], ...], frozenset[int]], ...] = (
    ("amex", (("34", "34"), ("37", "37")), frozenset({15})),
    ("visa", (("4", "4"),), frozenset({13, 16, 19})),
    ("mastercard", (("51", "55"), ("2221", "2720")), frozenset({16})),
    ("discover", (("6011", "6011"), ("644", "649"), ("65", "65"), ("622126", "622925")),
     frozenset(range(16, 20))),
    ("jcb", (("3528", "3589"),), frozenset(range(16, 20))),
    ("diners", (("300", "305"), ("3095", "3095"), ("36", "36"), ("38", "39")), frozenset(range(14, 20))),
    ("unionpay", (("62", "62"), ("81", "81")), frozenset(range(16, 20))),
)


@dataclass(frozen=True)
class VaultedCard:
    """What the rest of the system may know about a card."""

    token: str
    brand: str
    last4: str
    # A keyed hash of the number, the same for the same card every time it is entered (tokens
    # are new each time): what card velocity counts on. It reveals nothing about the number
    # without the vault key.
    fingerprint: str = ""


@dataclass(frozen=True)
class CardDetails:
    """A detokenized card, for the processor adapter only. The number never shows in a repr."""

    number: str = field(repr=False)
    exp_month: int
    exp_year: int
    brand: str
    last4: str


class _Sealed(msgspec.Struct, frozen=True):
    number: str
    exp_month: int
    exp_year: int


_encode = msgspec.json.Encoder()
_decode = msgspec.json.Decoder(_Sealed)


def _letters(digest: bytes) -> str:
    """A keyed digest as lowercase letters (about 141 bits in 30 of them)."""
    value = int.from_bytes(digest)
    letters = []
    for _ in range(_TOKEN_LETTERS):
        value, index = divmod(value, len(_ALPHABET))
        letters.append(_ALPHABET[index])
    return "".join(letters)


def luhn_valid(digits: str) -> bool:
    if not digits.isascii() or not digits.isdigit():
        return False
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def card_brand(number: str) -> str:
    """The brand by IIN range, or ``unknown``; a known brand with a wrong length is not a card."""
    for brand, ranges, lengths in _BRANDS:
        if any(low <= number[: len(low)] <= high for low, high in ranges):
            if len(number) not in lengths:
                raise InvalidPaymentMethod("card number is not valid", reason="invalid_number")
            return brand
    return "unknown"


def normalize_number(raw: str) -> str:
    """Digits only: spaces and dashes between groups are allowed, anything else is not."""
    number = raw.replace(" ", "").replace("-", "") if isinstance(raw, str) else ""
    if not (number.isascii() and number.isdigit() and 12 <= len(number) <= 19 and luhn_valid(number)):
        raise InvalidPaymentMethod("card number is not valid", reason="invalid_number")
    return number


def check_expiry(exp_month: int, exp_year: int, now: datetime) -> tuple[int, int]:
    """A card is valid through the last day of its expiry month (UTC)."""
    if exp_year < 100:
        exp_year += 2000
    if not 1 <= exp_month <= 12 or exp_year > now.year + _MAX_YEARS_AHEAD:
        raise InvalidPaymentMethod("expiry date is not valid", reason="invalid_expiry")
    if (exp_year, exp_month) < (now.year, now.month):
        raise InvalidPaymentMethod("card has expired", reason="expired")
    return exp_month, exp_year


def seal(key: bytes, token: str, nonce: bytes, plaintext: bytes) -> bytes:
    """AES-GCM under ``key``, with the token as associated data: a ciphertext copied to another
    row does not open. The stored layout is the ciphertext followed by the 16-byte tag (the
    ``ciphertext`` column; the 12-byte nonce has a column of its own), which is what
    ``AESGCM.encrypt`` returns and what the vault has always stored."""
    return AESGCM(key).encrypt(nonce, plaintext, token.encode())


def unseal(key: bytes, token: str, nonce: bytes, ciphertext: bytes) -> bytes:
    """The plaintext of ``seal``'s output. ValueError if the key, token or nonce is not the one
    it was sealed with, or a byte was changed (ValueError, as the vault raised before it used
    ``cryptography``; its own InvalidTag is no ValueError)."""
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, token.encode())
    except InvalidTag:
        raise ValueError("the vaulted card does not open: wrong key, or not this token's ciphertext") from None


class CardVault:
    def __init__(self, database: str | ConnectionPool, key: bytes) -> None:
        if len(key) not in (16, 24, 32):
            raise ValueError("the vault key must be 16, 24 or 32 bytes")
        self._key = key
        # A sub-key for deriving tokens from idempotency keys, so tokens reveal nothing about
        # the encryption key.
        self._token_key = hmac.new(key, b"echotransact-vault-token", hashlib.sha256).digest()
        self._fingerprint_key = hmac.new(key, b"echotransact-vault-fingerprint", hashlib.sha256).digest()
        self._owns_pool = isinstance(database, str)
        self.pool = (
            ConnectionPool(database, min_size=1, max_size=4, kwargs={"autocommit": True}, max_idle=2.0,
                           open=True)
            if isinstance(database, str) else database
        )

    def close(self) -> None:
        if self._owns_pool:
            self.pool.close()

    def tokenize(
        self, number: str, exp_month: int, exp_year: int, *, now: datetime,
        idempotency_key: str | None = None,
    ) -> VaultedCard:
        """Validate (Luhn, brand and length, expiry), encrypt and store; return the token.

        Raises InvalidPaymentMethod ("card number is not valid", "card has expired", "expiry date
        is not valid"); with an idempotency key used before for another card, IdempotencyKeyReused.
        """
        digits = normalize_number(number)
        brand = card_brand(digits)
        exp_month, exp_year = check_expiry(exp_month, exp_year, now)
        sealed = _Sealed(digits, exp_month, exp_year)
        token = self._token_for(idempotency_key) if idempotency_key else self._random_token()
        nonce, ciphertext = self._seal(token, sealed)
        with self.pool.connection() as conn:
            inserted = conn.execute(
                "INSERT INTO card_vault (token, ciphertext, nonce, brand, last4, created_at)"
                " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (token) DO NOTHING RETURNING token",
                (token, ciphertext, nonce, brand, digits[-4:], now),
            ).fetchone()
            if inserted is None:
                row = conn.execute(
                    "SELECT ciphertext, nonce FROM card_vault WHERE token = %s", (token,)
                ).fetchone()
                assert row is not None, "retention deletes only rows a day old, never one just written"
                if not self._same_card(self._open(token, bytes(row[1]), bytes(row[0])), sealed):
                    raise IdempotencyKeyReused("this form was already submitted with another card")
        # Letters only, like tokens: no run of digits a card scanner could mistake for a number.
        fingerprint = "fp_" + _letters(hmac.new(self._fingerprint_key, digits.encode(), hashlib.sha256).digest())
        return VaultedCard(token, brand, digits[-4:], fingerprint)

    def detokenize(self, token: str) -> CardDetails:
        with self.pool.connection() as conn:
            row = conn.execute(
                "SELECT ciphertext, nonce, brand, last4 FROM card_vault WHERE token = %s", (token,)
            ).fetchone()
        if row is None:
            raise NotFound("no card for this token")
        sealed = self._open(token, bytes(row[1]), bytes(row[0]))
        return CardDetails(sealed.number, sealed.exp_month, sealed.exp_year, row[2], row[3])

    # -- internals ---------------------------------------------------------------------------

    def _random_token(self) -> str:
        return TOKEN_PREFIX + "".join(secrets.choice(_ALPHABET) for _ in range(_TOKEN_LETTERS))

    def _token_for(self, idempotency_key: str) -> str:
        return TOKEN_PREFIX + _letters(hmac.new(self._token_key, idempotency_key.encode(), hashlib.sha256).digest())

    def _seal(self, token: str, sealed: _Sealed) -> tuple[bytes, bytes]:
        nonce = secrets.token_bytes(_NONCE_BYTES)
        return nonce, seal(self._key, token, nonce, _encode.encode(sealed))

    def _open(self, token: str, nonce: bytes, ciphertext: bytes) -> _Sealed:
        return _decode.decode(unseal(self._key, token, nonce, ciphertext))

    @staticmethod
    def _same_card(stored: _Sealed, given: _Sealed) -> bool:
        return hmac.compare_digest(stored.number, given.number) and (
            (stored.exp_month, stored.exp_year) == (given.exp_month, given.exp_year)
        )

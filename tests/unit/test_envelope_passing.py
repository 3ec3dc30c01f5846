"""What the relay sends is what it would have sent by opening each envelope fully: the
PassingEnvelope (application/envelope.py) encodes to the same bytes, and the event store's cipher
with its kept AESGCM (adapters/cipher.py) reads and writes the library's AESCipher layout."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import msgspec
import pytest
from eventsourcing.cryptography import AESCipher
from eventsourcing.utils import Environment
from hypothesis import given
from hypothesis import strategies as st

from adapters.cipher import KeptKeyAESCipher
from application.envelope import EnvelopeOpener, EventEnvelope, PassingEnvelope, encode

KEY = bytes(range(32))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)

envelopes = st.builds(
    EventEnvelope,
    event_id=st.uuids(), aggregate_id=st.uuids(),
    aggregate_type=st.sampled_from(["payment_session", "payment", "merchant"]),
    version=st.integers(1, 10_000), position=st.none(),
    event_type=st.text(min_size=1, max_size=30),
    occurred_at=st.datetimes(timezones=st.just(UTC)),
    merchant_id=st.none() | st.uuids(),
    data=st.dictionaries(st.text(max_size=12), json_values, max_size=6),
    trace_context=st.none() | st.text(max_size=55),
)


def test_the_passing_envelope_has_the_fields_of_the_event_envelope_in_order() -> None:
    assert [f for f in PassingEnvelope.__struct_fields__] == [f for f in EventEnvelope.__struct_fields__]


@given(envelopes, st.integers(1, 2**62))
def test_a_passed_envelope_encodes_as_the_opened_one_would(envelope: EventEnvelope, position: int) -> None:
    opener = EnvelopeOpener(KeptKeyAESCipher.from_key(KEY).decrypt)
    stored = KeptKeyAESCipher.from_key(KEY).encrypt(encode(envelope))
    passing = opener.passing(stored)
    assert passing.event_id == str(envelope.event_id)
    assert encode(msgspec.structs.replace(passing, position=position)) == encode(
        msgspec.structs.replace(opener(stored), position=position))
    assert opener(stored) == envelope


def _library_cipher() -> AESCipher:
    return AESCipher(Environment("T", {"CIPHER_KEY": base64.b64encode(KEY).decode()}))


@given(st.binary(max_size=2_000))
def test_the_kept_key_cipher_and_the_library_read_each_other(plaintext: bytes) -> None:
    ours, theirs = KeptKeyAESCipher.from_key(KEY), _library_cipher()
    assert theirs.decrypt(ours.encrypt(plaintext)) == plaintext
    assert ours.decrypt(theirs.encrypt(plaintext)) == plaintext


@pytest.mark.parametrize("damage", [lambda c: c[:20], lambda c: c[:-1] + bytes([c[-1] ^ 1])])
def test_damaged_cipher_text_is_refused(damage: Any) -> None:
    sealed = KeptKeyAESCipher.from_key(KEY).encrypt(b'{"a":1}')
    with pytest.raises(ValueError):
        KeptKeyAESCipher.from_key(KEY).decrypt(damage(sealed))


def test_without_a_key_the_envelope_is_read_as_it_is() -> None:
    envelope = EventEnvelope(event_id=UUID(int=1), aggregate_id=UUID(int=2), aggregate_type="payment", version=1,
                             position=None, event_type="payment.initiated", occurred_at=datetime.now(UTC),
                             merchant_id=None, data={"amount_minor": 100})
    assert EnvelopeOpener()(encode(envelope)) == envelope
    assert EnvelopeOpener().passing(encode(envelope)).data == msgspec.Raw(b'{"amount_minor":100}')

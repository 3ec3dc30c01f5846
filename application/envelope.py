"""The event envelope that leaves the ledger through the outbox and travels on Kafka, and the
outbox rows that carry it (encoded, compressed and encrypted as the event store's own state).

The read side imports this module, so it names no aggregate class: callers pass the mapping of
classes to aggregate types (application/aggregate_types.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID, uuid5

import msgspec

if TYPE_CHECKING:
    from eventsourcing.persistence import Mapper

# Event ids are derived, not random, so the same stored event always has the same id and a
# consumer can drop a redelivered copy by id.
_EVENT_ID_NAMESPACE = UUID("6f1d8a53-3c4e-4b8e-9d4a-2b3c5e7f9a10")
_ENVELOPE_FIELDS_FROM_EVENT = ("originator_id", "originator_version", "timestamp")


class EventEnvelope(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    event_id: UUID
    aggregate_id: UUID
    aggregate_type: str
    version: int
    # The event's position in the ledger's notification log; None until recorded (the relay
    # fills it from the outbox row, which knows it).
    position: int | None
    event_type: str
    occurred_at: datetime
    merchant_id: UUID | None
    data: dict[str, Any]
    # The W3C traceparent of the command that recorded the event, so that the relay, the
    # projections and the webhooks continue its trace (api/tracing.py). None, and left out of
    # the JSON, when tracing is off; envelopes written before it existed decode as None.
    trace_context: str | None = None


# Where envelope_for finds the current trace context; None (tracing off) costs nothing.
_trace_context_source: Callable[[], str | None] | None = None


def set_trace_context_source(source: Callable[[], str | None] | None) -> None:
    """Install (or, with None, remove) what gives new envelopes their ``trace_context``."""
    global _trace_context_source
    _trace_context_source = source


class PassingEnvelope(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """An envelope as the outbox relay passes it on: EventEnvelope's fields, in its order, so that it
    encodes to the same JSON; ``data`` is left unparsed, and ids and times stay as their JSON text.
    Opening each envelope fully and encoding it again was a fifth of the relay's time a message."""

    event_id: str
    aggregate_id: str
    aggregate_type: str
    version: int
    position: int | None
    event_type: str
    occurred_at: str
    merchant_id: str | None
    data: msgspec.Raw
    trace_context: str | None = None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(EventEnvelope)
_passing_decoder = msgspec.json.Decoder(PassingEnvelope)


def encode(envelope: EventEnvelope | PassingEnvelope) -> bytes:
    return _encoder.encode(envelope)


def decode(payload: bytes) -> EventEnvelope:
    return _decoder.decode(payload)


class EnvelopeOpener:
    """Turns an outbox row's ``envelope`` bytes back into an envelope: deciphered with the cipher
    the ledger enciphered it with (``decrypt``; None when encryption at rest is off), then decoded.
    Called, it gives the EventEnvelope; ``passing`` gives the relay's PassingEnvelope."""

    def __init__(self, decrypt: Callable[[bytes], bytes] | None = None) -> None:
        self._decrypt = decrypt

    def plaintext(self, payload: bytes) -> bytes:
        return self._decrypt(bytes(payload)) if self._decrypt is not None else bytes(payload)

    def __call__(self, payload: bytes) -> EventEnvelope:
        return _decoder.decode(self.plaintext(payload))

    def passing(self, payload: bytes) -> PassingEnvelope:
        return _passing_decoder.decode(self.plaintext(payload))


def snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def event_id_for(aggregate_id: UUID, version: int) -> UUID:
    return uuid5(_EVENT_ID_NAMESPACE, f"{aggregate_id}:{version}")


DEFAULT_TOPIC_PREFIX = "echotransact"

# The names events travel under (envelope and topic), one per aggregate type; which class has
# which name is application/aggregate_types.py (the read side needs the names, not the classes).
AGGREGATE_TYPE_NAMES = ("payment_session", "payment", "merchant", "api_key", "customer", "reconciliation", "payout",
                        "payout_account", "dispute")


def topic_for(aggregate_type: str, prefix: str = DEFAULT_TOPIC_PREFIX) -> str:
    """One Kafka topic per aggregate type; the key (aggregate id) keeps each one's order. The
    prefix names the deployment, so two deployments (or two test runs) can share a broker."""
    return f"{prefix}.{aggregate_type}.events"


def envelope_for(event: Any, aggregate_type: str, merchant_id: UUID | None) -> EventEnvelope:
    data = {k: v for k, v in event.__dict__.items() if k not in _ENVELOPE_FIELDS_FROM_EVENT}
    return EventEnvelope(
        event_id=event_id_for(event.originator_id, event.originator_version),
        aggregate_id=event.originator_id,
        aggregate_type=aggregate_type,
        version=event.originator_version,
        position=None,
        event_type=f"{aggregate_type}.{snake(type(event).__name__)}",
        occurred_at=event.timestamp,
        merchant_id=merchant_id,
        data=data,
        trace_context=_trace_context_source() if _trace_context_source is not None else None,
    )


def event_topics(prefix: str = DEFAULT_TOPIC_PREFIX) -> list[str]:
    """The event topics, one per aggregate type."""
    return [topic_for(t, prefix) for t in AGGREGATE_TYPE_NAMES]


@dataclass(frozen=True)
class OutboxMessage:
    """One outbox row to write with the event (aggregate_id, version) it carries."""

    event_id: Any
    aggregate_id: Any
    version: int
    topic: str
    key: str
    envelope: bytes


def outbox_rows(
    events: Iterable[Any], aggregates: Mapping[Any, Any], *, aggregate_types: Mapping[type, str],
    mapper: Mapper[Any], topic_prefix: str = DEFAULT_TOPIC_PREFIX,
) -> list[OutboxMessage]:
    """One outbox row per event, in order. ``aggregates`` maps each event's originator id to its
    aggregate (for its type and merchant). The envelope is compressed and encrypted with the
    event store's mapper, so it is as protected at rest as the event itself."""
    rows = []
    for event in events:
        aggregate = aggregates[event.originator_id]
        aggregate_type = aggregate_types[type(aggregate)]
        # Every aggregate names its merchant (a merchant itself, a customer None).
        envelope = envelope_for(event, aggregate_type, aggregate.merchant_id)
        payload = encode(envelope)
        if mapper.compressor:
            payload = mapper.compressor.compress(payload)
        if mapper.cipher:
            payload = mapper.cipher.encrypt(payload)
        rows.append(
            OutboxMessage(
                event_id=envelope.event_id,
                aggregate_id=event.originator_id,
                version=event.originator_version,
                topic=topic_for(aggregate_type, topic_prefix),
                key=str(event.originator_id),
                envelope=payload,
            )
        )
    return rows

"""The event envelope that leaves the ledger through the outbox and travels on Kafka."""

from __future__ import annotations

import re
from datetime import datetime
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any
from uuid import UUID, uuid5

import msgspec

from domain.api_key import ApiKey
from domain.customer import Customer
from domain.merchant import Merchant
from domain.payment import Payment
from domain.payment_session import PaymentSession

# Event ids are derived, not random, so the same stored event always has the same id and a
# consumer can drop a redelivered copy by id.
_EVENT_ID_NAMESPACE = UUID("6f1d8a53-3c4e-4b8e-9d4a-2b3c5e7f9a10")
_ENVELOPE_FIELDS_FROM_EVENT = ("originator_id", "originator_version", "timestamp")


class EventEnvelope(msgspec.Struct, frozen=True, kw_only=True):
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


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(EventEnvelope)


def encode(envelope: EventEnvelope) -> bytes:
    return _encoder.encode(envelope)


def decode(payload: bytes) -> EventEnvelope:
    return _decoder.decode(payload)


def snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def event_id_for(aggregate_id: UUID, version: int) -> UUID:
    return uuid5(_EVENT_ID_NAMESPACE, f"{aggregate_id}:{version}")


DEFAULT_TOPIC_PREFIX = "echotransact"

# Each aggregate class and the name its events travel under (envelope and topic).
AGGREGATE_TYPES: Mapping[type, str] = MappingProxyType(
    {PaymentSession: "payment_session", Payment: "payment", Merchant: "merchant", ApiKey: "api_key",
     Customer: "customer"}
)


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
    )


def event_topics(prefix: str = DEFAULT_TOPIC_PREFIX) -> list[str]:
    """The event topics, one per aggregate type."""
    return [topic_for(t, prefix) for t in AGGREGATE_TYPES.values()]

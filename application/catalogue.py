"""The catalogue of every event: aggregate type, event type and fields, read off the aggregates.

ARCHITECTURE.md lists the same; a test keeps the two in step.
"""

from __future__ import annotations

import dataclasses

from eventsourcing.domain import CanMutateAggregate

from application.aggregate_types import AGGREGATE_TYPES
from application.envelope import snake

_ENVELOPE_FIELDS = {"originator_id", "originator_version", "timestamp", "originator_topic"}


def event_catalogue() -> list[tuple[str, str, list[str]]]:
    """(aggregate type, event type, field names) for every event, in declaration order."""
    rows: list[tuple[str, str, list[str]]] = []
    for cls, aggregate_type in AGGREGATE_TYPES.items():
        for attr, value in cls.__dict__.items():
            if (
                isinstance(value, type)
                and issubclass(value, CanMutateAggregate)
                and attr not in ("Event", "Created", "Snapshot")
                and dataclasses.is_dataclass(value)  # the library makes every event one
            ):
                fields = [f.name for f in dataclasses.fields(value) if f.name not in _ENVELOPE_FIELDS]
                rows.append((aggregate_type, f"{aggregate_type}.{snake(attr)}", fields))
    return rows

"""The event store in memory, for tests and examples: the eventsourcing library's POPO recorder
plus what our PostgreSQL recorder (adapters/postgres/event_store.py) adds to a save: the outbox
rows, the SMS, the card attachments and the command record, all written or none, and the same
IntegrityError when another save took the aggregate version or the command id first.

Choose it with ``PERSISTENCE_MODULE=adapters.memory.event_store`` in the application's env.
Unlike PostgreSQL it keeps no card vault, so it cannot refuse a card that left the vault.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

import msgspec
from eventsourcing import popo
from eventsourcing.persistence import ApplicationRecorder, IntegrityError, StoredEvent

from application.ports import CommandRecord, OutboxMessage, OutboxSms

_json_encoder = msgspec.json.Encoder()


class InMemoryOutboxRecorder(popo.POPOApplicationRecorder):
    def __init__(self) -> None:
        super().__init__()
        # What the PostgreSQL tables would hold: outbox rows with their positions, SMS by
        # message id, the payment each vaulted card went to, and the command log.
        self.outbox: list[tuple[int, OutboxMessage]] = []
        self.messages: dict[UUID, OutboxSms] = {}
        self.vault_attachments: dict[str, Any] = {}
        self.commands: dict[str, CommandRecord] = {}

    def insert_events(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        outbox: Sequence[OutboxMessage] = kwargs.get("outbox", ())
        command: CommandRecord | None = kwargs.get("command")
        sms: Sequence[OutboxSms] = kwargs.get("messages", ())
        attached: Sequence[tuple[str, Any]] = kwargs.get("vault_attachments", ())
        by_event = {(m.aggregate_id, m.version): m for m in outbox}
        # As in PostgreSQL: a mismatch is a bug, and events must not be stored without their rows.
        if len(by_event) != len(stored_events) or any(
            (e.originator_id, e.originator_version) not in by_event for e in stored_events
        ):
            raise AssertionError("every stored event needs exactly one outbox message")
        with self._database_lock:
            # Every check before any change, so a lost race writes nothing.
            self._assert_uniqueness(stored_events)
            if command is not None and command.command_id in self.commands:
                raise IntegrityError(f"command {command.command_id!r} is already recorded")
            positions = list(self._update_table(stored_events) or ())
            for event, position in zip(stored_events, positions, strict=True):
                self.outbox.append((position, by_event[(event.originator_id, event.originator_version)]))
            for message in sms:
                self.messages.setdefault(message.message_id, message)  # ON CONFLICT DO NOTHING
            for token, payment_id in attached:
                self.vault_attachments.setdefault(token, payment_id)  # the first payment stays
            if command is not None:
                # The result as PostgreSQL's jsonb gives it back: plain JSON values.
                result = msgspec.json.decode(_json_encoder.encode(command.result))
                self.commands[command.command_id] = CommandRecord(
                    command.command_id, command.command_name, command.request_hash, command.aggregate_id,
                    result, positions[-1] if positions else None,
                )
        if stored_events:
            self._notify_listeners()
        return positions

    def get_command(self, command_id: str) -> CommandRecord | None:
        with self._database_lock:
            return self.commands.get(command_id)

    def select_events_of(self, originator_ids: Sequence[UUID]) -> list[StoredEvent]:
        """Every event of these aggregates, by aggregate then version, as PostgreSQL's does."""
        return [event for originator_id in sorted(set(originator_ids), key=str)
                for event in self.select_events(originator_id)]


class InMemoryFactory(popo.POPOFactory):
    """The library's in-memory factory, with the recorder above for applications."""

    def application_recorder(self) -> ApplicationRecorder:
        return InMemoryOutboxRecorder()


__all__ = ["InMemoryFactory", "InMemoryOutboxRecorder", "IntegrityError"]

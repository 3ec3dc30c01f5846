"""The event store's recorder: events, their outbox rows and the command record, in one
PostgreSQL transaction.

It keeps the library's guarantee that notification ids are issued in commit order (an
EXCLUSIVE table lock around the insert, readers are not blocked) and adds, inside the same
transaction, one outbox row per event and the command-log row. Either all of it commits or
none of it does; the outbox's foreign key to the events makes an orphan row impossible.
"""

from __future__ import annotations

import re

from collections.abc import Sequence
from typing import Any

import msgspec
from eventsourcing.persistence import IntegrityError, InterfaceError, OperationalError, StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore
from eventsourcing.utils import retry
from psycopg.sql import SQL, Identifier

from application.ports import CommandRecord, OutboxMessage, OutboxSms
from domain.errors import InvalidPaymentMethod

_json = msgspec.json.Encoder()


_VAULT_TOKEN = re.compile(r"card_[a-z]{30}")  # adapters/vault.py; other tokens come from elsewhere


class OutboxRecorder(PostgresApplicationRecorder):
    def __init__(self, datastore: PostgresDatastore, *, events_table_name: str = "stored_events"):
        super().__init__(datastore, events_table_name=events_table_name)
        table = Identifier(self.datastore.schema or "public", self.events_table_name)
        self._insert_returning = SQL(
            "INSERT INTO {table} (originator_id, originator_version, topic, state)"
            " SELECT * FROM unnest(%s::uuid[], %s::bigint[], %s::text[], %s::bytea[])"
            " RETURNING originator_id, originator_version, notification_id"
        ).format(table=table)
        self._insert_outbox = SQL(
            "INSERT INTO outbox (position, event_id, topic, message_key, envelope)"
            " SELECT * FROM unnest(%s::bigint[], %s::uuid[], %s::text[], %s::text[], %s::bytea[])"
        )
        self._insert_messages = SQL(
            "INSERT INTO outbox_messages (message_id, kind, aggregate_id, payload)"
            " SELECT m, 'sms', a, p FROM unnest(%s::uuid[], %s::uuid[], %s::bytea[]) AS t(m, a, p)"
            " ON CONFLICT (message_id) DO NOTHING"
        )
        self._mark_attached = SQL(
            "UPDATE card_vault SET attached_at = COALESCE(attached_at, now()),"
            " payment_id = COALESCE(payment_id, t.p)"
            " FROM unnest(%s::text[], %s::uuid[]) AS t(tok, p) WHERE card_vault.token = t.tok"
        )
        self._insert_command = SQL(
            "INSERT INTO command_log"
            " (command_id, command_name, request_hash, aggregate_id, result, position)"
            " VALUES (%s, %s, %s, %s, %s::jsonb, %s)"
        )

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        outbox: Sequence[OutboxMessage] = kwargs.get("outbox", ())
        command: CommandRecord | None = kwargs.get("command")
        sms: Sequence[OutboxSms] = kwargs.get("messages", ())
        attached: Sequence[tuple[str, Any]] = kwargs.get("vault_attachments", ())
        by_event = {(m.aggregate_id, m.version): m for m in outbox}
        # Checked before the transaction opens: a mismatch is a bug and must not commit events
        # without their outbox rows.
        if len(by_event) != len(stored_events) or any(
            (e.originator_id, e.originator_version) not in by_event for e in stored_events
        ):
            raise AssertionError("every stored event needs exactly one outbox message")
        notification_ids: list[int] = []
        with self.datastore.transaction(commit=True) as curs:
            if stored_events:
                self._lock_table(curs)
                self._notify_channel(curs)
                curs.execute(
                    self._insert_returning,
                    (
                        [e.originator_id for e in stored_events],
                        [e.originator_version for e in stored_events],
                        [e.topic for e in stored_events],
                        [e.state for e in stored_events],
                    ),
                    prepare=True,
                )
                ids = {
                    (row["originator_id"], row["originator_version"]): row["notification_id"]
                    for row in curs.fetchall()
                }
                notification_ids = [ids[(e.originator_id, e.originator_version)] for e in stored_events]
                messages = [by_event[(e.originator_id, e.originator_version)] for e in stored_events]
                curs.execute(
                    self._insert_outbox,
                    (
                        notification_ids,
                        [m.event_id for m in messages],
                        [m.topic for m in messages],
                        [m.key for m in messages],
                        [m.envelope for m in messages],
                    ),
                    prepare=True,
                )
            if sms:
                curs.execute(
                    self._insert_messages,
                    ([m.message_id for m in sms], [m.session_id for m in sms], [m.payload for m in sms]),
                    prepare=True,
                )
            if attached:
                # Cards never attached are the vault rows retention may delete. A vault token
                # whose row is gone (deleted as never attached) must not be attached: no commit.
                curs.execute(self._mark_attached, ([t for t, _ in attached], [p for _, p in attached]))
                vaulted = sum(1 for t, _ in attached if _VAULT_TOKEN.fullmatch(t))
                if curs.rowcount < vaulted:
                    raise InvalidPaymentMethod("this card is no longer on file; please enter it again")
            if command is not None:
                curs.execute(
                    self._insert_command,
                    (
                        command.command_id,
                        command.command_name,
                        command.request_hash,
                        command.aggregate_id,
                        _json.encode(command.result).decode(),
                        notification_ids[-1] if notification_ids else None,
                    ),
                    prepare=True,
                )
        return notification_ids

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def get_command(self, command_id: str) -> CommandRecord | None:
        with self.datastore.transaction(commit=False) as curs:
            curs.execute(
                "SELECT command_id, command_name, request_hash, aggregate_id, result, position"
                " FROM command_log WHERE command_id = %s",
                (command_id,),
                prepare=True,
            )
            row = curs.fetchone()
        if row is None:
            return None
        return CommandRecord(
            row["command_id"], row["command_name"], row["request_hash"], row["aggregate_id"],
            row["result"], row["position"],
        )


__all__ = ["IntegrityError", "OutboxRecorder"]

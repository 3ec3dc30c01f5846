"""The event store's recorder: events, their outbox rows and the command record, in one
PostgreSQL transaction.

It keeps the library's guarantee that notification ids are issued in commit order (an
EXCLUSIVE table lock around the insert, readers are not blocked) and adds, inside the same
transaction, one outbox row per event and the command-log row. Either all of it commits or
none of it does; the outbox's foreign key to the events makes an orphan row impossible.

The whole save is one statement, a call of the ``ledger_append`` function, run in autocommit
mode: the lock is taken and released by the server within that one round trip, so writers no
longer queue behind a lock held while its owner waits for the network or for Python.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from uuid import UUID

import msgspec
from eventsourcing.persistence import IntegrityError, InterfaceError, OperationalError, StoredEvent
from eventsourcing.postgres import (
    BasePostgresFactory,
    PostgresApplicationRecorder,
    PostgresDatastore,
    PostgresFactory,
)
from eventsourcing.utils import Environment, retry
from prometheus_client import Histogram
from psycopg.errors import RaiseException
from psycopg.rows import dict_row
from psycopg.sql import SQL, Identifier
from psycopg_pool import ConnectionPool, PoolTimeout

from application.ports import CommandRecord, OutboxMessage, OutboxSms
from domain.errors import InvalidPaymentMethod

_json = msgspec.json.Encoder()

# The save's one statement, from sending it to its result (the table lock and the commit's WAL
# flush included): the write path's floor. Observed per call, not per event.
APPEND_SECONDS = Histogram(
    "echotransact_event_store_append_seconds", "Time of one ledger_append call (one save: events, outbox rows, "
    "SMS and command record)", buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
_observe_append = APPEND_SECONDS.observe


_VAULT_TOKEN = re.compile(r"card_[a-z]{30}")  # adapters/postgres/vault.py; other tokens come from elsewhere


class OutboxRecorder(PostgresApplicationRecorder):
    def __init__(self, datastore: PostgresDatastore, *, events_table_name: str = "stored_events"):
        super().__init__(datastore, events_table_name=events_table_name)
        # Parameters in binary (%b): psycopg's C array dumpers, not its text ones that escape
        # every element with a regular expression.
        self._append = SQL(
            "SELECT {function}(%b::uuid[], %b::bigint[], %b::text[], %b::bytea[],"
            " %b::uuid[], %b::text[], %b::text[], %b::bytea[],"
            " %b::uuid[], %b::uuid[], %b::bytea[],"
            " %b::text[], %b::uuid[], %b::integer,"
            " %b::text, %b::text, %b::text, %b::uuid, %b::jsonb) AS positions"
        ).format(function=Identifier(self.datastore.schema or "public", "ledger_append"))

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        """Events, outbox rows, SMS, card attachments and the command record in one statement
        (migrations/0013_append_function.sql): one round trip, the table lock held only inside
        the server. A lost race raises IntegrityError and nothing is written."""
        if stored_events and self.events_table_name != "ledger_events":
            raise AssertionError("ledger_append writes ledger_events; the recorder names another table")
        outbox: Sequence[OutboxMessage] = kwargs.get("outbox", ())
        command: CommandRecord | None = kwargs.get("command")
        sms: Sequence[OutboxSms] = kwargs.get("messages", ())
        attached: Sequence[tuple[str, Any]] = kwargs.get("vault_attachments", ())
        by_event = {(m.aggregate_id, m.version): m for m in outbox}
        # Checked before anything is sent: a mismatch is a bug and must not commit events
        # without their outbox rows.
        if len(by_event) != len(stored_events) or any(
            (e.originator_id, e.originator_version) not in by_event for e in stored_events
        ):
            raise AssertionError("every stored event needs exactly one outbox message")
        if not stored_events and not sms and not attached and command is None:
            return []
        messages = [by_event[(e.originator_id, e.originator_version)] for e in stored_events]
        params = (
            [e.originator_id for e in stored_events],
            [e.originator_version for e in stored_events],
            [e.topic for e in stored_events],
            [e.state for e in stored_events],
            [m.event_id for m in messages],
            [m.topic for m in messages],
            [m.key for m in messages],
            [m.envelope for m in messages],
            [m.message_id for m in sms],
            [m.session_id for m in sms],
            [m.payload for m in sms],
            [t for t, _ in attached],
            [p for _, p in attached],
            # Cards never attached are the vault rows retention may delete. A vault token whose
            # row is gone (deleted as never attached) must not be attached: no commit.
            sum(1 for t, _ in attached if _VAULT_TOKEN.fullmatch(t)),
            command.command_id if command else None,
            command.command_name if command else None,
            command.request_hash if command else None,
            command.aggregate_id if command else None,
            _json.encode(command.result).decode() if command else None,
        )
        with self.datastore.get_connection() as conn:
            try:
                started = time.perf_counter()
                row = conn.execute(self._append, params, prepare=True).fetchone()
                _observe_append(time.perf_counter() - started)
            except RaiseException as error:
                if error.diag.message_primary == "card_not_on_file":
                    raise InvalidPaymentMethod("this card is no longer on file; please enter it again") from None
                raise
        assert row is not None
        return list(row["positions"] or ())

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def select_events_of(self, originator_ids: Sequence[UUID]) -> list[StoredEvent]:
        """Every event of these aggregates in one query, by aggregate then version (a command
        that decides over many aggregates, a reconciliation's payments, loads them at once)."""
        with self.datastore.get_connection() as conn:
            rows = conn.execute(
                SQL("SELECT originator_id, originator_version, topic, state FROM {table}"
                    " WHERE originator_id = ANY(%s) ORDER BY originator_id, originator_version").format(
                    table=Identifier(self.events_table_name)),
                (list(originator_ids),), prepare=True,
            ).fetchall()
        return [StoredEvent(originator_id=r["originator_id"], originator_version=r["originator_version"],
                            topic=r["topic"], state=bytes(r["state"])) for r in rows]

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def get_command(self, command_id: str) -> CommandRecord | None:
        # One autocommit statement: no BEGIN, and no ROLLBACK (after which psycopg would
        # deallocate the connection's prepared statements).
        with self.datastore.get_connection() as conn:
            row = conn.execute(
                "SELECT command_id, command_name, request_hash, aggregate_id, result, position"
                " FROM command_log WHERE command_id = %s",
                (command_id,),
                prepare=True,
            ).fetchone()
        if row is None:
            return None
        return CommandRecord(
            row["command_id"], row["command_name"], row["request_hash"], row["aggregate_id"],
            row["result"], row["position"],
        )


__all__ = ["IntegrityError", "OutboxRecorder"]


class PooledDatastore(PostgresDatastore):
    """The library's datastore over the process's one pool (adapters/postgres/connection.py's
    ``open_pool``) instead of a pool of its own. The pool's connections give tuple rows; the
    library reads dict rows, so a checkout through here gives those (the pool puts tuple rows
    back when the connection returns)."""

    def __init__(self, pool: ConnectionPool[Any], *, owns_pool: bool, lock_timeout_s: int = 5) -> None:
        # The library's constructor builds a pool it would open on first use; it never is.
        super().__init__(dbname="", host="", port=0, user="", password="", lock_timeout=lock_timeout_s)
        self.pool = pool  # type: ignore[assignment]  # the library types it as its own subclass
        self._owns_pool = owns_pool

    def close(self) -> None:
        if self._owns_pool:
            self.pool.close()

    @contextmanager
    def get_connection(self) -> Iterator[Any]:
        try:
            with super().get_connection() as conn:
                conn.row_factory = dict_row
                yield conn
        except OperationalError as error:
            # The library turns a pool's wait that timed out into its OperationalError, which its
            # recorders retry ten times: a request would wait ten times the pool's timeout. It
            # has waited once; the caller is told at once (the API answers 503).
            if isinstance(error.__cause__, PoolTimeout):
                raise error.__cause__ from None
            raise

    # The pool is the process's, not the datastore's: leaving a ``with`` block does not close it.
    def __enter__(self) -> PooledDatastore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class EventStoreFactory(PostgresFactory):
    """The library's PostgreSQL infrastructure over a given datastore, recording through
    OutboxRecorder. Tables come from migrations/, so none is created here."""

    application_recorder_class = OutboxRecorder

    def __init__(self, env: Environment, datastore: PostgresDatastore) -> None:
        # Past BasePostgresFactory's constructor, which would build a datastore from POSTGRES_*.
        super(BasePostgresFactory, self).__init__(env)
        self.datastore = datastore

    def env_create_table(self) -> bool:
        return False

"""The projection engine: applies envelopes to read models in PostgreSQL, exactly once each.

For every projection and aggregate it keeps the version applied (``projection_versions``) in
the same transaction as the rows. So an event is applied only if it is the next version of its
aggregate: a redelivered one is skipped, and one that arrives after a gap (a lost or reordered
message) first pulls the missing versions from the outbox, which the ledger writes in the same
transaction as its events and so is as complete as the event store.

``catch_up`` scans the outbox past each projection's checkpoint and applies whatever Kafka did
not deliver, so the read side recovers from a broker that lost data without anyone's help.
Projections are plain classes with ``apply(cur, envelope)``; they use unqualified table names,
so ``rebuild(schema=...)`` can build them into scratch tables for ``replay --verify``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol
from uuid import UUID

import msgspec
import psycopg
import structlog
from psycopg import sql

from adapters.pg import ReconnectingConnection
from application.envelope import EventEnvelope

log = structlog.get_logger(__name__)

OpenEnvelope = Callable[[bytes], EventEnvelope]


class Projection(Protocol):
    name: str
    tables: tuple[str, ...]

    def apply(self, cur: psycopg.Cursor[Any], envelope: EventEnvelope) -> None: ...

    def after_batch(self, cur: psycopg.Cursor[Any]) -> None:
        """Work that needs the whole batch applied first (the audit chain)."""
        ...


@dataclass
class BatchResult:
    applied: int = 0
    duplicates: int = 0
    gaps_filled: int = 0
    touched: dict[str, set[UUID]] = field(default_factory=dict)


def _with_position(envelope: EventEnvelope, position: int) -> EventEnvelope:
    return envelope if envelope.position == position else msgspec.structs.replace(envelope, position=position)


class ProjectionStore:
    def __init__(
        self, database_url: str, projections: Sequence[Projection], open_envelope: OpenEnvelope,
        *, schema: str | None = None,
    ) -> None:
        self.database_url = database_url
        self.projections = list(projections)
        self.open_envelope = open_envelope
        self.schema = schema
        self._conn = ReconnectingConnection(database_url, self._use_schema if schema else None)

    # -- connection ---------------------------------------------------------------------------

    def _use_schema(self, conn: psycopg.Connection[Any]) -> None:
        assert self.schema is not None
        conn.execute(sql.SQL("SET search_path TO {}, public").format(sql.Identifier(self.schema)))

    def connection(self) -> psycopg.Connection[Any]:
        return self._conn.get()

    def close(self) -> None:
        self._conn.close()

    # -- the outbox as the event feed ------------------------------------------------------------

    def _read_outbox(self, cur: psycopg.Cursor[Any], query: sql.Composable, params: Sequence[Any]) -> list[EventEnvelope]:
        cur.execute(query, params)
        return [_with_position(self.open_envelope(payload), position) for position, payload in cur.fetchall()]

    def _missing_versions(
        self, cur: psycopg.Cursor[Any], aggregate_id: UUID, after: int, before: int
    ) -> list[EventEnvelope]:
        return self._read_outbox(
            cur,
            sql.SQL(
                "SELECT o.position, o.envelope FROM public.outbox o"
                " JOIN public.ledger_events e ON e.notification_id = o.position"
                " WHERE e.originator_id = %s AND e.originator_version > %s AND e.originator_version < %s"
                " ORDER BY e.originator_version"
            ),
            (aggregate_id, after, before),
        )

    # -- applying -------------------------------------------------------------------------------

    def apply_batch(self, envelopes: Iterable[EventEnvelope]) -> BatchResult:
        """Apply a batch to every projection in one transaction; safe to call again with any
        of the same envelopes."""
        batch = sorted(envelopes, key=lambda e: (e.position or 0, e.version))
        result = BatchResult()
        if not batch:
            return result
        conn = self.connection()
        with conn.transaction(), conn.cursor() as cur:
            for projection in self.projections:
                self._apply_to(cur, projection, batch, result)
        return result

    def _apply_to(
        self, cur: psycopg.Cursor[Any], projection: Projection, batch: list[EventEnvelope], result: BatchResult
    ) -> None:
        aggregate_ids = sorted({e.aggregate_id for e in batch})
        # Row locks in a fixed order: two workers touching the same aggregates wait, not deadlock.
        cur.execute(
            "SELECT aggregate_id, version FROM projection_versions"
            " WHERE projection = %s AND aggregate_id = ANY(%s) ORDER BY aggregate_id FOR UPDATE",
            (projection.name, aggregate_ids),
        )
        versions: dict[UUID, int] = {row[0]: row[1] for row in cur.fetchall()}
        touched = result.touched.setdefault(projection.name, set())
        last_position: dict[UUID, int] = {}
        # One round trip per batch instead of one per statement (a fetch, as in gap filling,
        # syncs the pipeline); an error still fails, and rolls back, the whole batch.
        with cur.connection.pipeline():
            for envelope in batch:
                current = versions.get(envelope.aggregate_id, 0)
                if envelope.version <= current:
                    result.duplicates += 1
                    continue
                pending = [envelope]
                if envelope.version > current + 1:
                    missing = self._missing_versions(cur, envelope.aggregate_id, current, envelope.version)
                    result.gaps_filled += len(missing)
                    pending = [*missing, envelope]
                for item in pending:
                    assert item.position is not None, "envelopes are applied with their positions"
                    projection.apply(cur, item)
                    versions[item.aggregate_id] = item.version
                    last_position[item.aggregate_id] = item.position
                    result.applied += 1
                touched.add(envelope.aggregate_id)
        if last_position:
            ids = list(last_position)
            cur.execute(
                "INSERT INTO projection_versions (projection, aggregate_id, version, position)"
                " SELECT %s, a, v, p FROM unnest(%s::uuid[], %s::bigint[], %s::bigint[]) AS t(a, v, p)"
                " ON CONFLICT (projection, aggregate_id)"
                " DO UPDATE SET version = excluded.version, position = excluded.position",
                (projection.name, ids, [versions[i] for i in ids], [last_position[i] for i in ids]),
            )
        projection.after_batch(cur)

    # -- catching up from the outbox ---------------------------------------------------------------

    def checkpoint(self, projection: str) -> int:
        row = self.connection().execute(
            "SELECT position FROM projection_checkpoints WHERE projection = %s", (projection,)
        ).fetchone()
        return int(row[0]) if row else 0

    def catch_up(self, *, grace: timedelta = timedelta(seconds=5), batch_size: int = 1000) -> int:
        """Apply every event older than ``grace`` that some projection has not applied yet, and
        move the checkpoints. Returns how many events were applied. ``grace`` leaves the newest
        events to Kafka, the fast path, so both rarely apply the same event at once (and when
        they do, the version check makes the second a no-op)."""
        applied = 0
        conn = self.connection()
        while True:
            start = min(self.checkpoint(p.name) for p in self.projections)
            with conn.cursor() as cur:
                # created_at is the transaction's start, not its commit, so a later position can
                # be older: stop at the first row that is too new instead of filtering, or the
                # checkpoint would pass over it.
                cur.execute(
                    "SELECT position, envelope, created_at <= now() - %s FROM public.outbox"
                    " WHERE position > %s ORDER BY position LIMIT %s",
                    (grace, start, batch_size),
                )
                rows = cur.fetchall()
            ripe = []
            for position, payload, old_enough in rows:
                if not old_enough:
                    break
                ripe.append(_with_position(self.open_envelope(payload), position))
            envelopes = ripe
            if not envelopes:
                return applied
            result = self.apply_batch(envelopes)
            applied += result.applied
            last = envelopes[-1].position
            with conn.transaction():
                for projection in self.projections:
                    conn.execute(
                        "INSERT INTO projection_checkpoints (projection, position) VALUES (%s, %s)"
                        " ON CONFLICT (projection) DO UPDATE"
                        " SET position = GREATEST(projection_checkpoints.position, excluded.position)",
                        (projection.name, last),
                    )
            if len(envelopes) < batch_size or len(rows) > len(envelopes):
                return applied

    # -- rebuilding -------------------------------------------------------------------------------

    def reset(self) -> None:
        """Empty every table of these projections and forget their positions."""
        conn = self.connection()
        names = [p.name for p in self.projections]
        with conn.transaction():
            for projection in self.projections:
                for table in projection.tables:
                    conn.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(table)))
            conn.execute("DELETE FROM projection_versions WHERE projection = ANY(%s)", (names,))
            conn.execute("DELETE FROM projection_checkpoints WHERE projection = ANY(%s)", (names,))

    def rebuild(self) -> int:
        self.reset()
        return self.catch_up(grace=timedelta(0))

"""The projection engine: applies envelopes to read models in PostgreSQL, exactly once each.

For every projection and aggregate it keeps the version applied (``projection_versions``) in
the same transaction as the rows, and for every projection the newest position it applied
(``projection_checkpoints.applied_position``: how far behind the feed it is). So an event is
applied only if it is the next version of its aggregate: a redelivered one is skipped, and one
that arrives after a gap (a lost or reordered message) first pulls the missing versions from
the outbox, which the ledger writes in the same transaction as its events and so is as
complete as the event store.

A batch is applied set-based: the engine decides in Python which events each projection
applies (and fetches every gap with one query), and each projection folds those events per
key and writes them with a few statements, whatever the batch's size.

``catch_up`` scans the outbox past each projection's checkpoint and applies whatever Kafka did
not deliver, so the read side recovers from a broker that lost data without anyone's help.
Projections use unqualified table names, so ``rebuild`` can build them into scratch tables
(a ``schema``) for ``replay --verify``.
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

from application.envelope import EventEnvelope

log = structlog.get_logger(__name__)

OpenEnvelope = Callable[[bytes], EventEnvelope]

# Outbox rows per page (and transaction) when catching up or replaying: large enough that the
# few statements per batch cost little per event. On 60k events, pages of 2,000 replayed
# faster than 1,000 (more statements) and than 5,000-10,000 (larger working sets per statement).
CATCH_UP_PAGE = 1_000
REPLAY_PAGE = 2_000


class Projection(Protocol):
    name: str
    tables: tuple[str, ...]

    def apply_batch(self, cur: psycopg.Cursor[Any], envelopes: Sequence[EventEnvelope]) -> None:
        """Apply these events in the order given (position order; each the next version of its
        aggregate, checked by the engine), with a few set-based statements."""
        ...


# Told after each committed page of a catch-up or rebuild: (position reached, events applied so far).
Progress = Callable[[int, int], object]

# What runs inside a batch's transaction once its rows are written (ProjectionStore.on_batch).
OnBatch = Callable[[psycopg.Connection[Any], Sequence[UUID]], object]


@dataclass
class BatchResult:
    applied: int = 0
    duplicates: int = 0
    gaps_filled: int = 0
    touched: dict[str, set[UUID]] = field(default_factory=dict)


@dataclass
class Plan:
    """What one projection applies of a batch, given the versions it has applied."""

    apply: list[EventEnvelope]  # in (position, version) order, gap fillers included
    last: dict[UUID, tuple[int, int]]  # aggregate -> (version, position) after the batch
    duplicates: int
    gaps_filled: int
    touched: set[UUID]  # aggregates of the batch's own envelopes that were applied


def _with_position(envelope: EventEnvelope, position: int) -> EventEnvelope:
    return envelope if envelope.position == position else msgspec.structs.replace(envelope, position=position)


def _order(envelope: EventEnvelope) -> tuple[int, int]:
    return (envelope.position or 0, envelope.version)


# projection_versions.applied: {projection: [version, position]} for one aggregate.
_encode_applied = msgspec.json.Encoder().encode
_applied_decoder = msgspec.json.Decoder(dict[str, list[int]])


def _decode_applied(raw: Any) -> dict[str, list[int]]:
    """A jsonb value as psycopg gives it: parsed already, or its text."""
    return raw if isinstance(raw, dict) else _applied_decoder.decode(raw)


def fresh_versions(
    batch: Sequence[EventEnvelope], versions: dict[UUID, int]
) -> tuple[dict[UUID, dict[int, EventEnvelope]], int]:
    """Per aggregate, the batch's envelopes past its applied version (first copy of each version
    wins), and how many envelopes were duplicates (applied before, or twice in the batch)."""
    fresh: dict[UUID, dict[int, EventEnvelope]] = {}
    duplicates = 0
    for envelope in batch:
        current = versions.get(envelope.aggregate_id, 0)
        mine = fresh.setdefault(envelope.aggregate_id, {})
        if envelope.version <= current or envelope.version in mine:
            duplicates += 1
            continue
        mine[envelope.version] = envelope
    return fresh, duplicates


def gaps(fresh: dict[UUID, dict[int, EventEnvelope]], versions: dict[UUID, int]) -> dict[UUID, tuple[int, int]]:
    """Per aggregate with missing versions, the open range (applied, newest in batch) to fetch."""
    out = {}
    for aggregate_id, mine in fresh.items():
        if not mine:
            continue
        current, newest = versions.get(aggregate_id, 0), max(mine)
        if len(mine) < newest - current:
            out[aggregate_id] = (current, newest)
    return out


def plan(
    batch: Sequence[EventEnvelope], versions: dict[UUID, int], fetched: dict[tuple[UUID, int], EventEnvelope],
    fresh: tuple[dict[UUID, dict[int, EventEnvelope]], int] | None = None,
) -> Plan:
    """The events to apply: each aggregate's versions after the applied one, in order, taking
    the missing ones from ``fetched`` (the outbox). Same outcome as applying the batch one
    envelope at a time, since every projection depends only on each aggregate's own order.
    ``fresh`` is ``fresh_versions(batch, versions)`` when the caller has it already."""
    by_aggregate, duplicates = fresh or fresh_versions(batch, versions)
    apply: list[EventEnvelope] = []
    last: dict[UUID, tuple[int, int]] = {}
    filled = 0
    touched = set()
    for aggregate_id, mine in by_aggregate.items():
        if not mine:
            continue
        touched.add(aggregate_id)
        current, newest = versions.get(aggregate_id, 0), max(mine)
        for version in range(current + 1, newest + 1):
            envelope = mine.get(version)
            if envelope is None:
                envelope = fetched.get((aggregate_id, version))
                if envelope is None:
                    continue  # not in the outbox either: nothing to fill it with
                filled += 1
            assert envelope.position is not None, "envelopes are applied with their positions"
            apply.append(envelope)
            last[aggregate_id] = (envelope.version, envelope.position)
    apply.sort(key=_order)
    return Plan(apply, last, duplicates, filled, touched)


class ProjectionStore:
    def __init__(
        self, database_url: str, projections: Sequence[Projection], open_envelope: OpenEnvelope,
        *, schema: str | None = None, on_batch: OnBatch | None = None,
    ) -> None:
        self.database_url = database_url
        # Called inside each batch's transaction, after the projections wrote their rows, with
        # every aggregate of the batch (duplicates included): the worker copies the rows to the
        # Redis cache there, so no commit can land without its cache write having been made,
        # and a redelivered batch repairs a cache write that was lost.
        self.on_batch = on_batch
        self.projections = list(projections)
        self.open_envelope = open_envelope
        self.schema = schema
        self._conn: psycopg.Connection[Any] | None = None

    # -- connection ---------------------------------------------------------------------------

    def _use_schema(self, conn: psycopg.Connection[Any]) -> None:
        assert self.schema is not None
        conn.execute(sql.SQL("SET search_path TO {}, public").format(sql.Identifier(self.schema)))

    def connection(self) -> psycopg.Connection[Any]:
        """The store's one autocommit connection, opened again if it was lost."""
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.database_url, autocommit=True)
            # Read models are derived: a commit here is not waited on to reach the disk. A crash
            # of PostgreSQL may forget the last fraction of a second of batches, rows and
            # versions together (one transaction), and the catch-up applies those events again
            # from the outbox, which every save flushes.
            self._conn.execute("SET synchronous_commit TO off")
            if self.schema:
                self._use_schema(self._conn)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- the outbox as the event feed ------------------------------------------------------------

    def _missing_versions(
        self, cur: psycopg.Cursor[Any], ranges: dict[UUID, tuple[int, int]]
    ) -> dict[tuple[UUID, int], EventEnvelope]:
        """Every outbox envelope strictly inside these version ranges, in one query."""
        if not ranges:
            return {}
        ids = list(ranges)
        cur.execute(
            "SELECT o.position, o.envelope FROM unnest(%b::uuid[], %b::bigint[], %b::bigint[]) AS g(a, after, before)"
            " JOIN public.ledger_events e ON e.originator_id = g.a"
            " AND e.originator_version > g.after AND e.originator_version < g.before"
            " JOIN public.outbox o ON o.position = e.notification_id",
            (ids, [ranges[i][0] for i in ids], [ranges[i][1] for i in ids]),
            binary=True,
        )
        found = {}
        for position, payload in cur.fetchall():
            envelope = _with_position(self.open_envelope(payload), position)
            found[(envelope.aggregate_id, envelope.version)] = envelope
        return found

    # -- applying -------------------------------------------------------------------------------

    def apply_batch(self, envelopes: Iterable[EventEnvelope]) -> BatchResult:
        """Apply a batch to every projection in one transaction; safe to call again with any
        of the same envelopes."""
        batch = sorted(envelopes, key=_order)
        result = BatchResult()
        if not batch:
            return result
        conn = self.connection()
        with conn.pipeline(), conn.transaction(), conn.cursor() as cur:
            self._apply(cur, batch, result)
        return result

    def _apply(self, cur: psycopg.Cursor[Any], batch: list[EventEnvelope], result: BatchResult) -> None:
        """Runs in a pipeline (psycopg's pipeline mode): a statement whose result is not read goes
        to the server at once and Python goes on (the next projection folds its rows while the
        server writes the last one's); only a read waits, for everything sent before it. An error
        surfaces at the next read or at the commit, inside the same transaction. So a statement's
        columns and counts are known only once its rows are fetched: fetch first."""
        fetched: dict[tuple[UUID, int], EventEnvelope] = {}  # gap fillers, shared by the projections
        aggregate_ids = sorted({e.aggregate_id for e in batch})
        names = [p.name for p in self.projections]
        # What every projection applied of these aggregates, one row an aggregate, the rows
        # locked in a fixed order: two workers touching the same aggregates wait, not deadlock.
        cur.execute(
            "SELECT aggregate_id, applied FROM projection_versions WHERE aggregate_id = ANY(%b::uuid[])"
            " ORDER BY aggregate_id FOR UPDATE",
            (aggregate_ids,), binary=True,
        )
        rows: dict[UUID, dict[str, list[int]]] = {a: _decode_applied(raw) for a, raw in cur.fetchall()}
        applied: dict[str, dict[UUID, int]] = {name: {} for name in names}
        for aggregate_id, by_projection in rows.items():
            for name, (version, _position) in by_projection.items():
                if name in applied:
                    applied[name][aggregate_id] = version
        # The projections have nearly always applied the same versions: one plan per distinct set
        # of them, nearly always one for all.
        groups: list[tuple[dict[UUID, int], Plan, list[str]]] = []
        for projection in self.projections:
            versions = applied[projection.name]
            group = next((g for g in groups if g[0] == versions), None)
            if group is None:
                group = (versions, self._plan(cur, batch, versions, fetched), [])
                groups.append(group)
            group[2].append(projection.name)
            todo = group[1]
            result.duplicates += todo.duplicates
            result.gaps_filled += todo.gaps_filled
            result.applied += len(todo.apply)
            result.touched.setdefault(projection.name, set()).update(todo.touched)
            if todo.apply:
                projection.apply_batch(cur, todo.apply)
        heads: dict[str, int] = {}
        changed: dict[UUID, dict[str, list[int]]] = {}
        for _versions, todo, group_names in groups:
            if todo.apply:
                heads.update(dict.fromkeys(group_names, max(p for _, p in todo.last.values())))
                for aggregate_id, (version, position) in todo.last.items():
                    mine = changed.get(aggregate_id)
                    if mine is None:
                        mine = changed[aggregate_id] = dict(rows.get(aggregate_id, {}))
                    mine.update({name: [version, position] for name in group_names})
        self._store_applied(cur, changed, rows)
        if self.on_batch is not None:
            self.on_batch(cur.connection, aggregate_ids)
        if heads:
            # Each projection's newest applied position (readiness, metrics and the console read
            # it), last in the transaction: two workers' batches wait on these rows only for
            # each other's commit. Names in a fixed order, so that waiting never deadlocks.
            moved = sorted(heads)
            cur.execute(
                "INSERT INTO projection_checkpoints (projection, position, applied_position)"
                " SELECT n, 0, p FROM unnest(%b::text[], %b::bigint[]) AS t(n, p) ON CONFLICT (projection)"
                " DO UPDATE SET applied_position"
                " = GREATEST(projection_checkpoints.applied_position, excluded.applied_position)",
                (moved, [heads[n] for n in moved]), binary=True,
            )

    def _plan(
        self, cur: psycopg.Cursor[Any], batch: list[EventEnvelope], versions: dict[UUID, int],
        fetched: dict[tuple[UUID, int], EventEnvelope],
    ) -> Plan:
        fresh, duplicates = fresh_versions(batch, versions)
        wanted = {
            aggregate_id: span for aggregate_id, span in gaps(fresh, versions).items()
            if any((aggregate_id, v) not in fetched
                   for v in range(span[0] + 1, span[1]) if v not in fresh[aggregate_id])
        }
        fetched.update(self._missing_versions(cur, wanted))
        return plan(batch, versions, fetched, (fresh, duplicates))

    @staticmethod
    def _store_applied(
        cur: psycopg.Cursor[Any], changed: dict[UUID, dict[str, list[int]]], rows: dict[UUID, Any]
    ) -> None:
        """The aggregates' rows of what each projection applied, with one statement for the
        aggregates new to every projection and one for the others (locked by the read before)."""
        new = {str(a): applied for a, applied in changed.items() if a not in rows}
        seen = {str(a): applied for a, applied in changed.items() if a in rows}
        if new:
            # A plain INSERT: if another worker applied the same new aggregate concurrently (there
            # was no row to lock), this fails and the retry finds its versions instead of
            # applying the events a second time.
            cur.execute(
                "INSERT INTO projection_versions (aggregate_id, applied)"
                " SELECT key::uuid, value FROM jsonb_each(%s::jsonb)",
                (_encode_applied(new).decode(),),
            )
        if seen:
            cur.execute(
                "UPDATE projection_versions pv SET applied = j.value FROM jsonb_each(%s::jsonb) AS j"
                " WHERE pv.aggregate_id = j.key::uuid",
                (_encode_applied(seen).decode(),),
            )

    # -- catching up from the outbox ---------------------------------------------------------------

    def checkpoint(self, projection: str) -> int:
        row = self.connection().execute(
            "SELECT position FROM projection_checkpoints WHERE projection = %s", (projection,)
        ).fetchone()
        return int(row[0]) if row else 0

    def _start(self, conn: psycopg.Connection[Any]) -> int:
        names = [p.name for p in self.projections]
        rows = dict(conn.execute(
            "SELECT projection, position FROM projection_checkpoints WHERE projection = ANY(%s)", (names,)
        ).fetchall())
        return min(int(rows.get(n, 0)) for n in names)

    def _read_page(
        self, conn: psycopg.Connection[Any], start: int, grace: timedelta, batch_size: int, *, skip_applied: bool,
    ) -> tuple[list[EventEnvelope], int, bool]:
        """The envelopes after ``start`` older than ``grace`` (of at most ``batch_size`` rows), the
        last position read, and whether the outbox may hold more of them. With ``skip_applied``,
        rows that every projection has applied (by the positions kept with their versions) are
        read but not opened: nearly every row a catch-up passes came by Kafka seconds before, and
        decrypting and deciding them again was a tenth of the worker's CPU."""
        names = [p.name for p in self.projections]
        with conn.cursor(binary=True) as cur:
            # created_at is the transaction's start, not its commit, so a later position can
            # be older: stop at the first row that is too new instead of filtering, or the
            # checkpoint would pass over it.
            if skip_applied:
                cur.execute(
                    "SELECT o.position, CASE WHEN (SELECT count(*) FROM projection_versions v"
                    "   CROSS JOIN jsonb_each(v.applied) AS a WHERE v.aggregate_id = e.originator_id"
                    "   AND a.key = ANY(%s::text[]) AND (a.value->>1)::bigint >= o.position) >= %s"
                    "   THEN NULL ELSE o.envelope END,"
                    " o.created_at <= now() - %s"
                    " FROM public.outbox o JOIN public.ledger_events e ON e.notification_id = o.position"
                    " WHERE o.position > %s ORDER BY o.position LIMIT %s",
                    (names, len(names), grace, start, batch_size),
                )
            else:
                cur.execute(
                    "SELECT position, envelope, created_at <= now() - %s FROM public.outbox"
                    " WHERE position > %s ORDER BY position LIMIT %s",
                    (grace, start, batch_size),
                )
            rows = cur.fetchall()
        open_envelope = self.open_envelope
        envelopes: list[EventEnvelope] = []
        last = start
        for position, payload, old_enough in rows:
            if not old_enough:
                return envelopes, last, False
            if payload is not None:
                envelopes.append(_with_position(open_envelope(payload), position))
            last = position
        return envelopes, last, len(rows) == batch_size

    def catch_up(self, *, grace: timedelta = timedelta(seconds=5), batch_size: int = CATCH_UP_PAGE,
                 progress: Progress | None = None, skip_applied: bool = True) -> int:
        """Apply every event older than ``grace`` that some projection has not applied yet, and
        move the checkpoints. Returns how many events were applied. ``grace`` leaves the newest
        events to Kafka, the fast path, so both rarely apply the same event at once (and when
        they do, the version check makes the second a no-op). ``progress`` hears of each page
        once it is committed."""
        conn = self.connection()
        names = [p.name for p in self.projections]
        position = self._start(conn)
        applied = 0
        while True:
            envelopes, last, more = self._read_page(conn, position, grace, batch_size, skip_applied=skip_applied)
            if last == position:
                return applied
            result = BatchResult()
            envelopes.sort(key=_order)
            with conn.pipeline(), conn.transaction(), conn.cursor() as cur:  # see _apply
                if envelopes:
                    self._apply(cur, envelopes, result)
                # The checkpoint moves in the same transaction as the rows it vouches for. Its
                # rows are locked in name order, as the newest applied positions are.
                cur.execute(
                    "INSERT INTO projection_checkpoints (projection, position)"
                    " SELECT n, %s FROM unnest(%b::text[]) AS n ON CONFLICT (projection) DO UPDATE"
                    " SET position = GREATEST(projection_checkpoints.position, excluded.position)",
                    (last, sorted(names)),
                )
            applied += result.applied
            position = last
            if progress is not None:
                progress(position, applied)
            if not more:
                return applied

    # -- rebuilding -------------------------------------------------------------------------------

    def reset(self) -> None:
        """Empty every table of these projections and forget their positions."""
        conn = self.connection()
        names = [p.name for p in self.projections]
        with conn.transaction():
            # The versions first, whole: a worker's batch locks them before it writes the read
            # models, so it either finishes before this or waits for it, never holding one while
            # waiting for the other. It also keeps a worker from adding a row between the look
            # below and the emptying.
            conn.execute("LOCK TABLE projection_versions IN ACCESS EXCLUSIVE MODE")
            for projection in self.projections:
                for table in projection.tables:
                    conn.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(table)))
            # Rows of no other projection go; the others lose these projections' entries. When no
            # row names another projection (a rebuild of all of them), the table is emptied whole:
            # deleting every row left as many dead ones, and each replay after it ran slower until
            # a vacuum.
            if conn.execute("SELECT EXISTS (SELECT FROM projection_versions WHERE applied - %s::text[] <> '{}'::jsonb)",
                            (names,)).fetchone() == (False,):
                conn.execute("TRUNCATE projection_versions")
            else:
                conn.execute("DELETE FROM projection_versions WHERE applied - %s::text[] = '{}'::jsonb", (names,))
                conn.execute("UPDATE projection_versions SET applied = applied - %s::text[]"
                             " WHERE applied ?| %s::text[]", (names, names))
            conn.execute("DELETE FROM projection_checkpoints WHERE projection = ANY(%s)", (names,))

    def last_position(self) -> int:
        """The outbox's newest position: how far a rebuild goes (for its progress)."""
        row = self.connection().execute("SELECT COALESCE(max(position), 0) FROM public.outbox").fetchone()
        return int(row[0]) if row else 0

    def rebuild(self, progress: Progress | None = None) -> int:
        self.reset()
        # From empty read models nothing is applied yet: nothing to skip, and no need to ask.
        return self.catch_up(grace=timedelta(0), batch_size=REPLAY_PAGE, progress=progress, skip_applied=False)

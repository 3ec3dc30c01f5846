"""Projection apply: ``ProjectionStore.apply_batch`` with every read model against raw
``executemany`` inserts of the same number of rows.

Ours applies each event to the status, analytics, audit and balances projections with the
per-aggregate version check, in batches of the worker's size, one transaction per batch. The
baseline writes one plain row per event into one table, in the same batches and transactions:
the least PostgreSQL can do to take in the same events. The events are a realistic start of a
session's life: opened, then link sent (an insert, then updates), for half as many sessions.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg.types.json import Jsonb

from api.bootstrap import envelope_opener, personal_data_reader
from application.envelope import EventEnvelope
from bench.context import BenchContext
from bench.harness import Benchmark, Metric, Sample
from projections.engine import ProjectionStore
from projections.registry import all_projections

BATCH_SIZE = 500  # projections/worker.py takes batches of this size from Kafka

_BASELINE_TABLE = """
CREATE TABLE IF NOT EXISTS bench_baseline_projection (
    position bigint PRIMARY KEY,
    event_id uuid NOT NULL,
    aggregate_id uuid NOT NULL,
    event_type text NOT NULL,
    occurred_at timestamptz NOT NULL,
    data jsonb NOT NULL
)
"""

T = TypeVar("T")


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class ProjectionApply(Benchmark):
    name = "projections.apply_batch"
    ours = "ProjectionStore.apply_batch, all four projections, batches of 500"
    baseline = "executemany INSERT of one row per event, same batches and transactions"
    metrics = (
        # The read side must keep up with the write side (hundreds of events/s, write.* below) with
        # room to catch up after an outage; raw executemany takes in well over 10k rows/s.
        Metric("events_per_s", "events/s", higher_is_better=True, target_ratio=20.0,
               target_why="keeps well ahead of the write path while catching up"),
    )

    def __init__(self, ctx: BenchContext, events: int) -> None:
        self.ctx = ctx
        self.sessions = max(1, events // 2)
        self._store: ProjectionStore | None = None
        self._conn: psycopg.Connection[Any] | None = None
        self._envelopes: list[EventEnvelope] = []
        self._rows: list[tuple[Any, ...]] = []

    def setup(self) -> None:
        ctx = self.ctx
        session_ids = ctx.seed_sessions("projection", self.sessions, send_link=True)
        self._envelopes = ctx.envelopes(session_ids)
        self._rows = [(e.position, e.event_id, e.aggregate_id, e.event_type, e.occurred_at, Jsonb(e.data))
                      for e in self._envelopes]
        projections = list(all_projections(personal_data_reader(ctx.settings)).values())
        self._store = ProjectionStore(ctx.database_url, projections, envelope_opener(ctx.settings))
        self._conn = psycopg.connect(ctx.database_url)
        with self._conn.transaction():
            self._conn.execute(_BASELINE_TABLE)

    def run_ours(self, round_no: int) -> Sample:
        assert self._store is not None
        store = self._store
        store.reset()  # every read model empty, every version forgotten: all events apply
        applied = 0  # counts each event once per projection
        started = time.perf_counter()
        for batch in chunks(self._envelopes, BATCH_SIZE):
            applied += store.apply_batch(batch).applied
        elapsed = time.perf_counter() - started
        if applied != len(self._envelopes) * len(store.projections):
            raise RuntimeError(f"applied {applied} of {len(self._envelopes)} events x "
                               f"{len(store.projections)} projections")
        return {"events_per_s": len(self._envelopes) / elapsed}

    def run_baseline(self, round_no: int) -> Sample:
        assert self._conn is not None
        conn = self._conn
        with conn.transaction():
            conn.execute("TRUNCATE bench_baseline_projection")
        started = time.perf_counter()
        for batch in chunks(self._rows, BATCH_SIZE):
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO bench_baseline_projection"
                    " (position, event_id, aggregate_id, event_type, occurred_at, data)"
                    " VALUES (%s, %s, %s, %s, %s, %s)",
                    batch,
                )
        elapsed = time.perf_counter() - started
        return {"events_per_s": len(self._rows) / elapsed}

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def describe(self) -> dict[str, Any]:
        return {"events_per_round": len(self._envelopes), "batch_size": BATCH_SIZE,
                "projections": [p for p in all_projections()]}

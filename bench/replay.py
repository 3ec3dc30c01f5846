"""Replay: ``echotransact replay --projection all`` and ``replay --verify`` (the functions the
command runs, on the bench's database: every read model emptied and rebuilt from the outbox,
in pages) against a plain ``SELECT`` of the same outbox rows, fetched by one client.

Issue 8's targets: replay at least 0.25x the plain read's rows/s, verify at least 0.15x.
The outbox holds whatever the benchmarks before this one wrote, and at least the seeded
sessions (opened and link sent: two events each).
"""

from __future__ import annotations

import time
from typing import Any

import psycopg

from api.bootstrap import envelope_opener, personal_data_reader
from bench.context import BenchContext
from bench.harness import Benchmark, Metric, Sample
from projections.registry import all_projections
from projections.replay import rebuild, verify


class Replay(Benchmark):
    def __init__(self, ctx: BenchContext, events: int, *, check: bool = False) -> None:
        self.ctx = ctx
        self.events = events
        self.check = check
        self.name = "e2e.replay" + (".verify" if check else "")
        self.ours = ("replay --verify: rebuild every read model into a scratch schema and compare" if check
                     else "replay --projection all: empty every read model and rebuild it from the outbox")
        self.baseline = "a plain SELECT of the same outbox rows (position, envelope), one client"
        target, why = (1 / 0.15, "issue 8: verify at least 0.15x a plain read") if check else (
            4.0, "issue 8: replay at least 0.25x a plain read")
        self.metrics = (Metric("events_per_s", "events/s", higher_is_better=True, target_ratio=target,
                               target_why=why),)
        self._count = 0

    def setup(self) -> None:
        with psycopg.connect(self.ctx.database_url) as conn:
            row = conn.execute("SELECT count(*) FROM outbox").fetchone()
        have = int(row[0]) if row else 0
        if have < self.events:
            self.ctx.seed_sessions(f"replay-{self.name}", (self.events - have + 1) // 2, send_link=True)
        with psycopg.connect(self.ctx.database_url) as conn:
            row = conn.execute("SELECT count(*) FROM outbox").fetchone()
        self._count = int(row[0]) if row else 0

    def run_ours(self, round_no: int) -> Sample:
        projections = list(all_projections(personal_data_reader(self.ctx.settings)).values())
        started = time.perf_counter()
        if self.check:
            differences = verify(self.ctx.database_url, projections, envelope_opener(self.ctx.settings))
            if differences:
                raise RuntimeError(f"replay --verify found {len(differences)} difference(s), e.g. {differences[0]}")
        else:
            rebuild(self.ctx.database_url, projections, envelope_opener(self.ctx.settings))
        return {"events_per_s": self._count / (time.perf_counter() - started)}

    def run_baseline(self, round_no: int) -> Sample:
        started = time.perf_counter()
        with psycopg.connect(self.ctx.database_url) as conn, conn.cursor(binary=True) as cur:
            cur.execute("SELECT position, envelope FROM outbox ORDER BY position")
            rows = cur.fetchall()
        if len(rows) < self._count:
            raise RuntimeError(f"read {len(rows)} rows, expected {self._count}")
        return {"events_per_s": len(rows) / (time.perf_counter() - started)}

    def describe(self) -> dict[str, Any]:
        return {"events": self._count, "projections": list(all_projections())}

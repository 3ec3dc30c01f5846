"""Scale-out: the same work with two processes against one, each a real ``echotransact relay``
process as ``echotransact run --relays N`` starts it, on the bench's servers.

``scale.relays``: a backlog of outbox rows (the seeded sessions' events, marked unpublished at
once and announced with the commit NOTIFY the relays wait for), drained by 2 relays (ours)
against 1 relay (the baseline); the time runs until every row is marked published. Between
the sides, relays are stopped or started and the work waits until the live relays hold every
lock partition between them. The machine has 2 cores shared with PostgreSQL and the broker:
the ratio reports what a second process buys here (below 1.0x: the pair is faster).

``scale.workers`` is not built yet.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

import psycopg

from api.bootstrap import app_database_url
from bench.context import BenchContext
from bench.e2e import REPO, _keys
from bench.harness import Benchmark, Metric, Sample

_PARTITIONS = 16  # the relay's default lock_partitions
_PARTITION_LOCKS = 0x4F52_0001  # adapters/kafka/relay.py _PARTITION_LOCK_NAMESPACE
_DEADLINE_S = 120.0


class ScaleRelays(Benchmark):
    name = "scale.relays"
    ours = "2 `echotransact relay` processes draining an outbox backlog"
    baseline = "1 `echotransact relay` process draining the same backlog"
    metrics = (Metric("messages_per_s", "messages/s", higher_is_better=True, target_ratio=1.0,
                      target_why="issue 14: report what a second relay buys on this machine"),)

    def __init__(self, ctx: BenchContext, rows: int) -> None:
        self.ctx = ctx
        self.rows = rows
        self._ids: list[int] = []
        self._relays: list[subprocess.Popen[bytes]] = []

    def setup(self) -> None:
        ctx = self.ctx
        sessions = ctx.seed_sessions("scale-relays", self.rows)
        self._ids = [r[0] for r in ctx.outbox_rows(sessions)]
        with psycopg.connect(ctx.database_url, autocommit=True) as conn:
            # Nothing waits while relays start: only the timed rounds make a backlog.
            conn.execute("UPDATE outbox SET published_at = now() WHERE published_at IS NULL")

    def _start(self) -> None:
        env = {**os.environ, "DATABASE_URL": app_database_url(self.ctx.database_url),
               "REDIS_URL": self.ctx.servers.redis_url,
               "KAFKA_BOOTSTRAP_SERVERS": self.ctx.servers.kafka_bootstrap_servers,
               "ECHOTRANSACT_TOPIC_PREFIX": f"bench-{self.ctx.run_token}-scale", **_keys(self.ctx),
               "PGAPPNAME": f"echotransact-bench-relay-{len(self._relays) + 1}"}
        env.pop("MIGRATION_DATABASE_URL", None)
        self._relays.append(subprocess.Popen([sys.executable, "-m", "api.cli", "relay"], cwd=REPO, env=env,
                                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL))

    def _stop_one(self) -> None:
        relay = self._relays.pop()
        relay.send_signal(signal.SIGTERM)
        try:
            relay.wait(30)
        except subprocess.TimeoutExpired:
            relay.kill()
            relay.wait(10)

    def _use(self, count: int) -> None:
        """Exactly ``count`` relays, holding every lock partition between them, each some, and
        warm (a relay makes its producer, and learns the topics, at its first batch)."""
        if len(self._relays) == count:
            return
        while len(self._relays) > count:
            self._stop_one()
        while len(self._relays) < count:
            self._start()
        deadline = time.monotonic() + _DEADLINE_S
        with psycopg.connect(self.ctx.database_url, autocommit=True) as conn:
            while True:
                holders = conn.execute(
                    "SELECT pid, count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = %s::oid"
                    " AND objsubid = 2 AND granted AND database = (SELECT oid FROM pg_database"
                    " WHERE datname = current_database()) GROUP BY pid", (_PARTITION_LOCKS,)).fetchall()
                if len(holders) == count and sum(n for _, n in holders) == _PARTITIONS \
                        and max(n for _, n in holders) <= -(-_PARTITIONS // count):
                    break
                if time.monotonic() > deadline or any(r.poll() is not None for r in self._relays):
                    raise RuntimeError(f"{count} relay(s) never shared the partitions: {holders}")
                time.sleep(0.2)

        self._drain()  # untimed

    def _drain(self) -> Sample:
        with psycopg.connect(self.ctx.database_url, autocommit=True) as conn:
            started = time.perf_counter()
            with conn.transaction():
                conn.execute("UPDATE outbox SET published_at = NULL, publish_attempts = 0, last_error = NULL"
                             " WHERE outbox_id = ANY(%s)", (self._ids,))
                conn.execute("NOTIFY ledger_events")
            while True:
                row = conn.execute("SELECT count(*) FROM outbox WHERE outbox_id = ANY(%s) AND published_at IS NULL",
                                   (self._ids,)).fetchone()
                if row == (0,):
                    break
                if time.perf_counter() - started > _DEADLINE_S:
                    raise RuntimeError(f"{row} rows still unpublished after {_DEADLINE_S:g} s")
                time.sleep(0.01)
            return {"messages_per_s": len(self._ids) / (time.perf_counter() - started)}

    def run_ours(self, round_no: int) -> Sample:
        self._use(2)
        return self._drain()

    def run_baseline(self, round_no: int) -> Sample:
        self._use(1)
        return self._drain()

    def close(self) -> None:
        while self._relays:
            self._stop_one()

    def describe(self) -> dict[str, Any]:
        return {"rows_per_round": len(self._ids), "lock_partitions": _PARTITIONS}

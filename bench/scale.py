"""Scale-out: the same work with two processes against one, each a real ``echotransact relay``
process as ``echotransact run --relays N`` starts it, on the bench's servers.

``scale.relays``: a backlog of outbox rows (the seeded sessions' events, marked unpublished at
once and announced with the commit NOTIFY the relays wait for), drained by 2 relays (ours)
against 1 relay (the baseline); the time runs until every row is marked published. Between
the sides, relays are stopped or started and the work waits until the live relays hold every
lock partition between them. The machine has 2 cores shared with PostgreSQL and the broker:
the ratio reports what a second process buys here (below 1.0x: the pair is faster).

``scale.workers``: a backlog of events (the seeded sessions') taken into the read models by 2
workers (ours) against 1 (the baseline), each an ``echotransact worker`` process as
``echotransact run --workers M`` starts it. Before each side the read models are emptied and the
workers started and left to join a consumer group of their own (on topics of their own); then
the events are produced again and the time runs until every session is in the read model. Catch-up from the
outbox is held off (its checkpoints moved past the backlog, its interval an hour), so the events
come through Kafka only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

import msgspec
import psycopg
from confluent_kafka import Producer

from adapters.kafka.topics import ensure_topics
from api.bootstrap import app_database_url, envelope_opener, personal_data_reader
from application.envelope import encode
from bench.context import BenchContext
from bench.e2e import REPO, _keys
from bench.harness import Benchmark, Metric, Sample
from projections.engine import ProjectionStore
from projections.registry import all_projections

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
            conn.execute("DELETE FROM outbox_pending")

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
                conn.execute("INSERT INTO outbox_pending (outbox_id) SELECT unnest(%s::bigint[])"
                             " ON CONFLICT (outbox_id) DO NOTHING", (self._ids,))
                conn.execute("NOTIFY ledger_events")
            while True:
                row = conn.execute("SELECT count(*) FROM outbox_pending WHERE outbox_id = ANY(%s)",
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


_JOIN_S = 8.0  # a consumer group on this broker settles within a few rebalance timeouts (2 s)
_PROBE_S = 30.0


class ScaleWorkers(Benchmark):
    name = "scale.workers"
    ours = "2 `echotransact worker` processes taking a backlog from Kafka into the read models"
    baseline = "1 `echotransact worker` process taking the same backlog"
    metrics = (Metric("events_per_s", "events/s", higher_is_better=True, target_ratio=1.0,
                      target_why="issue 14: report what a second worker buys on this machine"),)

    def __init__(self, ctx: BenchContext, sessions: int) -> None:
        self.ctx = ctx
        self.sessions = sessions
        self._session_ids: list[str] = []
        self._messages: list[tuple[str, bytes, bytes, list[tuple[str, str | bytes | None]]]] = []
        self._prefix = ""  # the current attempt's topics
        self._attempts = 0
        self._producer: Producer | None = None
        self._workers: list[subprocess.Popen[bytes]] = []

    def setup(self) -> None:
        ctx = self.ctx
        sessions = ctx.seed_sessions("scale-workers", self.sessions, send_link=True)
        self._session_ids = [str(s) for s in sessions]
        # The events as the relay sends them, each attempt to topics of its own (a topic name
        # without its prefix here): its consumer group reads only them.
        open_envelope = envelope_opener(ctx.settings)
        for _outbox_id, position, event_id, topic, key, payload in ctx.outbox_rows(sessions):
            envelope = open_envelope(bytes(payload))
            self._messages.append((
                topic.removeprefix(ctx.settings.topic_prefix), key.encode(),
                encode(msgspec.structs.replace(envelope, position=position)),
                [("event_id", str(event_id).encode()), ("event_type", envelope.event_type.encode()),
                 ("aggregate_type", envelope.aggregate_type.encode())]))
        self._producer = Producer({"bootstrap.servers": ctx.servers.kafka_bootstrap_servers,
                                   "enable.idempotence": True, "linger.ms": 5})

    def _stop_workers(self) -> None:
        for worker in self._workers:
            worker.send_signal(signal.SIGTERM)
        for worker in self._workers:
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(10)
        self._workers = []

    def _round(self, count: int) -> Sample:
        ctx = self.ctx
        store = ProjectionStore(ctx.database_url, list(all_projections(personal_data_reader(ctx.settings)).values()),
                                envelope_opener(ctx.settings))
        try:
            store.reset()
            with psycopg.connect(ctx.database_url, autocommit=True) as conn:
                conn.execute("INSERT INTO projection_checkpoints (projection, position)"
                             " SELECT n, (SELECT COALESCE(max(position), 0) FROM outbox) FROM unnest(%s::text[]) n",
                             ([p.name for p in store.projections],))
        finally:
            store.close()
        with psycopg.connect(ctx.database_url, autocommit=True) as conn:
            # A probe (the first session's events) proves the group has joined and consumes.
            # Seen here about once in three runs: a consumer group of freshly started workers
            # that never consumes on this broker (Tansu), whatever is restarted; so each attempt
            # is a group of its own, on topics of its own.
            probe, backlog = self._messages[:2], self._messages[2:]
            for attempt in range(3):
                self._stop_workers()
                self._attempts += 1
                self._prefix = f"bench-{ctx.run_token}-workers{self._attempts}"
                ensure_topics(ctx.servers.kafka_bootstrap_servers, self._prefix)
                env = {**os.environ, "DATABASE_URL": app_database_url(ctx.database_url),
                       "REDIS_URL": ctx.servers.redis_url,
                       "KAFKA_BOOTSTRAP_SERVERS": ctx.servers.kafka_bootstrap_servers,
                       "ECHOTRANSACT_TOPIC_PREFIX": self._prefix, "ECHOTRANSACT_CATCH_UP_EVERY_S": "3600",
                       **_keys(ctx)}
                env.pop("MIGRATION_DATABASE_URL", None)
                for i in range(count):
                    self._workers.append(subprocess.Popen(
                        [sys.executable, "-m", "api.cli", "worker"], cwd=REPO,
                        env={**env, "PGAPPNAME": f"echotransact-bench-worker-{i + 1}"},
                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                time.sleep(_JOIN_S)
                self._publish(probe)
                if self._wait_for(conn, self._session_ids[:1], time.perf_counter(), deadline_s=_PROBE_S,
                                  required=attempt == 2):
                    break
            started = time.perf_counter()
            self._publish(backlog)
            self._wait_for(conn, self._session_ids, started)
            elapsed = time.perf_counter() - started
        return {"events_per_s": len(backlog) / elapsed}

    def _publish(self, messages: list[tuple[str, bytes, bytes, list[tuple[str, str | bytes | None]]]]) -> None:
        assert self._producer is not None
        for topic, key, value, headers in messages:
            while True:
                try:
                    self._producer.produce(self._prefix + topic, value=value, key=key, headers=headers)
                    break
                except BufferError:
                    self._producer.poll(0.1)
        if self._producer.flush(_DEADLINE_S):
            raise RuntimeError("the benchmark's producer could not deliver the events")

    def _wait_for(self, conn: psycopg.Connection[Any], sessions: list[str], started: float, *,
                  deadline_s: float = _DEADLINE_S, required: bool = True) -> bool:
        """Until every one of these sessions is in the read model; past ``deadline_s``, an error
        (or False when not ``required``)."""
        while True:
            row = conn.execute("SELECT count(*) FROM session_status WHERE session_id = ANY(%s::uuid[])",
                               (sessions,)).fetchone()
            if row == (len(sessions),):
                return True
            if any(w.poll() is not None for w in self._workers):
                raise RuntimeError("a worker exited")
            if time.perf_counter() - started > deadline_s:
                if not required:
                    return False
                raise RuntimeError(f"{row} of {len(sessions)} sessions in the read model after {deadline_s:g} s")
            time.sleep(0.01)

    def run_ours(self, round_no: int) -> Sample:
        return self._round(2)

    def run_baseline(self, round_no: int) -> Sample:
        return self._round(1)

    def close(self) -> None:
        self._stop_workers()
        self._producer = None

    def describe(self) -> dict[str, Any]:
        return {"events_per_round": len(self._messages) - 2, "sessions": len(self._session_ids), "join_s": _JOIN_S}

"""The outbox relay: publishes the outbox's rows to Kafka, at least once and in order per aggregate.

Design
------
* The outbox is split into ``lock_partitions`` lock partitions by the row's key (the aggregate id),
  computed in SQL as ``(hashtext(message_key) % P + P) % P``. One aggregate always falls in one
  lock partition.
* A relay owns a partition while it holds the session-level advisory lock
  ``(_PARTITION_LOCK_NAMESPACE, partition)`` on its own long-lived connection. PostgreSQL drops the
  lock when that session ends, so a crashed relay's partitions are free again at once. Only the
  owner publishes a partition's rows, oldest ``outbox_id`` first; per aggregate ``outbox_id`` order is
  version order (a version is saved only after the previous one committed).
* Each relay also holds a member lock ``(_MEMBER_LOCK_NAMESPACE, backend pid)``; counting those in
  ``pg_locks`` gives the number of live relays N. Every ``rebalance_interval_s`` a relay keeps at most
  ``ceil(P / N)`` partitions: it releases extras (between batches, with nothing in flight) and tries
  to lock free ones. The shares add up to at least P, so every partition gets an owner.
* Woken by a commit within ``gather_s`` (20 ms) of a batch that published something (the relay
  is under load), it waits ``gather_s`` before reading the next, so that one produce request
  carries the rows of many commits: at about 230 commands/s this cut the broker's CPU per command
  by half, for about 15-20 ms more read-model lag. A commit after a rest is read at once.
* The work list is ``outbox_pending``: one narrow row per outbox row not yet published, written by
  ``ledger_append`` in the save's own statement (migrations/0028_outbox_pending.sql). A batch is
  produced, flushed, and only rows whose delivery report said success leave the list (one DELETE).
  Per key, that stops at the first failure; failed rows get ``publish_attempts + 1`` and
  ``last_error`` and are sent again (with their successors) later. The outbox row itself is never
  changed: marking it published rewrote the whole row and its index entries, the relay's largest cost.
* Kafka keeps each key on one partition (``murmur2_random``, the Java clients' partitioner) and the
  idempotent producer keeps the order inside a partition. A relay killed between delivery and
  marking sends those rows again: consumers dedupe by event id or (aggregate id, version).

All relays on one database must use the same ``lock_partitions``. The connection must be a real
session (no transaction-pooling PgBouncer), since the advisory locks live in it.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Self

import msgspec
import psycopg
import structlog
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from opentelemetry.trace import SpanKind
from prometheus_client import Counter

from adapters import tracing
from adapters.backoff import backoff_s
from adapters.postgres.connection import listen_for_commits, wait_for_commit
from application.envelope import DEFAULT_TOPIC_PREFIX, EnvelopeOpener, encode, event_topics

__all__ = ["EVENT_TOPICS", "OutboxRelay", "RelayStats", "run_relay"]

_log = structlog.get_logger(__name__)

EVENT_TOPICS = tuple(event_topics(DEFAULT_TOPIC_PREFIX))

# Advisory-lock key spaces (first int4 of the two-key form). Arbitrary, but fixed: every relay
# version must use the same numbers or two relays could publish one aggregate at once.
_PARTITION_LOCK_NAMESPACE = 0x4F52_0001  # "OR" 1: outbox relay, partition locks
_MEMBER_LOCK_NAMESPACE = 0x4F52_0002  # "OR" 2: outbox relay, one per live relay

_MIN_BACKOFF_S = 0.5
_MAX_BACKOFF_S = 30.0
# Keys skipped after a row that cannot be opened. Bounded: when every row fails (a wrong key in
# the configuration, say) skipping stops helping, and the relay simply retries with back-off.
_MAX_POISONED_KEYS = 1_000
# A failure of the same kind is logged at most this often; a broker that is down reports it
# every few hundred milliseconds.
_LOG_EVERY_S = 30.0

# Prometheus counters of this process (api/metrics.py serves them); rate() of the first is the
# publish rate. The backlog is a scrape-time gauge (adapters/postgres/metrics.py).
PUBLISHED = Counter("echotransact_relay_published_messages_total", "Outbox rows published to Kafka and marked")
FAILED = Counter("echotransact_relay_failed_messages_total", "Outbox rows whose delivery failed (sent again later)")
BATCHES = Counter("echotransact_relay_batches_total", "Batches the relay produced and flushed")

# Advisory locks are per database; pg_locks shows the whole cluster.
_LOCKS_IN_NAMESPACE = """
    SELECT objid::bigint FROM pg_locks
    WHERE locktype = 'advisory' AND classid = %s::oid AND objsubid = 2 AND granted
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""

# The pending ids in order, each outbox row found by its key: the subquery (OFFSET 0 keeps the
# planner from flattening it) stops the planner from merging the work list with the whole outbox,
# which read every outbox row from the first one on at each batch (3-7 ms with 10,000 rows, and
# growing with the outbox forever) instead of a probe per pending row (under 1 ms for 500).
_FETCH_BATCH = """
    SELECT o.outbox_id, o.position, o.event_id::text, o.topic, o.message_key, o.envelope
    FROM outbox_pending p
    CROSS JOIN LATERAL (SELECT * FROM outbox WHERE outbox.outbox_id = p.outbox_id OFFSET 0) o
    WHERE (hashtext(o.message_key) %% %(lock_partitions)s + %(lock_partitions)s) %% %(lock_partitions)s
          = ANY(%(partitions)s::int[])
      AND NOT o.message_key = ANY(%(poisoned)s::text[])
    ORDER BY p.outbox_id
    LIMIT %(limit)s
"""

# A relay holding every lock partition (the usual single relay) needs no filter of partitions: it
# does not hash every pending row's key.
_FETCH_BATCH_ALL_PARTITIONS = """
    SELECT o.outbox_id, o.position, o.event_id::text, o.topic, o.message_key, o.envelope
    FROM outbox_pending p
    CROSS JOIN LATERAL (SELECT * FROM outbox WHERE outbox.outbox_id = p.outbox_id OFFSET 0) o
    WHERE NOT o.message_key = ANY(%(poisoned)s::text[])
    ORDER BY p.outbox_id
    LIMIT %(limit)s
"""

_MARK_PUBLISHED = """
    DELETE FROM outbox_pending WHERE outbox_id = ANY(%s::bigint[])
"""

_MARK_FAILED = """
    UPDATE outbox_pending AS p
    SET publish_attempts = p.publish_attempts + 1, last_error = f.error
    FROM unnest(%s::bigint[], %s::text[]) AS f(outbox_id, error)
    WHERE p.outbox_id = f.outbox_id
"""

# Settings the topic admin client shares with the producer (where the broker is, how to log in).
_SHARED_CLIENT_PREFIXES = (
    "bootstrap.servers", "client.id", "security.", "sasl.", "ssl.", "socket.", "reconnect.",
    "broker.address.family", "log_level", "logger", "error_cb",
)


@dataclass
class RelayStats:
    """Counters since the relay started; for logs, health checks and tests."""

    batches: int = 0
    published: int = 0
    failed: int = 0
    # A later row of a key was delivered after an earlier one failed: Kafka holds that key out of
    # order until the failed row is sent again. Only librdkafka's message timeout can cause it.
    order_gaps: int = 0


class _Row(NamedTuple):
    outbox_id: int
    position: int
    event_id: str
    topic: str
    message_key: str
    envelope: bytes


class _Pending:
    """Delivery not reported (yet): the row is treated as not published."""


_PENDING = _Pending()


class _KafkaLog:
    """librdkafka's log lines into structlog: info and debug chatter dropped, the rest rate-limited
    per facility (a dead broker makes it log every reconnect attempt)."""

    def __init__(self, log_limited: Callable[..., None]) -> None:
        self._log_limited = log_limited

    def log(self, level: int, fmt: str, *args: Any) -> None:
        if level >= logging.WARNING:
            facility = args[0] if args else ""
            message = fmt % args if args else fmt
            self._log_limited(f"librdkafka:{facility}", "kafka_client_log", message=message)


class OutboxRelay:
    def __init__(
        self,
        database_url: str,
        bootstrap_servers: str,
        *,
        open_envelope: EnvelopeOpener,
        batch_size: int = 500,
        poll_interval_s: float = 1.0,
        gather_s: float = 0.02,
        partitions_per_topic: int = 8,
        lock_partitions: int = 16,
        rebalance_interval_s: float = 2.0,
        replication_factor: int = -1,  # -1: the broker's default.replication.factor
        topic_timeout_s: float = 10.0,
        producer_config: Mapping[str, Any] | None = None,
        topic_prefix: str = DEFAULT_TOPIC_PREFIX,
    ) -> None:
        if batch_size < 1 or lock_partitions < 1 or partitions_per_topic < 1:
            raise ValueError("batch_size, lock_partitions and partitions_per_topic must be positive")
        if gather_s < 0:
            raise ValueError(f"gather_s must be 0 or more, not {gather_s}")
        self.database_url = database_url
        self.open_envelope = open_envelope
        self.batch_size = batch_size
        self.poll_interval_s = poll_interval_s
        self.gather_s = gather_s
        self.partitions_per_topic = partitions_per_topic
        self.lock_partitions = lock_partitions
        self.rebalance_interval_s = rebalance_interval_s
        self.replication_factor = replication_factor
        self.topic_timeout_s = topic_timeout_s
        self.topics = tuple(event_topics(topic_prefix))
        self.producer_config: dict[str, Any] = {
            "bootstrap.servers": bootstrap_servers,
            "client.id": "echotransact-outbox-relay",
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "lz4",
            # Bounded, so a batch sent to a dead broker is reported as failed and the loop goes on.
            "message.timeout.ms": 10_000,
            # The Java clients' key hashing: a Java producer or Kafka Streams agrees on partitions.
            "partitioner": "murmur2_random",
            "error_cb": self._on_kafka_error,
            "logger": _KafkaLog(self._log_limited),
            **(producer_config or {}),
        }
        # Every delivery report arrives within message.timeout.ms; the margin covers the last poll.
        self._flush_timeout_s = int(self.producer_config["message.timeout.ms"]) / 1000 + 5.0
        self.stats = RelayStats()
        self._conn: psycopg.Connection[Any] | None = None
        self._producer: Producer | None = None
        self._held: set[int] = set()
        # Keys held back by a row that cannot be opened, so that they do not fill every batch and
        # starve the other keys. Forgotten on restart, when the row is tried again.
        self._poisoned: set[str] = set()
        self._next_rebalance = 0.0
        self._fatal_kafka_error: KafkaError | None = None
        self._last_logged: dict[str, float] = {}
        self._stop: threading.Event | None = None
        self.topics_ready = False

    # -- public ------------------------------------------------------------------------------

    @property
    def held_partitions(self) -> frozenset[int]:
        return frozenset(self._held)

    def ensure_topics(self) -> None:
        """Create the three event topics; topics that exist are left as they are."""
        admin_config = {
            k: v for k, v in self.producer_config.items() if k.startswith(_SHARED_CLIENT_PREFIXES)
        }
        admin = AdminClient(admin_config)  # must outlive the futures: they fail once it is freed
        futures = admin.create_topics(
            [NewTopic(t, num_partitions=self.partitions_per_topic, replication_factor=self.replication_factor)
             for t in self.topics],
            request_timeout=self.topic_timeout_s,
        )
        for topic, future in futures.items():
            try:
                future.result(timeout=self.topic_timeout_s + 5)
            except KafkaException as error:
                if error.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
            else:
                _log.info("outbox_relay.topic_created", topic=topic, partitions=self.partitions_per_topic)
        self.topics_ready = True

    def run_once(self) -> int:
        """Publish one batch of the owned partitions' rows; return how many were marked published."""
        conn = self._connection()
        if time.monotonic() >= self._next_rebalance:
            self._rebalance(conn)
        if not self._held:
            return 0
        rows = [
            _Row._make(r)
            for r in conn.execute(
                _FETCH_BATCH_ALL_PARTITIONS if len(self._held) == self.lock_partitions else _FETCH_BATCH,
                {"lock_partitions": self.lock_partitions, "partitions": sorted(self._held),
                 "poisoned": sorted(self._poisoned), "limit": self.batch_size},
                binary=True,
            )
        ]
        if not rows:
            return 0
        outcomes = self._send(rows)
        published, failed = self._settle(rows, outcomes)
        if failed:
            with conn.transaction():
                if published:
                    conn.execute(_MARK_PUBLISHED, (published,))
                conn.execute(_MARK_FAILED, ([i for i, _ in failed], [e for _, e in failed]))
        elif published:
            conn.execute(_MARK_PUBLISHED, (published,))  # a statement of its own: one round trip
        self.stats.batches += 1
        self.stats.published += len(published)
        self.stats.failed += len(failed)
        BATCHES.inc()
        PUBLISHED.inc(len(published))
        if failed:
            FAILED.inc(len(failed))
        if failed:
            self._log_limited(
                "batch_failed", "outbox_relay.delivery_failed",
                failed=len(failed), published=len(published), error=failed[0][1],
            )
        if self._fatal_kafka_error is not None:
            # A fatal error (e.g. the idempotent producer lost its sequence) makes the producer
            # unusable; the next batch starts a new one, with a new producer id.
            _log.error("outbox_relay.producer_fatal", error=str(self._fatal_kafka_error))
            self._close_producer(timeout_s=0)
            self._fatal_kafka_error = None
        return len(published)

    def run(self, stop: threading.Event) -> None:
        """Publish until ``stop`` is set. Errors are logged and retried with back-off, never raised:
        the rows wait in the outbox until PostgreSQL and Kafka are both reachable again."""
        self._stop = stop
        failures = 0  # consecutive loops that got nothing through
        _log.info("outbox_relay.started", lock_partitions=self.lock_partitions, batch_size=self.batch_size)
        while not stop.is_set():
            try:
                if not self.topics_ready:
                    self.ensure_topics()
                failed_before = self.stats.failed
                published = self.run_once()
                failed_now = self.stats.failed > failed_before
            except Exception as error:  # the loop must outlive any one failure
                self._log_limited(
                    f"loop:{type(error).__name__}", "outbox_relay.loop_error",
                    error=f"{type(error).__name__}: {error}",
                )
                if isinstance(error, psycopg.Error):
                    self._close_connection()  # reconnect (and re-lock) on the next loop
                published, failed_now = 0, True
            if failed_now:
                # A broker that restarted empty (Tansu keeps topics in memory) knows neither our
                # topics nor our idempotent producer's id: create the topics again (cheap and
                # idempotent) and, when nothing got through, start a new producer.
                self.topics_ready = False
                if not published:
                    self._close_producer(timeout_s=0)
            if failed_now and not published:
                # Give or take a fifth, so relays that lost the same broker do not all return at once.
                stop.wait(backoff_s(failures, base_s=_MIN_BACKOFF_S, cap_s=_MAX_BACKOFF_S, jitter=(0.8, 1.2)))
                failures += 1
                continue
            failures = 0
            if not published or published < self.batch_size:
                waiting_since = time.monotonic()
                self._wait_for_events(stop)
                if published and time.monotonic() - waiting_since < self.gather_s:
                    # Under steady load a commit woke the relay every few milliseconds, and each
                    # wake-up was a produce request of a few rows; the broker's cost is mostly per
                    # request. Let the next batch gather what commits meanwhile. A commit after a
                    # rest (a wait longer than that) goes at once.
                    stop.wait(self.gather_s)
        _log.info("outbox_relay.stopped", **vars(self.stats))

    def _wait_for_events(self, stop: threading.Event) -> None:
        """Until a save commits (NOTIFY), or ``poll_interval_s``: the fallback for a notification
        missed while reconnecting."""
        conn = self._conn
        if conn is None or conn.closed:
            stop.wait(self.poll_interval_s)
            return
        try:
            wait_for_commit(conn, stop, self.poll_interval_s)
        except psycopg.Error:
            self._close_connection()  # reconnect (and listen again) on the next loop

    def close(self) -> None:
        """Wait briefly for messages in flight, then release the partitions (by closing the session)."""
        self._close_producer(timeout_s=5.0)
        self._close_connection()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- partitions ----------------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            conn = psycopg.connect(
                self.database_url, autocommit=True, application_name="echotransact-outbox-relay",
                # A dead peer must end the session (and free its locks) in seconds, not hours.
                keepalives=1, keepalives_idle=15, keepalives_interval=5, keepalives_count=3,
            )
            # A mark is not waited on to reach the disk: a crash of PostgreSQL may forget the last
            # few hundred milliseconds of marks, and those rows are simply published again (at
            # least once, as after a relay crash; consumers drop the copies by event id).
            conn.execute("SET synchronous_commit = off")
            # Never contended: backend pids are unique among live sessions.
            conn.execute("SELECT pg_try_advisory_lock(%s, pg_backend_pid())", (_MEMBER_LOCK_NAMESPACE,))
            listen_for_commits(conn)  # woken by every save
            self._conn = conn
            self._held = set()
            self._next_rebalance = 0.0
        return self._conn

    def _rebalance(self, conn: psycopg.Connection[Any]) -> None:
        live = max(1, len(conn.execute(_LOCKS_IN_NAMESPACE, (_MEMBER_LOCK_NAMESPACE,)).fetchall()))
        share = -(-self.lock_partitions // live)
        jitter = random.uniform(0.8, 1.2)
        if len(self._held) > share:
            # Messages still in librdkafka's queue belong to these partitions: releasing now could
            # let another relay publish a key's later rows before ours land. Wait for them.
            if self._producer is not None and len(self._producer) > 0:
                return
            for partition in sorted(self._held)[share:]:
                conn.execute("SELECT pg_advisory_unlock(%s, %s)", (_PARTITION_LOCK_NAMESPACE, partition))
                self._held.discard(partition)
            _log.info("outbox_relay.partitions_released", held=sorted(self._held), live_relays=live)
        elif len(self._held) < share:
            taken = {r[0] for r in conn.execute(_LOCKS_IN_NAMESPACE, (_PARTITION_LOCK_NAMESPACE,))}
            # Start at a random partition so that relays starting together do not all race for 0.
            start = random.randrange(self.lock_partitions)
            grabbed = []
            for i in range(self.lock_partitions):
                if len(self._held) >= share:
                    break
                partition = (start + i) % self.lock_partitions
                if partition in taken:
                    continue
                locked = conn.execute(
                    "SELECT pg_try_advisory_lock(%s, %s)", (_PARTITION_LOCK_NAMESPACE, partition)
                ).fetchone()
                if locked and locked[0]:
                    self._held.add(partition)
                    grabbed.append(partition)
            if grabbed:
                _log.info("outbox_relay.partitions_acquired", acquired=grabbed, held=sorted(self._held),
                          live_relays=live)
            if len(self._held) < share:
                # Others still hold more than their share; they release within one interval.
                jitter /= 4
        self._next_rebalance = time.monotonic() + self.rebalance_interval_s * jitter

    # -- publishing ----------------------------------------------------------------------------

    def _producer_instance(self) -> Producer:
        if self._producer is None:
            self._producer = Producer(self.producer_config)
        return self._producer

    def _send(self, rows: list[_Row]) -> list[str | _Pending | None]:
        """Produce the rows and wait for their delivery reports: None = delivered, str = error."""
        producer = self._producer_instance()
        outcomes: list[str | _Pending | None] = [_PENDING] * len(rows)
        blocked: set[str] = set()  # keys with a row that could not be produced: keep their order

        def reporter(index: int) -> Callable[[KafkaError | None, Message], None]:
            def on_delivery(error: KafkaError | None, _message: Message) -> None:
                outcomes[index] = None if error is None else f"{error.name()}: {error.str()}"

            return on_delivery

        for index, row in enumerate(rows):
            if row.message_key in blocked:
                continue
            try:
                value, headers = self._message(row)
            except Exception as error:  # a row that cannot be opened must not stop the others
                outcomes[index] = f"envelope: {type(error).__name__}: {error}"
                blocked.add(row.message_key)
                if len(self._poisoned) < _MAX_POISONED_KEYS:
                    self._poisoned.add(row.message_key)
                _log.error("outbox_relay.bad_envelope", outbox_id=row.outbox_id, key=row.message_key,
                           error=outcomes[index], held_back="this key, until the relay restarts")
                continue
            while True:
                try:
                    producer.produce(
                        row.topic, value=value, key=row.message_key.encode(), headers=headers,
                        on_delivery=reporter(index),
                    )
                    break
                except BufferError:
                    producer.poll(0.1)  # librdkafka's queue is full: let deliveries drain it
                except KafkaException as error:
                    outcomes[index] = f"produce: {error.args[0].str()}"
                    blocked.add(row.message_key)
                    break
        deadline = time.monotonic() + self._flush_timeout_s
        # Flush in slices so that a stop request is honoured within a second; rows still in flight
        # then are simply not marked and go again next time.
        while producer.flush(min(1.0, max(0.0, deadline - time.monotonic()))) > 0:
            if time.monotonic() >= deadline or (self._stop is not None and self._stop.is_set()):
                self._log_limited("flush_timeout", "outbox_relay.deliveries_outstanding",
                                  outstanding=len(producer))
                break
        return outcomes

    def _message(self, row: _Row) -> tuple[bytes, list[tuple[str, str | bytes | None]]]:
        envelope = self.open_envelope.passing(row.envelope)
        if envelope.event_id != row.event_id:
            raise ValueError(f"envelope event id {envelope.event_id} != outbox row {row.event_id}")
        context = envelope.trace_context
        if context is not None and tracing.active():
            # The command's trace goes on through a span of ours; the consumer's is its child.
            with tracing.tracer().start_as_current_span(
                f"publish {row.topic}", context=tracing.parent(context), kind=SpanKind.PRODUCER,
                attributes={"messaging.system": "kafka", "messaging.destination.name": row.topic,
                            "echotransact.position": row.position, "echotransact.event_type": envelope.event_type},
            ) as span:
                context = tracing.traceparent(span)
        value = encode(msgspec.structs.replace(envelope, position=row.position, trace_context=context))
        headers: list[tuple[str, str | bytes | None]] = [
            ("event_id", row.event_id.encode()),
            ("event_type", envelope.event_type.encode()),
            ("aggregate_type", envelope.aggregate_type.encode()),
        ]
        if context is not None:  # W3C trace context, for any consumer that reads headers
            headers.append(("traceparent", context.encode()))
        return value, headers

    def _settle(
        self, rows: list[_Row], outcomes: list[str | _Pending | None]
    ) -> tuple[list[int], list[tuple[int, str]]]:
        """Rows to mark published (per key, up to the first failure) and rows that failed."""
        published: list[int] = []
        failed: list[tuple[int, str]] = []
        stopped: set[str] = set()
        for row, outcome in zip(rows, outcomes, strict=True):
            if outcome is None:
                if row.message_key in stopped:
                    # Delivered after an earlier row of its key failed: Kafka now has a gap that
                    # the retry fills later (the consumer sees this row again after it).
                    self.stats.order_gaps += 1
                    _log.warning("outbox_relay.order_gap", outbox_id=row.outbox_id, key=row.message_key)
                else:
                    published.append(row.outbox_id)
                continue
            stopped.add(row.message_key)
            if isinstance(outcome, str):
                failed.append((row.outbox_id, outcome))
            # _PENDING: not produced (an earlier row of its key failed) or not reported in time;
            # nothing is known about it yet, so its attempt counter is left alone.
        return published, failed

    # -- housekeeping --------------------------------------------------------------------------

    def _on_kafka_error(self, error: KafkaError) -> None:
        if error.fatal():
            self._fatal_kafka_error = error
        self._log_limited(f"kafka:{error.code()}", "outbox_relay.kafka_error", error=error.str(),
                          fatal=error.fatal())

    def _log_limited(self, kind: str, event: str, **fields: Any) -> None:
        now = time.monotonic()
        if now - self._last_logged.get(kind, -_LOG_EVERY_S) >= _LOG_EVERY_S:
            self._last_logged[kind] = now
            _log.warning(event, **fields)

    def _close_producer(self, timeout_s: float) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.flush(timeout_s)

    def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        self._held = set()
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:
                pass


def run_relay(
    database_url: str,
    bootstrap_servers: str,
    open_envelope: EnvelopeOpener,
    stop_event: threading.Event,
    **options: Any,
) -> RelayStats:
    """Run one relay until ``stop_event`` is set (the CLI's entry point); returns its counters."""
    relay = OutboxRelay(database_url, bootstrap_servers, open_envelope=open_envelope, **options)
    try:
        relay.run(stop_event)
    finally:
        relay.close()
    return relay.stats

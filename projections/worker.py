"""The Faust stream processor that keeps the read models current.

Thin on purpose: it decodes envelopes from the three event topics, hands batches to the
projection engine (which makes every apply idempotent), refreshes the Redis status cache, and
every few seconds catches up from the outbox whatever Kafka did not deliver. Several workers
share the topics' partitions through Kafka's consumer group; a dead worker's partitions move
to the others.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any
from uuid import UUID

import faust
import msgspec
import psycopg
import redis
import structlog
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import Counter

from application.envelope import DEFAULT_TOPIC_PREFIX, EventEnvelope, decode, event_topics
from projections.engine import OpenEnvelope, Projection, ProjectionStore
from projections.status_cache import StatusCache

log = structlog.get_logger(__name__)

# Beyond this many aggregates with a failed cache write, older ones are forgotten (their entries
# expire within the cache's TTL at most).
MAX_STALE_IN_CACHE = 100_000
# Prometheus counters of this process (api/metrics.py serves them, with each projection's position
# and lag read from the database when scraped). Source: kafka (the stream) or outbox (catch-up).
APPLIED = Counter("echotransact_projection_applied_events_total", "Events applied to the read models (one per "
                  "event and distinct set of projections), by source", ["source"])
DUPLICATES = Counter("echotransact_projection_duplicate_events_total", "Redelivered events skipped as already "
                     "applied (Kafka only)")
BATCHES = Counter("echotransact_projection_batches_total", "Batches applied from Kafka")
_APPLIED_KAFKA, _APPLIED_OUTBOX = APPLIED.labels("kafka"), APPLIED.labels("outbox")
_propagator = TraceContextTextMapPropagator()
RETRYABLE = (psycopg.errors.UniqueViolation, psycopg.errors.DeadlockDetected,
             psycopg.errors.SerializationFailure, psycopg.errors.LockNotAvailable)


def consumer_group(topic_prefix: str) -> str:
    """The Kafka consumer group (the Faust app's id) the projection workers share."""
    return f"{topic_prefix}-projections"


class ProjectionWorker:
    def __init__(
        self,
        *,
        database_url: str,
        kafka_bootstrap_servers: str,
        redis_url: str | None,
        projections: Sequence[Projection],
        open_envelope: OpenEnvelope,
        batch_size: int = 500,
        batch_within_s: float = 0.02,
        catch_up_every_s: float = 5.0,
        catch_up_grace: timedelta = timedelta(seconds=5),
        partitions: int = 8,
        topic_prefix: str = DEFAULT_TOPIC_PREFIX,
    ) -> None:
        self.cache = StatusCache.from_url(redis_url) if redis_url else None
        self._cache_suspect = True  # see _tend_cache
        # Aggregates whose cache write failed (Redis unreachable): retried with the next batch.
        self._stale_in_cache: set[UUID] = set()
        self._stale_lock = threading.Lock()
        on_batch = self._write_cache if self.cache is not None else None
        self.stream_store = ProjectionStore(database_url, projections, open_envelope, on_batch=on_batch)
        self.catch_up_store = ProjectionStore(database_url, projections, open_envelope, on_batch=on_batch)
        self.catch_up_grace = catch_up_grace
        datadir = os.path.join(tempfile.gettempdir(), "echotransact-faust", topic_prefix)
        os.makedirs(datadir, exist_ok=True)
        self.app = faust.App(
            consumer_group(topic_prefix),
            broker=f"kafka://{kafka_bootstrap_servers}",
            value_serializer="raw",
            key_serializer="raw",
            store="memory://",
            # Faust makes "<id>-data/" in the working directory by default; the tables are in
            # memory, so only an empty folder would land there. Keep it out of the checkout.
            datadir=datadir,
            web_enabled=False,
            consumer_auto_offset_reset="earliest",
            topic_partitions=partitions,
            # Tansu (and a small cluster) joins groups only after the rebalance timeout.
            broker_rebalance_timeout=2.0,
            broker_session_timeout=6.0,
            broker_heartbeat_interval=1.0,
        )
        # Fetch with a short wait (see _PromptConsumer); an instance attribute, read when the
        # app creates its consumer.
        # faust types Consumer as a ClassVar; setting it on this app's transport only is intended.
        self.app.transport.Consumer = _PromptConsumer  # type: ignore[misc]
        topics = self.app.topic(*event_topics(topic_prefix), value_type=bytes, key_type=bytes)

        @self.app.agent(topics, name="project")
        async def project(stream: faust.StreamT[bytes]) -> None:
            async for values in stream.take(batch_size, within=batch_within_s):
                envelopes = []
                for value in values:
                    try:
                        envelopes.append(decode(value))
                    except (msgspec.DecodeError, msgspec.ValidationError) as error:
                        # Not ours or corrupt: skipping loses nothing, catch-up reads the outbox.
                        log.error("undecodable_message", error=str(error), size=len(value))
                await asyncio.to_thread(self._apply, self.stream_store, envelopes)

        @self.app.timer(interval=catch_up_every_s)
        async def catch_up() -> None:
            await asyncio.to_thread(self._catch_up)

        self._agent, self._timer = project, catch_up

    def _apply(self, store: ProjectionStore, envelopes: list[EventEnvelope]) -> None:
        started = time.time_ns()
        for attempt in range(1, 8):
            try:
                result = store.apply_batch(envelopes)
                break
            except RETRYABLE as error:
                # Another worker is applying the same aggregates; after it commits our
                # version check turns the overlap into no-ops.
                log.info("projection_batch_retry", attempt=attempt, error=type(error).__name__)
        else:
            raise RuntimeError("projection batch kept conflicting; the catch-up will apply it")
        BATCHES.inc()
        _APPLIED_KAFKA.inc(result.applied)
        DUPLICATES.inc(result.duplicates)
        _trace_applied(envelopes, started)
        log.debug("projection_batch", applied=result.applied, duplicates=result.duplicates,
                  gaps_filled=result.gaps_filled)

    def _write_cache(self, conn: psycopg.Connection[Any], aggregate_ids: Sequence[UUID]) -> None:
        """The batch's status rows to Redis, inside the batch's transaction. Redis being down must
        not stop the read model, so a failed write lets the commit go on and is retried, with
        these aggregates, at the next batch."""
        assert self.cache is not None
        with self._stale_lock:
            ids = [*self._stale_in_cache, *aggregate_ids]
            self._stale_in_cache.clear()
        try:
            self.cache.refresh(conn, ids)
        except redis.RedisError as error:
            log.warning("status_cache_write_failed", aggregates=len(ids), error=str(error))
            with self._stale_lock:
                if len(self._stale_in_cache) < MAX_STALE_IN_CACHE:
                    self._stale_in_cache.update(ids)

    def _tend_cache(self) -> None:
        """Drop the whole status cache when it may hold entries older than the read model: at
        start (a worker that died may have held cache writes that had failed, to retry), and when
        Redis went back in time (restarted from an older snapshot). Until Redis answers, tried
        again at every catch-up."""
        if self.cache is None:
            return
        try:
            if self._cache_suspect:
                dropped = self.cache.clear()
                self.cache.check()  # the clock as it is now: later writes compare with it
                self._cache_suspect = False
                log.info("status_cache_cleared", dropped=dropped)
            else:
                self.cache.check()
        except redis.RedisError as error:
            self._cache_suspect = True
            log.warning("status_cache_unavailable", error=str(error))

    def _catch_up(self) -> None:
        self._tend_cache()
        try:
            applied = self.catch_up_store.catch_up(grace=self.catch_up_grace)
        except RETRYABLE as error:
            log.info("catch_up_retry_later", error=type(error).__name__)
            return
        except psycopg.OperationalError as error:
            log.warning("catch_up_database_unavailable", error=str(error))
            self.catch_up_store.close()
            return
        if applied:
            _APPLIED_OUTBOX.inc(applied)
            log.info("caught_up_from_outbox", applied=applied)

    def run(self) -> None:
        """Run until SIGTERM/SIGINT (Faust's worker handles both and shuts down cleanly)."""
        # Catch up before consuming, so a worker that cannot consume (a broker that is down, a
        # consumer that crashes) still brings the read models forward each time it starts.
        self._catch_up()
        worker = faust.Worker(self.app, loglevel="WARNING", quiet=True, redirect_stdouts=False)
        # No terminal spinner: with one, Faust sets the root logger to DEBUG for it, and every
        # aiokafka debug record is built and then thrown away (about a tenth of the worker's CPU).
        worker.spinner = None
        try:
            worker.execute_from_commandline()
        finally:
            self.stream_store.close()
            self.catch_up_store.close()

    def close(self) -> None:
        self.stream_store.close()
        self.catch_up_store.close()


def _trace_applied(envelopes: Sequence[EventEnvelope], started_ns: int) -> None:
    """A span per traced event of a committed batch, the child of the span its Kafka message
    carried (the relay's): the batch's time, its event. Nothing when tracing is off."""
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return
    tracer, ended = trace.get_tracer("echotransact"), time.time_ns()
    for envelope in envelopes:
        if envelope.trace_context is None:
            continue
        span = tracer.start_span(
            f"project {envelope.event_type}", context=_propagator.extract({"traceparent": envelope.trace_context}),
            kind=trace.SpanKind.CONSUMER, start_time=started_ns,
            attributes={"echotransact.position": envelope.position or 0, "echotransact.batch_size": len(envelopes)},
        )
        span.end(end_time=ended)


# How long a Kafka fetch may wait for data. faust-streaming's aiokafka driver fixes it at
# 1500 ms, and a broker that does not answer a fetch as soon as data arrives (Tansu) then holds
# every event that long: produce -> consume took p50 ~500 ms, max ~1.25 s, against ~35 ms p50
# at 100 ms. A ledger's read side wants the short wait; an idle worker polls a little more.
FETCH_MAX_WAIT_MS = 50


class _PromptConsumerThread(AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # aiokafka reads it when the consumer starts its fetcher (aiokafka 0.12-0.14).
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        return consumer


class _PromptConsumer(AIOKafkaConsumer):
    def _new_consumer_thread(self) -> AIOKafkaConsumerThread:
        return _PromptConsumerThread(self, loop=self.loop, beacon=self.beacon)


def run_worker(**kwargs: Any) -> None:
    # uvloop under Faust and aiokafka: the worker's own CPU is mostly the event loop's (fetch
    # requests, their futures and callbacks), which uvloop runs in C.
    import mode.loop

    mode.loop.use("uvloop")
    ProjectionWorker(**kwargs).run()

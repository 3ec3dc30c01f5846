"""Relay throughput: publishing outbox rows through adapters/kafka/relay.py against producing the same
messages with a bare confluent-kafka Producer.

Both sides use the relay's own producer settings (idempotence, acks=all, lz4, linger) and send
the same keys, values and headers to the same topics, so the ratio is what the relay adds:
reading the outbox, opening (decrypting) each envelope, a flush per batch and marking the rows
published. Between rounds the seeded rows are simply marked unpublished again; publishing an
event twice is what the relay does after a crash anyway, and consumers drop the copies.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
import psycopg
from confluent_kafka import KafkaError, Message, Producer

from adapters.kafka.relay import OutboxRelay
from api.bootstrap import envelope_opener
from application.envelope import encode
from bench.context import BenchContext
from bench.harness import Benchmark, Metric, Sample

_DEADLINE_S = 120.0


class RelayThroughput(Benchmark):
    name = "relay.publish"
    ours = "OutboxRelay.run_once until the rows are published and off the work list, outbox_pending (batches of 500)"
    baseline = "confluent-kafka Producer: produce the same messages, one flush"
    metrics = (
        # The relay must stay far ahead of the write path (hundreds of commands/s); a raw
        # producer does tens of thousands of messages/s here (the baseline of this benchmark).
        Metric("messages_per_s", "messages/s", higher_is_better=True, target_ratio=5.0,
               target_why="at least a fifth of a bare producer, far above the write rate"),
    )

    def __init__(self, ctx: BenchContext, rows: int) -> None:
        self.ctx = ctx
        self.rows = rows
        self._relay: OutboxRelay | None = None
        self._producer: Producer | None = None
        self._outbox_ids: list[int] = []
        self._messages: list[tuple[str, bytes, bytes, list[tuple[str, str | bytes | None]]]] = []
        self._batch_size = 0

    def setup(self) -> None:
        ctx = self.ctx
        session_ids = ctx.seed_sessions("relay", self.rows)
        rows = ctx.outbox_rows(session_ids)
        open_envelope = envelope_opener(ctx.settings)
        self._outbox_ids = [r[0] for r in rows]
        for _outbox_id, position, event_id, topic, key, payload in rows:
            envelope = open_envelope(bytes(payload))
            value = encode(msgspec.structs.replace(envelope, position=position))
            headers: list[tuple[str, str | bytes | None]] = [
                ("event_id", str(event_id).encode()), ("event_type", envelope.event_type.encode()),
                ("aggregate_type", envelope.aggregate_type.encode()),
            ]
            self._messages.append((topic, key.encode(), value, headers))
        self._relay = OutboxRelay(ctx.database_url, ctx.servers.kafka_bootstrap_servers,
                                  open_envelope=open_envelope, topic_prefix=ctx.settings.topic_prefix)
        self._relay.ensure_topics()
        self._batch_size = self._relay.batch_size
        # The relay's librdkafka settings, without its callbacks (they feed the relay's own logs).
        config = {k: v for k, v in self._relay.producer_config.items() if k not in ("error_cb", "logger")}
        self._producer = Producer({**config, "client.id": "echotransact-bench-baseline"})

    def _unpublish(self) -> None:
        """Only our rows are waiting, and all of them (rows of other benchmarks count as sent)."""
        with psycopg.connect(self.ctx.database_url, autocommit=True) as conn, conn.transaction():
            conn.execute("DELETE FROM outbox_pending")
            conn.execute("INSERT INTO outbox_pending (outbox_id) SELECT unnest(%s::bigint[])", (self._outbox_ids,))

    def run_ours(self, round_no: int) -> Sample:
        assert self._relay is not None
        relay = self._relay
        self._unpublish()
        published = 0
        started = time.perf_counter()
        while published < len(self._outbox_ids):
            sent = relay.run_once()
            published += sent
            if not sent and time.perf_counter() - started > _DEADLINE_S:
                raise RuntimeError(f"the relay published {published} of {len(self._outbox_ids)} rows "
                                   f"in {_DEADLINE_S:g} s (stats: {relay.stats})")
        elapsed = time.perf_counter() - started
        return {"messages_per_s": published / elapsed}

    def run_baseline(self, round_no: int) -> Sample:
        assert self._producer is not None
        producer = self._producer
        failures: list[str] = []
        delivered = 0

        def on_delivery(error: KafkaError | None, _message: Message) -> None:
            nonlocal delivered
            if error is None:
                delivered += 1
            else:
                failures.append(error.str())

        started = time.perf_counter()
        for topic, key, value, headers in self._messages:
            while True:
                try:
                    producer.produce(topic, value=value, key=key, headers=headers, on_delivery=on_delivery)
                    break
                except BufferError:
                    producer.poll(0.1)
        remaining = producer.flush(_DEADLINE_S)
        elapsed = time.perf_counter() - started
        if remaining or failures:
            raise RuntimeError(f"baseline producer: {remaining} undelivered, failures: {failures[:3]}")
        return {"messages_per_s": delivered / elapsed}

    def close(self) -> None:
        if self._relay is not None:
            self._relay.close()
            self._relay = None
        if self._producer is not None:
            self._producer.flush(5)
            self._producer = None

    def describe(self) -> dict[str, Any]:
        sizes = [len(m[2]) for m in self._messages]
        return {"rows_per_round": len(self._outbox_ids), "batch_size": self._batch_size,
                "mean_value_bytes": round(sum(sizes) / len(sizes)) if sizes else 0}

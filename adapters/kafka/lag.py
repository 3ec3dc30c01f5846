"""Kafka consumer lag of the projection workers' consumer group, for ``/metrics``: per event
topic, the messages past the group's committed offsets (all of a partition the group has not
committed yet). Read at scrape time with a consumer of its own that never joins the group
(offsets and watermarks only), at most every ``cache_s``; nothing when the broker does not answer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import structlog
from confluent_kafka import Consumer, KafkaException, TopicPartition
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = structlog.get_logger(__name__)

NAME = "echotransact_kafka_consumer_lag_messages"


class ConsumerLag(Collector):
    def __init__(self, bootstrap_servers: str, group_id: str, topics: Sequence[str], *, partitions: int = 8,
                 timeout_s: float = 2.0, cache_s: float = 5.0) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.group_id = group_id
        self.topics = list(topics)
        self.partitions = partitions
        self.timeout_s = timeout_s
        self.cache_s = cache_s
        self._lock = threading.Lock()
        self._cached: tuple[float, dict[str, int]] | None = None

    def describe(self) -> list[Any]:
        return [GaugeMetricFamily(NAME, "", labels=["topic"])]

    def lag(self) -> dict[str, int]:
        """Per topic, the messages the group has not committed (cached for ``cache_s``)."""
        with self._lock:
            if self._cached is not None and time.monotonic() - self._cached[0] < self.cache_s:
                return self._cached[1]
            lag = self._read()
            self._cached = (time.monotonic(), lag)
            return lag

    def _read(self) -> dict[str, int]:
        consumer = Consumer({"bootstrap.servers": self.bootstrap_servers, "group.id": self.group_id,
                             "enable.auto.commit": False, "socket.timeout.ms": int(self.timeout_s * 1000)})
        try:
            wanted = [TopicPartition(t, p) for t in self.topics for p in range(self.partitions)]
            committed = consumer.committed(wanted, timeout=self.timeout_s)
            lag: dict[str, int] = dict.fromkeys(self.topics, 0)
            for tp in committed:
                low, high = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition),
                                                           timeout=self.timeout_s)
                done = tp.offset if tp.offset >= 0 else low
                lag[tp.topic] += max(0, high - done)
            return lag
        finally:
            consumer.close()

    def collect(self) -> Iterator[Any]:
        try:
            lag = self.lag()
        except (KafkaException, RuntimeError) as error:
            log.warning("kafka_consumer_lag_unavailable", error=str(error))
            return
        family = GaugeMetricFamily(NAME, "Messages of each event topic the projection workers' consumer group "
                                         "has not committed yet", labels=["topic"])
        for topic, messages in sorted(lag.items()):
            family.add_metric([topic], messages)
        yield family

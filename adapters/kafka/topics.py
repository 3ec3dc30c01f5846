"""The event topics: one per aggregate type, created before anyone produces or consumes."""

from __future__ import annotations

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from application.envelope import DEFAULT_TOPIC_PREFIX, event_topics

DEFAULT_PARTITIONS = 8


def ensure_topics(
    bootstrap_servers: str, prefix: str = DEFAULT_TOPIC_PREFIX, partitions: int = DEFAULT_PARTITIONS,
    timeout_s: float = 15.0,
) -> list[str]:
    """Create the event topics that do not exist yet; returns their names."""
    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    topics = event_topics(prefix)
    futures = admin.create_topics(
        [NewTopic(t, num_partitions=partitions, replication_factor=-1) for t in topics],
        operation_timeout=timeout_s, request_timeout=timeout_s,
    )
    for topic, future in futures.items():
        try:
            future.result(timeout=timeout_s)
        except KafkaException as error:
            if error.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise RuntimeError(f"could not create Kafka topic {topic}: {error}") from None
    return topics

"""Kafka: the event topics and the outbox relay that publishes to them."""

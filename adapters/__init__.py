"""Adapters: the project's connections to real PostgreSQL, Redis and Kafka servers."""

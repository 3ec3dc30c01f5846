"""Application services: load an aggregate, call a domain command, save, through ports only.

Knows nothing of HTTP, Kafka or PostgreSQL; infrastructure reaches it through ``ports``.
"""

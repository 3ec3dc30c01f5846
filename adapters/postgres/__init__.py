"""PostgreSQL: the event store's recorder and the write side's tables (idempotency keys, locks,
card vault, velocity counters, retention), and the long-lived connection the loops share.
"""

"""Per-key locks across processes, as PostgreSQL session advisory locks on one of the event
store's pooled connections (autocommit), held for as long as a block runs.

The ledger holds one per payment around an authorization (ask the processor, record the
answer), so two callers (a double submit, a page reload, the background resolver) never ask
processors about the same payment at once: with failover, two such calls could otherwise reach
two different processors and leave a hold nobody records. The wait is bounded by the
connection's lock_timeout (POSTGRES_LOCK_TIMEOUT); a caller that times out is told to retry.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol

from application.errors import ProcessorUnavailable


class _Connections(Protocol):
    def get_connection(self) -> AbstractContextManager[Any]: ...


class PostgresAdvisoryLocks:
    def __init__(self, datastore: _Connections) -> None:
        self._datastore = datastore

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._datastore.get_connection() as conn:
            try:
                conn.execute("SELECT pg_advisory_lock(hashtextextended(%s, 1))", (key,))
            except Exception as error:  # lock_timeout, or the database went away
                raise ProcessorUnavailable(
                    "another request is settling this payment's authorization; try again shortly"
                ) from error
            try:
                yield
            finally:
                conn.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 1))", (key,))

"""Per-key locks across processes, as PostgreSQL session advisory locks held for as long as a
block runs, on a small connection pool of their own.

The ledger holds one per payment around an authorization (ask the processor, record the
answer), so two callers (a double submit, a page reload, the background resolver) never ask
processors about the same payment at once: with failover, two such calls could otherwise reach
two different processors and leave a hold nobody records.

Why its own pool: the holder keeps its connection through the processor call while the ledger
needs others to read and record; sharing the event store's pool, a burst of authorizations
could hold every connection and wait for one more. Waits are bounded: ``lock_timeout`` for the
lock, ``timeout_s`` for a connection; either way the caller is told to retry. Server-side TCP
keepalives let PostgreSQL release the lock of a holder whose host vanished within a minute or so.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog
from psycopg_pool import ConnectionPool, PoolTimeout

from application.errors import ProcessorUnavailable

log = structlog.get_logger(__name__)


class PostgresAdvisoryLocks:
    def __init__(self, database_url: str, *, max_size: int = 16, timeout_s: float = 5.0) -> None:
        self._database_url = database_url
        self._max_size = max_size
        self._timeout_s = timeout_s
        self._pool: ConnectionPool[Any] | None = None
        self._opening = threading.Lock()

    def _connections(self) -> ConnectionPool[Any]:
        with self._opening:  # opened on first use: most ledgers never authorize
            if self._pool is None:
                timeout_ms = int(self._timeout_s * 1000)

                def configure(conn: Any) -> None:
                    conn.execute(f"SET lock_timeout = {timeout_ms}")
                    conn.execute("SET tcp_keepalives_idle = 30")
                    conn.execute("SET tcp_keepalives_interval = 10")
                    conn.execute("SET tcp_keepalives_count = 3")

                self._pool = ConnectionPool(
                    self._database_url, min_size=1, max_size=self._max_size, timeout=self._timeout_s,
                    kwargs={"autocommit": True}, configure=configure, max_idle=2.0, open=True,
                )
            return self._pool

    def close(self) -> None:
        with self._opening:
            if self._pool is not None:
                self._pool.close()
                self._pool = None

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        try:
            with self._connections().connection() as conn:
                try:
                    conn.execute("SELECT pg_advisory_lock(hashtextextended(%s, 1))", (key,))
                except Exception as error:  # lock_timeout, or the database went away
                    raise _Busy(str(error)) from error
                try:
                    yield
                finally:
                    try:
                        row = conn.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 1))",
                                           (key,)).fetchone()
                        if not (row and row[0]):
                            raise RuntimeError("the advisory lock was not held at unlock")
                    except Exception as error:
                        # Never hand back a connection that may still hold the lock: the next
                        # user of that session would walk straight through it.
                        log.error("advisory_unlock_failed", key=key, error=str(error))
                        conn.close()
        except (PoolTimeout, _Busy) as error:
            raise ProcessorUnavailable(
                "another request is moving this payment's money (authorization, capture, void or refund); "
                "try again shortly"
            ) from error


class _Busy(Exception):
    pass

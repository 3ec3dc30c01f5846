"""Per-key locks across processes, as PostgreSQL session advisory locks held for as long as a
block runs, on connections of the process's one pool.

The ledger holds one per payment around an authorization (ask the processor, record the
answer), so two callers (a double submit, a page reload, the background resolver) never ask
processors about the same payment at once: with failover, two such calls could otherwise reach
two different processors and leave a hold nobody records.

A holder keeps its connection through the processor call while the ledger needs others to read
and record, so at most ``max_holders`` (fewer than the pool holds) hold one at a time: a burst
of authorizations can never take every connection and then wait for one more. Waits are
bounded: ``timeout_s`` for a turn, a connection and the lock itself (``lock_timeout``, set for
the one statement that takes the lock and restored at unlock); either way the caller is told to
retry. The pool's TCP keepalives let PostgreSQL release the lock of a holder whose host vanished.
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
    def __init__(self, database: str | ConnectionPool[Any], *, max_holders: int = 8, timeout_s: float = 5.0) -> None:
        self._owns_pool = isinstance(database, str)
        self._pool: ConnectionPool[Any] = (
            ConnectionPool(database, min_size=1, max_size=max_holders, timeout=timeout_s,
                           kwargs={"autocommit": True}, max_idle=2.0, open=True)
            if isinstance(database, str) else database
        )
        self._turns = threading.BoundedSemaphore(max_holders)
        self._timeout_s = timeout_s

    def close(self) -> None:
        if self._owns_pool:
            self._pool.close()

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        if not self._turns.acquire(timeout=self._timeout_s):
            raise ProcessorUnavailable(_BUSY)
        try:
            with self._holding(key):
                yield
        finally:
            self._turns.release()

    @contextmanager
    def _holding(self, key: str) -> Iterator[None]:
        held = False
        try:
            with self._pool.connection() as conn:
                try:
                    row = conn.execute(
                        "SELECT current_setting('lock_timeout'), set_config('lock_timeout', %s, false),"
                        " pg_advisory_lock(hashtextextended(%s, 1))",
                        (f"{int(self._timeout_s * 1000)}ms", key),
                    ).fetchone()
                    previous = row[0] if row else "0"
                except Exception as error:  # lock_timeout, or the database went away
                    # The failed statement's set_config is rolled back with it: the connection
                    # goes back to the pool as it came.
                    raise _Busy(str(error)) from error
                held = True
                try:
                    yield
                finally:
                    try:
                        row = conn.execute(
                            "SELECT pg_advisory_unlock(hashtextextended(%s, 1)), set_config('lock_timeout', %s, false)",
                            (key, previous),
                        ).fetchone()
                        if not (row and row[0]):
                            raise RuntimeError("the advisory lock was not held at unlock")
                    except Exception as error:
                        # Never hand back a connection that may still hold the lock: the next
                        # user of that session would walk straight through it.
                        log.error("advisory_unlock_failed", key=key, error=str(error))
                        conn.close()
        except (PoolTimeout, _Busy) as error:
            if held:  # raised by the block itself (its own wait for a connection): not about the lock
                raise
            raise ProcessorUnavailable(_BUSY) from error


_BUSY = ("another request is moving this payment's money (authorization, capture, void or refund); "
         "try again shortly")


class _Busy(Exception):
    pass

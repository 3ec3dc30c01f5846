"""A process's connections to PostgreSQL.

``open_pool``: the one connection pool of a process, lent to every adapter that runs short
statements (the event store, idempotency records, the vault, velocity counts, advisory locks, the
read views). One long-lived autocommit connection (``ReconnectingConnection``), opened on first
use and again after it was lost: for the loops (projections, webhook planner and dispatcher) that
hold one each; and waiting on such a connection for the event store's commit notifications
instead of polling."""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.rows import tuple_row
from psycopg_pool import ConnectionPool

# Every save NOTIFYs this channel as it commits (the ledger_append function,
# migrations/0013_append_function.sql; the eventsourcing library notifies the same channel).
COMMIT_CHANNEL = "ledger_events"


# Every pooled connection: autocommit, tuple rows, and what a borrower may have changed for the
# length of a checkout (dict rows for the event store, a read-only snapshot for the read views)
# put back when it returns. TCP keepalives let PostgreSQL end the session (and release the
# advisory locks) of a process whose host vanished, within about a minute.
_SESSION_SETTINGS = (
    "SET idle_in_transaction_session_timeout = '5s'",
    "SET tcp_keepalives_idle = 30",
    "SET tcp_keepalives_interval = 10",
    "SET tcp_keepalives_count = 3",
)


def _configure(conn: psycopg.Connection[Any]) -> None:
    for statement in _SESSION_SETTINGS:
        conn.execute(statement)


def _reset(conn: psycopg.Connection[Any]) -> None:
    conn.row_factory = tuple_row  # type: ignore[assignment]
    conn.autocommit = True
    conn.isolation_level = None
    conn.read_only = None


def _check(conn: psycopg.Connection[Any]) -> None:
    """At checkout, without a round trip: a connection resting in the pool has nothing to read,
    unless the server wrote to it, which it does when it ends the session (a restart, a crash, an
    administrator). Only then is the server asked; a dead connection raises and is replaced."""
    if conn.closed:
        ConnectionPool.check_connection(conn)
        return
    poller = select.poll()  # not select.select: it refuses descriptors above 1023
    poller.register(conn.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
    if poller.poll(0):
        ConnectionPool.check_connection(conn)


class _ShrinkingPool(ConnectionPool[Any]):
    """psycopg_pool closes one idle connection per ``max_idle`` period, so a pool grown to 9
    under load still held 4 after 10 s at rest. This one closes, each period, every connection
    that stayed unused through the whole period (down to ``min_size``)."""

    def _putconn(self, conn: Any, from_getconn: bool) -> None:
        """psycopg_pool hands every returned connection to one of its worker threads when the
        pool has a ``reset`` function (a queue put, a thread woken, the connection unavailable
        until that thread runs): 6-7% of the API's CPU on the voice journey. ``_reset`` sets
        attributes and does no I/O, so the returning thread puts the connection back itself.
        (One returned inside a transaction is rolled back by the returning thread, a round trip
        it waits for; no borrower does that on purpose.)"""
        self._return_connection(conn, from_getconn=from_getconn)

    def _shrink_pool(self) -> None:
        with self._lock:
            unused = self._nconns_min  # the fewest idle connections seen during the period
        super()._shrink_pool()  # closes one and starts the next period
        for _ in range(unused - 1):
            closed_before = self._nconns
            super()._shrink_pool()  # the new period's minimum is the pool as it is now
            if self._nconns == closed_before:
                break


def open_pool(
    database_url: str, *, max_size: int, max_idle_s: float, wait_s: float, name: str = "echotransact",
) -> ConnectionPool[Any]:
    """The process's pool: one connection kept at rest, up to ``max_size`` under load, each
    closed again after ``max_idle_s`` unused. A checkout waits ``wait_s`` at most (then
    psycopg_pool.PoolTimeout; during an outage the API answers 503 at once instead of hanging),
    and a connection that died with the database (a restart) is found and replaced at checkout
    (``_check``: a poll of its socket, not a round trip)."""
    return _ShrinkingPool(
        database_url, min_size=1, max_size=max_size, max_idle=max_idle_s, timeout=wait_s, name=name,
        kwargs={"autocommit": True, "connect_timeout": max(1, round(wait_s))},
        configure=_configure, reset=_reset, check=_check, open=True,
    )


def listen_for_commits(conn: psycopg.Connection[Any]) -> None:
    conn.execute(f"LISTEN {COMMIT_CHANNEL}")


def wait_for_commit(conn: psycopg.Connection[Any], stop: threading.Event, timeout_s: float) -> bool:
    """Wait until a save commits (a notification on a connection that listens), ``stop`` is set,
    or ``timeout_s`` passes; True if woken by a commit. Notifications that arrived while the
    caller was busy wake it at once; all of them are consumed. Raises psycopg errors (the caller
    reconnects and listens again: a commit missed meanwhile waits for the timeout at most)."""
    deadline = time.monotonic() + timeout_s
    while not stop.is_set():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        # Slices of at most half a second, so that a stop is seen quickly.
        if any(True for _ in conn.notifies(timeout=min(0.5, remaining), stop_after=1)):
            for _ in conn.notifies(timeout=0):
                pass
            return True
    return False


class ReconnectingConnection:
    def __init__(self, database_url: str, on_connect: Callable[[psycopg.Connection[Any]], None] | None = None):
        self.database_url = database_url
        self.on_connect = on_connect
        self._conn: psycopg.Connection[Any] | None = None

    def get(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.database_url, autocommit=True)
            if self.on_connect is not None:
                self.on_connect(self._conn)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

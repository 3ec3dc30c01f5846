"""One long-lived autocommit PostgreSQL connection, opened on first use and again after it
was lost: for the loops (projections, webhook planner and dispatcher) that hold one each; and
waiting on such a connection for the event store's commit notifications instead of polling."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

# Every save NOTIFYs this channel as it commits (the ledger_append function,
# migrations/0013_append_function.sql; the eventsourcing library notifies the same channel).
COMMIT_CHANNEL = "ledger_events"


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

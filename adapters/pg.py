"""One long-lived autocommit PostgreSQL connection, opened on first use and again after it
was lost: for the loops (projections, webhook planner and dispatcher) that hold one each."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg


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

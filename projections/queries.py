"""Reads of the status read model, with read-your-writes.

A command's result carries the position of its last event. A reader that passes it as
``wait_for_position`` waits (bounded) until the status row has reached it, so a voice
integrator never reads a status older than its own last command.
"""

from __future__ import annotations

import time
from typing import Any
from uuid import UUID

import psycopg

from projections.status_cache import StatusCache

TABLES = {"session": ("session_status", "session_id"), "payment": ("payment_status", "payment_id")}
MAX_WAIT_S = 5.0


class StatusQueries:
    def __init__(self, database_url: str, cache: StatusCache | None = None) -> None:
        self.database_url = database_url
        self.cache = cache

    def _from_database(self, kind: str, aggregate_id: UUID) -> dict[str, Any] | None:
        table, column = TABLES[kind]
        with psycopg.connect(self.database_url) as conn, conn.cursor() as cur:
            cur.execute(f"SELECT * FROM {table} WHERE {column} = %s", (aggregate_id,))  # noqa: S608
            row = cur.fetchone()
            if row is None:
                return None
            return dict(zip([c.name for c in cur.description or ()], row, strict=True))

    def get(
        self, kind: str, aggregate_id: UUID, *, wait_for_position: int | None = None,
        timeout_s: float = MAX_WAIT_S, merchant_id: UUID | None = None,
    ) -> tuple[dict[str, Any] | None, bool]:
        """(row or None, whether it has reached ``wait_for_position``). Another merchant's row
        is None, exactly like a missing one."""
        deadline = time.monotonic() + min(timeout_s, MAX_WAIT_S)
        delay = 0.01
        while True:
            row = self.cache.get(kind, aggregate_id) if self.cache else None
            if row is None or (wait_for_position is not None and int(row["position"]) < wait_for_position):
                row = self._from_database(kind, aggregate_id)
            if row is not None and merchant_id is not None and str(row["merchant_id"]) != str(merchant_id):
                return None, True
            reached = wait_for_position is None or (row is not None and int(row["position"]) >= wait_for_position)
            if reached or time.monotonic() >= deadline:
                return row, reached
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

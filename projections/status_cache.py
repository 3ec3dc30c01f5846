"""Redis as a cache in front of the status read model, for hot reads by integrators.

The worker writes a row to Redis after the transaction that changed it commits. Two workers
may race; the compare-and-set keeps the highest version, so the cache never goes back in time.
A miss or a stale entry only costs a PostgreSQL read: PostgreSQL is the truth.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any
from uuid import UUID

import psycopg
import redis

TTL_S = 3600
_SET_IF_NEWER = """
local current = redis.call('HGET', KEYS[1], 'version')
if current and tonumber(current) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'row', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""
TABLES = {"session": ("session_status", "session_id"), "payment": ("payment_status", "payment_id")}


def _key(kind: str, aggregate_id: UUID | str) -> str:
    return f"echotransact:status:{kind}:{aggregate_id}"


def _row_json(row: dict[str, Any]) -> str:
    return json.dumps(row, default=str, sort_keys=True)


class StatusCache:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._set_if_newer = client.register_script(_SET_IF_NEWER)

    @classmethod
    def from_url(cls, url: str) -> StatusCache:
        return cls(redis.Redis.from_url(url))

    def refresh(self, conn: psycopg.Connection[Any], aggregate_ids: Iterable[UUID]) -> int:
        """Copy the committed rows of these aggregates into the cache; returns rows written."""
        ids = list(aggregate_ids)
        written = 0
        if not ids:
            return 0
        for kind, (table, id_column) in TABLES.items():
            with conn.cursor() as cur:
                cur.execute(f"SELECT * FROM {table} WHERE {id_column} = ANY(%s)", (ids,))  # noqa: S608
                names = [c.name for c in cur.description or ()]
                for values in cur.fetchall():
                    row = dict(zip(names, values, strict=True))
                    written += int(
                        self._set_if_newer(
                            keys=[_key(kind, row[id_column])], args=[row["version"], _row_json(row), TTL_S]
                        )
                    )
        return written

    def get(self, kind: str, aggregate_id: UUID | str) -> dict[str, Any] | None:
        raw = self.client.hget(_key(kind, aggregate_id), "row")
        return json.loads(raw) if raw else None

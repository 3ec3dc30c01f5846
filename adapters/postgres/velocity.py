"""The velocity counter in PostgreSQL (table ``risk_attempts``, migration 0010): durable, shared
by every process, and idempotent per attempt, so a retried command counts the same attempt once
and gets the same numbers. Only keyed hashes are stored, never a phone number or card."""

from __future__ import annotations

from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from typing import Any, Protocol

# How long rows are kept past the window they can count in; older ones are pruned on write.
_KEEP = timedelta(days=1)


class _Transactional(Protocol):
    def transaction(self, *, commit: bool = False) -> AbstractContextManager[Any]: ...


class PostgresVelocityCounter:
    def __init__(self, datastore: _Transactional) -> None:
        """``datastore``: anything with ``transaction(commit=True)`` yielding a psycopg cursor,
        such as the event store's own datastore (so no second connection pool)."""
        self._datastore = datastore

    def record_and_count(
        self, attempt_id: str, at: datetime, window_seconds: int, keys: dict[str, str]
    ) -> dict[str, int]:
        assert at.tzinfo is not None, "attempt times are timezone-aware"
        window = timedelta(seconds=window_seconds)
        counts: dict[str, int] = {}
        with self._datastore.transaction(commit=True) as cur:
            for kind, key in sorted(keys.items()):
                # One attempt at a time per key (in sorted order, so no deadlock): without it,
                # attempts made in parallel do not see each other's uncommitted rows and a burst
                # of card testing would pass the limit.
                cur.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"velocity:{kind}:{key}",))
                cur.execute(
                    "INSERT INTO risk_attempts (kind, key, attempt_id, at) VALUES (%s, %s, %s, %s)"
                    " ON CONFLICT (kind, key, attempt_id) DO NOTHING",
                    (kind, key, attempt_id, at),
                )
                cur.execute(
                    "SELECT count(*) AS n FROM risk_attempts r,"
                    " (SELECT at FROM risk_attempts WHERE kind = %s AND key = %s AND attempt_id = %s) me"
                    " WHERE r.kind = %s AND r.key = %s AND r.at > me.at - %s AND r.at <= me.at",
                    (kind, key, attempt_id, kind, key, window),
                )
                row = cur.fetchone()
                counts[kind] = int(row["n"] if isinstance(row, dict) else row[0])
                cur.execute(
                    "DELETE FROM risk_attempts WHERE kind = %s AND key = %s AND at < %s",
                    (kind, key, at - window - _KEEP),
                )
        return counts

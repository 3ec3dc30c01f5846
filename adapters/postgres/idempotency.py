"""HTTP idempotency keys: the durable record in PostgreSQL, a fast copy in Redis.

``begin`` claims a key for a request (or says how it went before); ``complete`` records the
response; ``release`` forgets a claim whose request failed on our side, so a retry may run.
Losing Redis loses only speed: every decision that matters is taken in PostgreSQL, and the
command log behind the ledger makes a re-run command return its first result anyway.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psycopg
import redis
import structlog
from psycopg_pool import ConnectionPool

log = structlog.get_logger(__name__)

KEY_LIFETIME = timedelta(hours=24)
# A request still "in progress" after this long is taken to have died with its process.
CLAIM_TIMEOUT = timedelta(seconds=60)


@dataclass(frozen=True)
class Begin:
    """``proceed``: run the request. ``replay``: answer with the recorded response.
    ``conflict``: a different request used this key. ``in_progress``: the first is still running.
    (``retry`` stays inside ``IdempotencyStore.begin``.)"""

    outcome: str
    status: int | None = None
    body: str | None = None


class IdempotencyStore:
    def __init__(self, pool: ConnectionPool[Any], client: redis.Redis | None) -> None:
        self.pool = pool
        self.redis = client

    @staticmethod
    def _redis_key(scope: str, key: str) -> str:
        return f"echotransact:idempotency:{scope}:{key}"

    def _from_redis(self, scope: str, key: str) -> dict[str, Any] | None:
        if self.redis is None:
            return None
        try:
            raw = self.redis.get(self._redis_key(scope, key))
        except redis.RedisError as error:
            log.warning("idempotency_redis_unavailable", error=str(error))
            return None
        return json.loads(raw) if raw else None

    def begin(self, scope: str, key: str, request_hash: str) -> Begin:
        cached = self._from_redis(scope, key)
        if cached is not None:
            if cached["request_hash"] != request_hash:
                return Begin("conflict")
            return Begin("replay", cached["status"], cached["body"])
        with self.pool.connection() as conn:
            while True:
                # The usual case, a new key, is one autocommit statement; a key seen before is
                # decided in a transaction that locks its row.
                inserted = conn.execute(
                    "INSERT INTO idempotency_records (scope, idempotency_key, request_hash, state,"
                    " locked_until, expires_at) VALUES (%s, %s, %s, 'in_progress', now() + %s, now() + %s)"
                    " ON CONFLICT DO NOTHING RETURNING 1",
                    (scope, key, request_hash, CLAIM_TIMEOUT, KEY_LIFETIME), prepare=True,
                ).fetchone()
                if inserted:
                    return Begin("proceed")
                begun = self._begin_seen(conn, scope, key, request_hash)
                if begun.outcome != "retry":  # "retry": the row was deleted meanwhile
                    return begun

    def _begin_seen(self, conn: psycopg.Connection[Any], scope: str, key: str, request_hash: str) -> Begin:
        with conn.transaction():
            row = conn.execute(
                "SELECT request_hash, state, response_status, response_body, locked_until > now(),"
                " expires_at <= now() FROM idempotency_records"
                " WHERE scope = %s AND idempotency_key = %s FOR UPDATE",
                (scope, key),
            ).fetchone()
            if row is None:  # deleted between the two statements: claim it now
                return Begin("retry")
            stored_hash, state, status, body, locked, expired = row
            if expired or (state == "in_progress" and not locked and stored_hash == request_hash):
                # An expired key starts afresh; a stale claim of the same request is taken over.
                conn.execute(
                    "UPDATE idempotency_records SET request_hash = %s, state = 'in_progress',"
                    " response_status = NULL, response_body = NULL, locked_until = now() + %s,"
                    " expires_at = CASE WHEN expires_at <= now() THEN now() + %s ELSE expires_at END"
                    " WHERE scope = %s AND idempotency_key = %s",
                    (request_hash, CLAIM_TIMEOUT, KEY_LIFETIME, scope, key),
                )
                return Begin("proceed")
            if stored_hash != request_hash:
                return Begin("conflict")
            if state == "completed":
                self._cache(scope, key, request_hash, status, body)
                return Begin("replay", status, body)
            return Begin("in_progress")

    def complete(self, scope: str, key: str, request_hash: str, status: int, body: str) -> None:
        with self.pool.connection() as conn:
            conn.execute(
                "UPDATE idempotency_records SET state = 'completed', response_status = %s,"
                " response_body = %s WHERE scope = %s AND idempotency_key = %s AND request_hash = %s",
                (status, body, scope, key, request_hash),
            )
        self._cache(scope, key, request_hash, status, body)

    def release(self, scope: str, key: str, request_hash: str) -> None:
        with self.pool.connection() as conn:
            conn.execute(
                "DELETE FROM idempotency_records WHERE scope = %s AND idempotency_key = %s"
                " AND request_hash = %s AND state = 'in_progress'",
                (scope, key, request_hash),
            )

    def _cache(self, scope: str, key: str, request_hash: str, status: int | None, body: str | None) -> None:
        if self.redis is None:
            return
        try:
            self.redis.set(
                self._redis_key(scope, key),
                json.dumps({"request_hash": request_hash, "status": status, "body": body}),
                ex=int(KEY_LIFETIME.total_seconds()),
            )
        except redis.RedisError as error:
            log.warning("idempotency_redis_unavailable", error=str(error))

    def purge_expired(self) -> int:
        with self.pool.connection() as conn:
            return conn.execute("DELETE FROM idempotency_records WHERE expires_at <= now()").rowcount


__all__ = ["Begin", "IdempotencyStore", "psycopg"]

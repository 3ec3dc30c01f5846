"""HTTP idempotency keys, recorded in PostgreSQL.

``begin`` claims a key for a request (or says how it went before); ``complete`` records the
response; ``release`` forgets a claim whose request failed on our side, so a retry may run. A
new key, the usual case, costs one INSERT; a key seen before is decided in a transaction that
locks its row. (A copy in Redis once answered replays; it cost two Redis round trips on every
new key to save a few statements on the rare replay, and was dropped.)

The claim and the response are committed without waiting for the disk (``NO_FLUSH``). They are
a cache of the ledger's answer, not the record of it: the command id the ledger gets is derived
from the key, and the ledger's command record is saved, and flushed, with the command's events.
The save's flush also carries the claim written before it to the disk. So a crash of PostgreSQL
can lose at most the responses recorded in the last fraction of a second; a retry then finds its
claim, waits out ``CLAIM_TIMEOUT`` (409 ``request_in_progress``) and runs the command id again,
which the ledger answers with the result it recorded: the same response, no second payment.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from uuid import UUID

import psycopg
from psycopg_pool import ConnectionPool

KEY_LIFETIME = timedelta(hours=24)
# In a statement's condition: its transaction commits without waiting for the WAL to reach the
# disk (``set_config(..., true)`` lasts to the end of the statement's own transaction; the
# session's setting is untouched).
NO_FLUSH = "set_config('synchronous_commit', 'off', true) = 'off'"
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
    def __init__(self, pool: ConnectionPool[Any]) -> None:
        self.pool = pool

    def begin(self, scope: str, key: str, request_hash: str) -> Begin:
        with self.pool.connection() as conn:
            while True:
                # The usual case, a new key, is one autocommit statement; a key seen before is
                # decided in a transaction that locks its row.
                inserted = conn.execute(
                    "INSERT INTO idempotency_records (scope, idempotency_key, request_hash, state,"
                    " locked_until, expires_at) SELECT %s, %s, %s, 'in_progress', now() + %s, now() + %s"
                    f" WHERE {NO_FLUSH} ON CONFLICT DO NOTHING RETURNING 1",
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
                return Begin("replay", status, body)
            return Begin("in_progress")

    def complete(self, scope: str, key: str, request_hash: str, status: int, body: str,
                 subject_id: UUID | None = None) -> None:
        """``subject_id``: the aggregate the response is about, so that erasing its customer can
        delete a response that names them (migrations/0027_idempotency_subject.sql)."""
        with self.pool.connection() as conn:
            conn.execute(
                "UPDATE idempotency_records SET state = 'completed', response_status = %s,"
                " response_body = %s, subject_id = %s"
                f" WHERE scope = %s AND idempotency_key = %s AND request_hash = %s AND {NO_FLUSH}",
                (status, body, subject_id, scope, key, request_hash),
            )

    def release(self, scope: str, key: str, request_hash: str) -> None:
        with self.pool.connection() as conn:
            conn.execute(
                "DELETE FROM idempotency_records WHERE scope = %s AND idempotency_key = %s"
                " AND request_hash = %s AND state = 'in_progress'",
                (scope, key, request_hash),
            )

    def purge_expired(self) -> int:
        with self.pool.connection() as conn:
            return conn.execute("DELETE FROM idempotency_records WHERE expires_at <= now()").rowcount


__all__ = ["Begin", "IdempotencyStore", "psycopg"]

"""Customers' data keys in PostgreSQL (tables ``customer_keys`` and ``customer_sessions``,
migration 0024), behind application/privacy.py's ``CustomerKeys`` port, and what erasing one
scrubs from the side tables; also the read side's ``PersonalDataReader`` (application/masking.py),
which opens sealed data inside a projection's own transaction.

A key row holds the key wrapped under the master key (adapters/personal_data.py), the id of that
master key (migration 0026; ``rewrap`` moves every live key to the current one) and the keyed
hash of the phone that finds it. Erasure sets both to NULL (the row stays, with ``erased_at``,
as the record that a key existed and was destroyed), so nothing can open what the key sealed
and nothing links the pseudonym to a phone any more.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID, uuid4

import psycopg
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from psycopg_pool import ConnectionPool

from adapters.personal_data import KeyCipher, SealingCustomerKeys, key_id_of
from adapters.postgres.idempotency import NO_FLUSH
from application.privacy import CustomerKey, Scrubbed, plain_of
from domain.values import ERASED

# A known customer's key is read, never written: every session of a phone once updated its key's
# row (to have it returned), and concurrent sessions of one phone queued on that row's lock until
# each commit. A new customer's key is inserted; a concurrent first session of the same phone
# inserts nothing (ON CONFLICT DO NOTHING) and reads the other's key on its next try.
_KEY_FOR = """
WITH found AS (
    SELECT key_id, customer_id, wrapped_key, master_key_id FROM customer_keys
    WHERE {no_flush}lookup_hash = %(lookup)s
), made AS (
    INSERT INTO customer_keys (key_id, customer_id, lookup_hash, wrapped_key, master_key_id)
    SELECT %(key_id)s, %(customer_id)s, %(lookup)s, %(wrapped)s, %(master)s WHERE NOT EXISTS (SELECT FROM found)
    ON CONFLICT (lookup_hash) DO NOTHING
    RETURNING key_id, customer_id, wrapped_key, master_key_id
), chosen AS (
    SELECT * FROM found UNION ALL SELECT * FROM made
), linked AS (
    INSERT INTO customer_sessions (customer_id, session_id, key_id)
    SELECT customer_id, %(session_id)s, key_id FROM chosen WHERE %(session_id)s::uuid IS NOT NULL
    ON CONFLICT DO NOTHING
)
SELECT key_id, customer_id, wrapped_key, master_key_id FROM chosen
"""
# For a caller that saves durably after it (``saved_after``: a session being opened), the
# statement commits without waiting for the WAL to reach the disk (NO_FLUSH, in a one-time filter
# evaluated before the scan). That later save is on the same server and its commit comes after
# this one in the WAL, so its flush carries this commit to the disk too; a crash before it loses
# a key that sealed nothing acknowledged and a link to a session never saved. One flush fewer per
# opened session (the key of a returning customer is only read, but the link is written).
_KEY_FOR_FLUSHED = _KEY_FOR.format(no_flush="")
_KEY_FOR_SAVED_AFTER = _KEY_FOR.format(no_flush=f"(SELECT {NO_FLUSH}) AND ")
_KEY_COLUMNS = "key_id, customer_id, wrapped_key, master_key_id"
# Live keys not wrapped under the current master key, a batch at a time; SKIP LOCKED lets two
# re-wraps (or a re-wrap and an erasure, which locks the row it destroys) run side by side.
_TO_REWRAP = f"""
SELECT {_KEY_COLUMNS} FROM customer_keys
WHERE wrapped_key IS NOT NULL AND master_key_id IS DISTINCT FROM %s
ORDER BY key_id LIMIT %s FOR UPDATE SKIP LOCKED
"""


class PostgresCustomerKeys(SealingCustomerKeys):
    def __init__(self, pool: ConnectionPool[Any], cipher: KeyCipher) -> None:
        self._pool = pool
        self._cipher = cipher

    def _unwrapped(self, row: Sequence[Any] | None) -> CustomerKey | None:
        if row is None or row[2] is None:
            return None
        return CustomerKey(row[0], row[1], self._cipher.unwrap(row[3], row[0], row[2]))

    def key_for(self, lookup_hash: str, *, session_id: UUID | None = None, saved_after: bool = False) -> CustomerKey:
        key_id = uuid4()
        material = KeyCipher.new_key_material()
        params = {
            "key_id": key_id, "customer_id": uuid4(), "lookup": lookup_hash,
            "wrapped": self._cipher.wrap(key_id, material), "master": self._cipher.master_key_id,
            "session_id": session_id,
        }
        with self._pool.connection() as conn:
            for _ in range(3):
                row = conn.execute(_KEY_FOR_SAVED_AFTER if saved_after else _KEY_FOR_FLUSHED, params).fetchone()
                if row is not None:  # None: another session made this customer's key meanwhile
                    break
        key = self._unwrapped(row)
        assert key is not None, "a key found by its lookup hash is live"
        return key

    def find(self, lookup_hash: str) -> CustomerKey | None:
        with self._pool.connection() as conn:
            return self._unwrapped(conn.execute(
                f"SELECT {_KEY_COLUMNS} FROM customer_keys WHERE lookup_hash = %s",
                (lookup_hash,)).fetchone())

    def key(self, key_id: UUID) -> CustomerKey | None:
        with self._pool.connection() as conn:
            return self._unwrapped(conn.execute(
                f"SELECT {_KEY_COLUMNS} FROM customer_keys WHERE key_id = %s", (key_id,)).fetchone())

    def sessions_of(self, customer_id: UUID) -> list[UUID]:
        with self._pool.connection() as conn:
            rows = conn.execute("SELECT session_id FROM customer_sessions WHERE customer_id = %s ORDER BY session_id",
                                (customer_id,)).fetchall()
        return [r[0] for r in rows]

    def key_created_at(self, customer_id: UUID) -> datetime | None:
        with self._pool.connection() as conn:
            row = conn.execute("SELECT min(created_at) FROM customer_keys WHERE customer_id = %s",
                               (customer_id,)).fetchone()
        return row[0] if row else None

    def destroy(self, customer_id: UUID, *, phone: str, velocity_keys: Sequence[str]) -> Scrubbed:
        with self._pool.connection() as conn, conn.transaction():
            return scrub_customer(conn, customer_id, phone=phone, velocity_keys=velocity_keys)

    def rewrap(self, *, batch_size: int = 500) -> int:
        """Wrap every live data key under the current master key (after a new one was set, with
        the old one in ECHOTRANSACT_PREVIOUS_MASTER_KEYS); returns how many were re-wrapped. The
        data keys themselves do not change, so nothing they sealed needs touching. Each batch is
        its own transaction: stopped half way, a second run does the rest."""
        done = 0
        current = self._cipher.master_key_id
        while True:
            with self._pool.connection() as conn, conn.transaction():
                rows = conn.execute(_TO_REWRAP, (current, batch_size)).fetchall()
                for key_id, _customer, wrapped, master in rows:
                    material = self._cipher.unwrap(master, key_id, wrapped)
                    conn.execute("UPDATE customer_keys SET wrapped_key = %s, master_key_id = %s WHERE key_id = %s",
                                 (self._cipher.wrap(key_id, material), current, key_id))
            done += len(rows)
            if len(rows) < batch_size:
                return done

    @property
    def master_key_id(self) -> str:
        """The current master key's id: what every key is wrapped under after ``rewrap``."""
        return self._cipher.master_key_id

    def master_key_ids(self) -> dict[str, int]:
        """Live data keys by the id of the master key that wraps them (what a rotation waits on)."""
        with self._pool.connection() as conn:
            rows = conn.execute("SELECT master_key_id, count(*) FROM customer_keys WHERE wrapped_key IS NOT NULL"
                                " GROUP BY master_key_id ORDER BY master_key_id").fetchall()
        return {r[0]: r[1] for r in rows}


def scrub_customer(conn: psycopg.Connection[Any], customer_id: UUID, *, phone: str,
                   velocity_keys: Sequence[str]) -> Scrubbed:
    """Destroy the customer's keys and scrub the side tables, in the caller's transaction. The
    queued SMS of the customer's sessions are deleted (their payload names the phone; the
    dispatcher has nothing to send to an erased customer), the development mailbox's messages to
    the phone too, the velocity rows counted for it, and the status read model shows ``erased``
    where it showed the phone's last four and a cancellation's reason (a rebuild shows the same:
    the key is gone)."""
    destroyed = conn.execute(
        "UPDATE customer_keys SET wrapped_key = NULL, lookup_hash = NULL, erased_at = now()"
        " WHERE customer_id = %s AND erased_at IS NULL", (customer_id,)).rowcount
    sessions = [r[0] for r in conn.execute(
        "SELECT session_id FROM customer_sessions WHERE customer_id = %s", (customer_id,)).fetchall()]
    rows = {
        "outbox_messages": conn.execute(
            "DELETE FROM outbox_messages WHERE aggregate_id = ANY(%s)", (sessions,)).rowcount,
        "dev_sms_inbox": conn.execute("DELETE FROM dev_sms_inbox WHERE to_phone = %s", (phone,)).rowcount,
        # Recorded HTTP responses about the sessions (their masked phone), kept for the
        # Idempotency-Key's 24 hours.
        "idempotency_records": conn.execute(
            "DELETE FROM idempotency_records WHERE subject_id = ANY(%s)", (sessions,)).rowcount,
        "risk_attempts": conn.execute(
            "DELETE FROM risk_attempts WHERE kind = 'phone' AND key = ANY(%s)", (list(velocity_keys),)).rowcount,
        "session_status": conn.execute(
            "UPDATE session_status SET customer_phone_masked = %s,"
            " end_reason = CASE WHEN status = 'cancelled' THEN %s ELSE end_reason END WHERE customer_id = %s"
            " AND (customer_phone_masked IS DISTINCT FROM %s"
            "      OR (status = 'cancelled' AND end_reason IS DISTINCT FROM %s))",
            (ERASED, ERASED, customer_id, ERASED, ERASED)).rowcount,
    }
    return Scrubbed(destroyed, tuple(sessions), rows)


class PostgresPersonalDataReader:
    """Opens sealed personal data for a projection, reading the keys with the projection's own
    cursor (so a rebuild sees the keys as they are: destroyed ones open to nothing)."""

    def __init__(self, cipher: KeyCipher) -> None:
        self._cipher = cipher

    def open_many(self, cur: psycopg.Cursor[Any], sealed: Sequence[Mapping[str, Any] | None]
                  ) -> list[dict[str, Any] | None]:
        key_ids = [key_id_of(s) for s in sealed]
        ids = {k for k in key_ids if k is not None}
        keys: dict[UUID, AESGCM] = {}
        if ids:
            cur.execute("SELECT key_id, wrapped_key, master_key_id FROM public.customer_keys"
                        " WHERE key_id = ANY(%s) AND wrapped_key IS NOT NULL", (list(ids),))
            for row in cur.fetchall():
                key_id, wrapped, master = ((row["key_id"], row["wrapped_key"], row["master_key_id"])
                                           if isinstance(row, dict) else row)
                keys[key_id] = AESGCM(self._cipher.unwrap(master, key_id, wrapped))
        opened: list[dict[str, Any] | None] = []
        for s, key_id in zip(sealed, key_ids, strict=True):
            plain = plain_of(s)  # recorded before sealing existed (an upcast event)
            if plain is not None:
                opened.append(plain)
                continue
            key = keys.get(key_id) if key_id is not None else None
            opened.append(None if s is None or key is None or key_id is None
                          else self._cipher.open_under(key, key_id, s))
        return opened

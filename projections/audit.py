"""Audit: an append-only log of every event, personal data masked, hash-chained in position order.

Each row's hash is SHA-256 over the previous row's hash and this row's canonical content, so
changing, removing or reordering any row breaks the chain from that row on. Rows arrive in any
order (Kafka partitions interleave); the chain is extended over the gap-free prefix of the
event store's positions, skipping positions a rolled-back transaction never filled.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
import psycopg
from psycopg.types.json import Jsonb

from application.envelope import EventEnvelope
from projections.masking import mask_event_data

GENESIS_HASH = "0" * 64
_CHAIN_LOCK_ID = 0x41_55_44_54  # "AUDT": one chain extender at a time
_canonical = msgspec.json.Encoder(order="sorted")
COLUMNS = (
    "position", "event_id", "aggregate_id", "aggregate_type", "version", "merchant_id",
    "event_type", "occurred_at", "data",
)


def row_hash(prev_hash: str, row: Mapping[str, Any]) -> str:
    content = {
        "position": int(row["position"]),
        "event_id": str(row["event_id"]),
        "aggregate_id": str(row["aggregate_id"]),
        "aggregate_type": row["aggregate_type"],
        "version": int(row["version"]),
        "merchant_id": str(row["merchant_id"]) if row["merchant_id"] else None,
        "event_type": row["event_type"],
        "occurred_at": row["occurred_at"].astimezone(UTC).isoformat(),
        "data": row["data"],
    }
    return hashlib.sha256(prev_hash.encode() + b"\n" + _canonical.encode(content)).hexdigest()


class AuditProjection:
    name = "audit"
    tables = ("audit_log",)

    def apply(self, cur: psycopg.Cursor[Any], e: EventEnvelope) -> None:
        data = msgspec.to_builtins(mask_event_data(e.data))
        cur.execute(
            "INSERT INTO audit_log (position, event_id, aggregate_id, aggregate_type, version,"
            " merchant_id, event_type, occurred_at, data) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (e.position, e.event_id, e.aggregate_id, e.aggregate_type, e.version, e.merchant_id,
             e.event_type, e.occurred_at, Jsonb(data)),
        )

    def after_batch(self, cur: psycopg.Cursor[Any]) -> None:
        extend_chain(cur)


def extend_chain(cur: psycopg.Cursor[Any], limit: int = 5_000) -> int:
    """Hash the unchained rows that directly follow the chained prefix; returns how many."""
    cur.execute("SELECT pg_advisory_xact_lock(%s)", (_CHAIN_LOCK_ID,))
    cur.execute("SELECT position, hash FROM audit_log WHERE hash IS NOT NULL ORDER BY position DESC LIMIT 1")
    last = cur.fetchone()
    last_position, prev = (int(last[0]), last[1]) if last else (0, GENESIS_HASH)
    chained = 0
    while True:
        cur.execute(
            "SELECT " + ", ".join(COLUMNS) + " FROM audit_log WHERE position > %s AND hash IS NULL"
            " ORDER BY position LIMIT %s",
            (last_position, limit),
        )
        names = [c.name for c in cur.description or ()]
        rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
        if not rows:
            return chained
        # The positions that really exist after the prefix; a row may only join the chain if
        # every existing position before it is already in.
        cur.execute(
            "SELECT notification_id FROM public.ledger_events WHERE notification_id > %s"
            " ORDER BY notification_id LIMIT %s",
            (last_position, limit),
        )
        expected = [r[0] for r in cur.fetchall()]
        updates = []
        for row, position in zip(rows, expected, strict=False):
            if row["position"] != position:
                break
            digest = row_hash(prev, row)
            updates.append((prev, digest, position))
            prev, last_position = digest, position
        if updates:
            cur.executemany("UPDATE audit_log SET prev_hash = %s, hash = %s WHERE position = %s", updates)
            chained += len(updates)
        if len(updates) < len(rows):
            return chained


@dataclass(frozen=True)
class ChainReport:
    rows_checked: int
    unchained: int
    first_broken_position: int | None
    reason: str | None

    @property
    def ok(self) -> bool:
        return self.first_broken_position is None


def _rows(conn: psycopg.Connection[Any], batch: int = 5_000) -> Iterator[dict[str, Any]]:
    with conn.cursor(name="audit_verify") as cur:
        cur.itersize = batch
        cur.execute("SELECT " + ", ".join(COLUMNS) + ", prev_hash, hash FROM audit_log ORDER BY position")
        names = [*COLUMNS, "prev_hash", "hash"]
        for r in cur:
            yield dict(zip(names, r, strict=True))


def verify_chain(conn: psycopg.Connection[Any]) -> ChainReport:
    """Recompute the chain from the first row; name the first row that does not hold."""
    prev, checked, unchained = GENESIS_HASH, 0, 0
    ended = False
    with conn.transaction():
        for row in _rows(conn):
            if row["hash"] is None:
                ended = True
                unchained += 1
                continue
            if ended:
                return ChainReport(checked, unchained, row["position"], "a hashed row follows an unchained one")
            checked += 1
            if row["prev_hash"] != prev:
                return ChainReport(checked, unchained, row["position"], "prev_hash does not match the previous row")
            if row_hash(prev, row) != row["hash"]:
                return ChainReport(checked, unchained, row["position"], "content does not match its hash")
            prev = row["hash"]
    return ChainReport(checked, unchained, None, None)


def export_rows(
    conn: psycopg.Connection[Any], *, aggregate_id: str | None = None, merchant_id: str | None = None,
    since: datetime | None = None, until: datetime | None = None,
) -> Iterator[dict[str, Any]]:
    clauses, params = [], []
    for column, op, value in (
        ("aggregate_id", "=", aggregate_id), ("merchant_id", "=", merchant_id),
        ("occurred_at", ">=", since), ("occurred_at", "<", until),
    ):
        if value is not None:
            clauses.append(f"{column} {op} %s")
            params.append(value)
    where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
    with conn.cursor(name="audit_export") as cur:
        cur.execute(
            "SELECT " + ", ".join(COLUMNS) + ", prev_hash, hash FROM audit_log" + where + " ORDER BY position",
            params,
        )
        names = [*COLUMNS, "prev_hash", "hash"]
        for r in cur:
            yield dict(zip(names, r, strict=True))

"""Audit: an append-only log of every event, personal data masked, hash-chained in position order.

Each row's hash is SHA-256 over the previous row's hash and this row's canonical content, so
changing, removing or reordering any row breaks the chain from that row on. Rows arrive in any
order (Kafka partitions interleave); the chain is extended over the gap-free prefix of the
event store's positions, skipping positions a rolled-back transaction never filled.

A batch is hashed in Python before it is written: its rows go in with one statement, the chained
ones already carrying their hashes, so no row is written twice.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgspec
import psycopg

from application.envelope import EventEnvelope
from application.masking import mask_event_data

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


def batch_row_hash(prev_hash: str, row: Mapping[str, Any]) -> str:
    """``row_hash`` of a row about to be written, whose ``data_canonical`` is its data already in
    canonical JSON (encoded once for both the hash and the insert). Same bytes as ``row_hash``:
    msgspec writes a UUID as ``str`` does, and a Raw value verbatim."""
    content = {
        "position": row["position"],
        "event_id": row["event_id"],
        "aggregate_id": row["aggregate_id"],
        "aggregate_type": row["aggregate_type"],
        "version": row["version"],
        "merchant_id": row["merchant_id"],
        "event_type": row["event_type"],
        "occurred_at": row["occurred_at"].astimezone(UTC).isoformat(),
        "data": msgspec.Raw(row["data_canonical"]),
    }
    return hashlib.sha256(prev_hash.encode() + b"\n" + _canonical.encode(content)).hexdigest()


def stored_json(value: Any) -> Any:
    """``value`` as it reads back from a jsonb column, so a hash computed before the insert equals
    one computed from the row: jsonb keeps numbers as numeric, so a float written with an
    exponent (1e+16) reads back in plain digits, an int when it has no fraction."""
    if type(value) is dict:
        return {k: stored_json(v) for k, v in value.items()}
    if type(value) is list:
        return [stored_json(v) for v in value]
    if type(value) is float:
        if value == 0:
            return 0.0  # numeric has no negative zero
        text = repr(value)
        if "e+" in text:
            return int(Decimal(text))
    return value


# In msgspec's JSON, a number with a positive exponent, or a negative zero; a string that looks
# like one only costs the exact (slower) walk.
_MAY_CHANGE_IN_JSONB = re.compile(rb"[:,\[]-?\d+(?:\.\d+)?e\d|[:,\[]-0\.0[,\]}]")


class AuditProjection:
    name = "audit"
    tables: tuple[str, ...] = ("audit_log",)

    def apply_batch(self, cur: psycopg.Cursor[Any], envelopes: Sequence[EventEnvelope]) -> None:
        rows = []
        for e in envelopes:
            data = msgspec.to_builtins(mask_event_data(e.data))
            encoded = _canonical.encode(data)
            # The hash covers the data as it will read back from jsonb (see stored_json).
            canonical = _canonical.encode(stored_json(data)) if _MAY_CHANGE_IN_JSONB.search(encoded) else encoded
            rows.append({"position": e.position, "event_id": e.event_id, "aggregate_id": e.aggregate_id,
                         "aggregate_type": e.aggregate_type, "version": e.version,
                         "merchant_id": e.merchant_id or None, "event_type": e.event_type,
                         "occurred_at": e.occurred_at, "json": encoded, "data_canonical": canonical})
        insert_chained(cur, rows)


def _chain_start(cur: psycopg.Cursor[Any]) -> tuple[int, str]:
    cur.execute("SELECT pg_advisory_xact_lock(%s)", (_CHAIN_LOCK_ID,))
    cur.execute("SELECT position, hash FROM audit_log WHERE hash IS NOT NULL ORDER BY position DESC LIMIT 1")
    last = cur.fetchone()
    return (int(last[0]), last[1]) if last else (0, GENESIS_HASH)


def _chain(
    cur: psycopg.Cursor[Any], last_position: int, prev: str, candidates: list[dict[str, Any]]
) -> tuple[list[tuple[str, str, int]], int, str]:
    """Hash the candidates (in position order) that continue the chain without a gap in the event
    store's positions; returns (prev_hash, hash, position) per chained row and the new end."""
    if not candidates:
        return [], last_position, prev
    cur.execute(
        "SELECT notification_id FROM public.ledger_events WHERE notification_id > %s"
        " ORDER BY notification_id LIMIT %s",
        (last_position, len(candidates)),
    )
    expected = [r[0] for r in cur.fetchall()]
    chained = []
    for row, position in zip(candidates, expected, strict=False):
        if row["position"] != position:
            break
        digest = batch_row_hash(prev, row) if "data_canonical" in row else row_hash(prev, row)
        chained.append((prev, digest, position))
        prev, last_position = digest, position
    return chained, last_position, prev


_batch_json = msgspec.json.Encoder()


def insert_chained(cur: psycopg.Cursor[Any], rows: list[dict[str, Any]], limit: int = 5_000) -> None:
    """Insert these audit rows (in position order) with one statement, hashed where they extend
    the chain, and chain the earlier rows that were waiting for them."""
    last_position, prev = _chain_start(cur)
    pending = sorted(rows, key=lambda r: r["position"])
    hashes: dict[int, tuple[str, str]] = {}
    updates: list[tuple[str, str, int]] = []
    while True:
        # Rows of earlier batches still waiting for a position before them, then this batch's.
        cur.execute(
            "SELECT " + ", ".join(COLUMNS) + " FROM audit_log WHERE position > %s AND hash IS NULL"
            " ORDER BY position LIMIT %s",
            (last_position, limit),
        )
        waiting = [dict(zip(COLUMNS, r, strict=True)) for r in cur.fetchall()]
        full = len(waiting) == limit
        fresh = [r for r in pending if r["position"] > last_position]
        if full:
            fresh = [r for r in fresh if r["position"] < waiting[-1]["position"]]
        candidates = sorted([*waiting, *fresh], key=lambda r: r["position"])
        chained, last_position, prev = _chain(cur, last_position, prev, candidates)
        old = {r["position"] for r in waiting}
        for prev_hash, digest, position in chained:
            if position in old:
                updates.append((prev_hash, digest, position))
            else:
                hashes[position] = (prev_hash, digest)
        if not full or len(chained) < len(candidates):
            break
    if rows:
        # The whole batch as one JSON parameter, encoded in C by msgspec and unpacked by the
        # server: no per-value adaptation in Python, works in a pipeline and under row-level
        # security (where COPY FROM is refused).
        payload = _batch_json.encode([
            (r["position"], r["event_id"], r["aggregate_id"], r["aggregate_type"], r["version"], r["merchant_id"],
             r["event_type"], r["occurred_at"], msgspec.Raw(r["json"]), *hashes.get(r["position"], (None, None)))
            for r in rows
        ])
        cur.execute(
            "INSERT INTO audit_log (" + ", ".join(COLUMNS) + ", prev_hash, hash)"
            " SELECT (r->>0)::bigint, (r->>1)::uuid, (r->>2)::uuid, r->>3, (r->>4)::bigint, (r->>5)::uuid,"
            " r->>6, (r->>7)::timestamptz, r->8, r->>9, r->>10 FROM jsonb_array_elements(%s::jsonb) AS r",
            (payload.decode(),),
        )
    if updates:
        cur.execute(
            "UPDATE audit_log a SET prev_hash = u.p, hash = u.h FROM unnest(%b::text[], %b::text[], %b::bigint[])"
            " AS u(p, h, pos) WHERE a.position = u.pos",
            ([u[0] for u in updates], [u[1] for u in updates], [u[2] for u in updates]), binary=True,
        )


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


# Progress callbacks (api/progress.py) hear of every this many rows: (position reached, rows done).
PROGRESS_EVERY_ROWS = 5_000
Progress = Callable[[int, int], object]


def last_position(conn: psycopg.Connection[Any]) -> int:
    """The audit log's last position (its primary key): the end of a verify or an export."""
    row = conn.execute("SELECT COALESCE(max(position), 0) FROM audit_log").fetchone()
    return int(row[0]) if row else 0


def verify_chain(conn: psycopg.Connection[Any], progress: Progress | None = None) -> ChainReport:
    """Recompute the chain from the first row; name the first row that does not hold.
    ``progress`` hears of every PROGRESS_EVERY_ROWS rows read."""
    prev, checked, unchained = GENESIS_HASH, 0, 0
    ended = False
    with conn.transaction():
        for read, row in enumerate(_rows(conn), 1):
            if progress is not None and read % PROGRESS_EVERY_ROWS == 0:
                progress(row["position"], read)
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
    since: datetime | None = None, until: datetime | None = None, progress: Progress | None = None,
) -> Iterator[dict[str, Any]]:
    """The rows that match, in position order. ``progress`` hears of every PROGRESS_EVERY_ROWS
    rows yielded (once the caller took them)."""
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
        for done, r in enumerate(cur, 1):
            row = dict(zip(names, r, strict=True))
            yield row
            if progress is not None and done % PROGRESS_EVERY_ROWS == 0:
                progress(row["position"], done)

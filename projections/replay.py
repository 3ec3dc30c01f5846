"""Rebuilding read models from the event feed, and checking live ones against a rebuild."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from projections.engine import OpenEnvelope, Progress, Projection, ProjectionStore

BOOKKEEPING = ("projection_versions", "projection_checkpoints")


def _rows_of(table: str, side: sql.Identifier) -> sql.Composable:
    """A side's rows of a table to compare; the versions one row per projection and aggregate,
    as a difference reads best, of the projections given as the parameter."""
    if table == "projection_versions":
        return sql.SQL(
            "SELECT v.aggregate_id, a.key AS projection, (a.value->>0)::bigint AS version,"
            " (a.value->>1)::bigint AS position FROM {}.projection_versions v"
            " CROSS JOIN jsonb_each(v.applied) AS a WHERE a.key = ANY(%s)"
        ).format(side)
    return sql.SQL("SELECT * FROM {}.{}").format(side, sql.Identifier(table))


@dataclass(frozen=True)
class Difference:
    table: str
    side: str  # "live only" or "rebuild only"
    row: dict[str, Any]


def rebuild(database_url: str, projections: Sequence[Projection], open_envelope: OpenEnvelope,
            progress: Progress | None = None) -> int:
    """Empty the read models and apply the whole outbox again. ``progress``: see
    ``ProjectionStore.catch_up`` (the end is ``ProjectionStore.last_position``)."""
    store = ProjectionStore(database_url, projections, open_envelope)
    try:
        return store.rebuild(progress)
    finally:
        store.close()


def verify(
    database_url: str, projections: Sequence[Projection], open_envelope: OpenEnvelope, *, max_rows: int = 50,
    progress: Progress | None = None,
) -> list[Difference]:
    """Rebuild into scratch tables and list every row that differs from the live tables."""
    schema = f"verify_{uuid.uuid4().hex[:10]}"
    tables = [t for p in projections for t in p.tables]
    names = [p.name for p in projections]
    differences: list[Difference] = []
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        try:
            for table in (*tables, *BOOKKEEPING):
                conn.execute(
                    sql.SQL("CREATE TABLE {}.{} (LIKE public.{} INCLUDING ALL)").format(
                        sql.Identifier(schema), sql.Identifier(table), sql.Identifier(table)
                    )
                )
            # Nobody queries the scratch tables by merchant or time: keep only the unique indexes
            # the projections' upserts and checks need, and skip maintaining the others.
            for (index,) in conn.execute(
                "SELECT i.indexrelid::regclass::text FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid"
                " WHERE c.relnamespace = %s::regnamespace AND NOT i.indisunique",
                (schema,),
            ).fetchall():
                conn.execute(sql.SQL("DROP INDEX {}").format(sql.SQL(index)))
            store = ProjectionStore(database_url, projections, open_envelope, schema=schema)
            try:
                store.rebuild(progress)
            finally:
                store.close()
            public, scratch = sql.Identifier("public"), sql.Identifier(schema)
            for table in (*tables, "projection_versions"):
                live, rebuilt = _rows_of(table, public), _rows_of(table, scratch)
                params = [names] if table == "projection_versions" else []
                # Both sides in one query: rows only live, then rows only rebuilt, each capped.
                query = sql.SQL(
                    "(SELECT 'live only' AS _side, d.* FROM ({l} EXCEPT {r}) d LIMIT %s)"
                    " UNION ALL (SELECT 'rebuild only', d.* FROM ({r} EXCEPT {l}) d LIMIT %s)"
                ).format(l=live, r=rebuilt)
                with conn.cursor() as cur:
                    cur.execute(query, [*params, *params, max_rows, *params, *params, max_rows])
                    columns = [c.name for c in cur.description or ()][1:]
                    differences += [
                        Difference(table, row[0], dict(zip(columns, row[1:], strict=True))) for row in cur.fetchall()
                    ]
        finally:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
    return differences

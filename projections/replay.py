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


def _comparison(table: str, schema: str, names: Sequence[str], others: Sequence[str]) -> sql.Composed:
    """The rows only live, then the rows only rebuilt, each side capped at a parameter. Of the
    versions, each aggregate's entries of these projections (``others``: the live rows' other
    projections), compared in one join on the aggregate, each side read once."""
    public, scratch = sql.Identifier("public"), sql.Identifier(schema)
    if table == "projection_versions":
        return sql.SQL(
            "WITH d AS (SELECT aggregate_id, l.applied AS live, r.applied AS rebuilt"
            " FROM (SELECT aggregate_id, applied - {others} AS applied FROM {l}.projection_versions"
            "  WHERE applied ?| {names}) l"
            " FULL JOIN (SELECT aggregate_id, applied FROM {r}.projection_versions) r USING (aggregate_id)"
            " WHERE l.applied IS DISTINCT FROM r.applied)"
            " (SELECT 'live only' AS _side, aggregate_id, live AS applied FROM d WHERE live IS NOT NULL LIMIT %s)"
            " UNION ALL (SELECT 'rebuild only', aggregate_id, rebuilt FROM d WHERE rebuilt IS NOT NULL LIMIT %s)"
        ).format(l=public, r=scratch, names=sql.Literal(list(names)),
                 others=sql.SQL("{}::text[]").format(sql.Literal(list(others))))
    return sql.SQL(
        "(SELECT 'live only' AS _side, d.* FROM (SELECT * FROM {l}.{t} EXCEPT SELECT * FROM {r}.{t}) d LIMIT %s)"
        " UNION ALL (SELECT 'rebuild only', d.* FROM (SELECT * FROM {r}.{t} EXCEPT SELECT * FROM {l}.{t}) d LIMIT %s)"
    ).format(l=public, r=scratch, t=sql.Identifier(table))


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
            others = [k for (k,) in conn.execute(
                "SELECT DISTINCT jsonb_object_keys(applied) FROM public.projection_versions").fetchall()
                if k not in names]
            for table in (*tables, "projection_versions"):
                with conn.cursor() as cur:
                    cur.execute(_comparison(table, schema, names, others), [max_rows, max_rows])
                    columns = [c.name for c in cur.description or ()][1:]
                    differences += [
                        Difference(table, row[0], dict(zip(columns, row[1:], strict=True))) for row in cur.fetchall()
                    ]
        finally:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
    return differences

"""Memory of the Redis status cache: bytes per cached session row, written by
``StatusCache.refresh`` (what the worker does after each batch), against the same row JSON kept
as a plain Redis string with the same TTL.

The cache keeps each row in a hash with its version beside it, so that two workers racing can
never move an entry back in time. This measures what that costs in Redis memory (``INFO
memory``'s ``used_memory``, before and after) over the most compact form of the same data.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

import psycopg
import redis

from api.bootstrap import envelope_opener
from bench.context import BenchContext
from bench.harness import Benchmark, Metric, Sample
from projections.engine import ProjectionStore
from projections.registry import select
from projections.status_cache import TTL_S, StatusCache


def _all_keys(client: redis.Redis) -> set[bytes]:
    return set(client.scan_iter(count=1_000))


class CacheMemory(Benchmark):
    name = "cache.status_rows"
    ours = "StatusCache.refresh: one Redis hash (version, row JSON) per session, with TTL"
    baseline = "SET key row-JSON EX ttl: the same bytes as plain strings"
    metrics = (
        Metric("bytes_per_row", "bytes/row", higher_is_better=False, target_ratio=1.5,
               target_why="the version guard costs at most half again the data's own size"),
    )

    def __init__(self, ctx: BenchContext, rows: int) -> None:
        self.ctx = ctx
        self.rows = rows
        self._client: redis.Redis | None = None
        self._cache: StatusCache | None = None
        self._conn: psycopg.Connection[Any] | None = None
        self._session_ids: list[UUID] = []
        self._ours_keys: list[bytes] = []
        self._plain: dict[bytes, bytes] = {}

    def setup(self) -> None:
        ctx = self.ctx
        self._session_ids = ctx.seed_sessions("cache", self.rows)
        store = ProjectionStore(ctx.database_url, select("status"), envelope_opener(ctx.settings))
        try:
            store.apply_batch(ctx.envelopes(self._session_ids))
        finally:
            store.close()
        self._client = redis.Redis.from_url(ctx.servers.redis_url)
        self._cache = StatusCache(self._client)
        self._conn = psycopg.connect(ctx.database_url, autocommit=True)
        # Which keys the cache uses is its own business: find them by writing once. On a shared
        # Redis other keys may appear meanwhile; ours are those that name one of our sessions.
        before = _all_keys(self._client)
        self._cache.refresh(self._conn, self._session_ids)
        ids = {str(i).encode() for i in self._session_ids}
        self._ours_keys = sorted(k for k in _all_keys(self._client) - before if any(i in k for i in ids))
        if len(self._ours_keys) != len(self._session_ids):
            raise RuntimeError(f"found {len(self._ours_keys)} cache keys for {len(self._session_ids)} sessions")
        # The same row JSON under keys of the same length, as plain strings.
        for key in self._ours_keys:
            row = self._client.hget(key, "row")
            assert isinstance(row, bytes), row
            self._plain[b"bench-plain:" + key[len(b"bench-plain:"):]] = row
        self._clear()

    def _clear(self) -> None:
        assert self._client is not None
        keys = [*self._ours_keys, *self._plain]
        if keys:
            self._client.delete(*keys)

    def _used_memory(self) -> int:
        assert self._client is not None
        return int(self._client.info("memory")["used_memory"])

    def run_ours(self, round_no: int) -> Sample:
        assert self._cache is not None and self._conn is not None
        self._clear()
        before = self._used_memory()
        written = self._cache.refresh(self._conn, self._session_ids)
        after = self._used_memory()
        if written != len(self._session_ids):
            raise RuntimeError(f"the cache took {written} of {len(self._session_ids)} rows")
        return {"bytes_per_row": max(1.0, (after - before) / written)}

    def run_baseline(self, round_no: int) -> Sample:
        assert self._client is not None
        self._clear()
        before = self._used_memory()
        pipe = self._client.pipeline(transaction=False)
        for key, row in self._plain.items():
            pipe.set(key, row, ex=TTL_S)
        pipe.execute()
        after = self._used_memory()
        return {"bytes_per_row": max(1.0, (after - before) / len(self._plain))}

    def close(self) -> None:
        if self._client is not None:
            self._clear()
            self._client.close()
            self._client = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def describe(self) -> dict[str, Any]:
        sizes = [len(v) for v in self._plain.values()]
        return {"rows_per_round": len(self._session_ids),
                "mean_row_json_bytes": round(sum(sizes) / len(sizes)) if sizes else 0}

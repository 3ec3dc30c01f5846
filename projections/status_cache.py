"""Redis as a cache in front of the status read model, for hot reads by integrators.

The worker writes the rows of a batch to Redis inside the batch's transaction, just before it
commits (ProjectionStore.on_batch), for every aggregate of the batch, already applied or not. So
a worker killed between its commit and its cache write cannot exist: the cache write came first,
and if the commit is then lost, the redelivered batch writes the same rows again. Two workers may
race; the compare-and-set keeps the highest version, so the cache never goes back in time.
Redis itself may: restarted from an older snapshot, it brings back entries older than the read
model that no later event may overwrite. Every write also increments a clock key; a writer that
reads a clock not above the last one it saw drops the whole cache (the worker also looks at every
catch-up while idle, and drops the cache when it starts, since a worker that died may have held
failed writes to retry).
``differences`` lists entries that disagree with the read model (``echotransact replay --verify``).
"""

from __future__ import annotations

import asyncio
import json
import threading
import weakref
from collections.abc import Iterable, Iterator
from typing import Any
from uuid import UUID

import psycopg
import redis
import redis.asyncio
import structlog

log = structlog.get_logger(__name__)

TTL_S = 3600
_SET_IF_NEWER = """
local current = redis.call('HGET', KEYS[1], 'version')
if current and tonumber(current) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'row', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""
TABLES = {"session": ("session_status", "session_id"), "payment": ("payment_status", "payment_id")}


_PREFIX = "echotransact:status:"
# Incremented with every write of the cache: how a writer sees that Redis went back in time.
CLOCK_KEY = "echotransact:status-clock"


def cache_key(kind: str, aggregate_id: UUID | str) -> str:
    """The Redis key of one aggregate's cached row (``kind``: session or payment)."""
    return f"{_PREFIX}{kind}:{aggregate_id}"


def forget(client: redis.Redis, kind: str, aggregate_ids: Iterable[UUID | str]) -> int:
    """Drop these aggregates' cached rows (an erasure changed what they show); the next read
    fills the cache from the read model. Raises redis.RedisError for the caller to judge."""
    keys = [cache_key(kind, a) for a in aggregate_ids]
    return int(client.delete(*keys)) if keys else 0


def _row_json(row: dict[str, Any]) -> str:
    return json.dumps(row, default=str, sort_keys=True)


def _rows(conn: psycopg.Connection[Any], ids: list[UUID]) -> Iterator[tuple[str, dict[str, Any]]]:
    for kind, (table, id_column) in TABLES.items():
        with conn.cursor() as cur:
            cur.execute(f"SELECT * FROM {table} WHERE {id_column} = ANY(%s)", (ids,))
            rows = cur.fetchall()  # first: in a pipeline the columns are known once it is fetched
            names = [c.name for c in cur.description or ()]
            for values in rows:
                yield kind, dict(zip(names, values, strict=True))


class StatusCache:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._set_if_newer = client.register_script(_SET_IF_NEWER)
        self._last_clock: int | None = None
        self._clock_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str) -> StatusCache:
        # Bounded waits: the worker writes inside a PostgreSQL transaction.
        return cls(redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0))

    def refresh(self, conn: psycopg.Connection[Any], aggregate_ids: Iterable[UUID]) -> int:
        """Copy the rows of these aggregates, as ``conn`` sees them, into the cache (one pipelined
        round trip); returns how many entries changed. If Redis went back in time since this
        cache last wrote (it restarted from an older snapshot, whose entries may be older than
        the read model), every entry is dropped first."""
        ids = list(aggregate_ids)
        if not ids:
            return 0
        pipe = self.client.pipeline(transaction=False)
        pipe.incr(CLOCK_KEY)
        for kind, row in _rows(conn, ids):
            id_column = TABLES[kind][1]
            self._set_if_newer(keys=[cache_key(kind, row[id_column])], args=[row["version"], _row_json(row), TTL_S],
                               client=pipe)
        with self._clock_lock:  # the clock's reading and its comparison, one thread at a time
            clock, *changed = pipe.execute()
            went_back = self._went_back(int(clock))
        if went_back:
            self.clear()
            return self.refresh(conn, ids)
        return sum(int(c) for c in changed)

    def check(self) -> bool:
        """Drop every entry if Redis went back in time since this cache last looked (for an idle
        worker, between batches); True when it did."""
        with self._clock_lock:
            went_back = self._went_back(int(self.client.incr(CLOCK_KEY)))
        if went_back:
            self.clear()
            return True
        return False

    def _went_back(self, clock: int) -> bool:
        # The clock only grows, whoever increments it; a value not above the last one seen here
        # means Redis lost writes (a restart from a snapshot, or a new empty server).
        went_back = self._last_clock is not None and clock <= self._last_clock
        self._last_clock = clock
        if went_back:
            log.warning("status_cache_went_back", clock=clock)
        return went_back

    def clear(self) -> int:
        """Drop every cached status (reads fall through to the read model until the worker
        writes them again); how many entries were dropped."""
        dropped = 0
        batch: list[bytes] = []
        for key in self.client.scan_iter(match=f"{_PREFIX}*", count=1_000):
            batch.append(key)
            if len(batch) >= 1_000:
                dropped += int(self.client.unlink(*batch))
                batch = []
        if batch:
            dropped += int(self.client.unlink(*batch))
        return dropped

    def differences(self, conn: psycopg.Connection[Any], *, batch: int = 1_000,
                    max_rows: int = 50) -> list[tuple[str, str, dict[str, Any] | None]]:
        """Cache entries that disagree with the read model: (kind, id, cached row). A missing
        entry is fine (a miss reads PostgreSQL); one that differs is not."""
        found: list[tuple[str, str, dict[str, Any] | None]] = []
        for kind, (table, id_column) in TABLES.items():
            with conn.cursor(name=f"cache_check_{kind}") as cur:  # server side: tables may be large
                cur.itersize = batch
                cur.execute(f"SELECT * FROM {table}")
                names = [c.name for c in cur.description or ()]
                while rows := cur.fetchmany(batch):
                    live = [dict(zip(names, values, strict=True)) for values in rows]
                    pipe = self.client.pipeline(transaction=False)
                    for row in live:
                        pipe.hget(cache_key(kind, row[id_column]), "row")
                    for row, cached in zip(live, pipe.execute(), strict=True):
                        if cached is not None and json.loads(cached) != json.loads(_row_json(row)):
                            found.append((kind, str(row[id_column]), json.loads(cached)))
                            if len(found) >= max_rows:
                                return found
        return found

    def get(self, kind: str, aggregate_id: UUID | str) -> dict[str, Any] | None:
        """The cached row, or None: not cached, or Redis cannot be reached (the cache is only a
        hint; the caller reads the read model in PostgreSQL instead). ``aget`` is the same on an
        event loop."""
        try:
            raw = self.client.hget(cache_key(kind, aggregate_id), "row")
        except redis.RedisError as error:
            log.warning("status_cache_unavailable", error=str(error))
            return None
        return json.loads(raw) if raw else None


class AsyncStatusReader:
    """``StatusCache.get`` for an event loop (redis.asyncio): a request that the cache answers
    never leaves the loop for a worker thread. An asyncio Redis connection belongs to the loop
    that opened it, so each loop (uvicorn has one; tests may run several) gets a client."""

    def __init__(self, redis_url: str, *, timeout_s: float = 1.0) -> None:
        self.redis_url = redis_url
        self.timeout_s = timeout_s
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, redis.asyncio.Redis] = (
            weakref.WeakKeyDictionary())

    def _client(self) -> redis.asyncio.Redis:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = self._clients[loop] = redis.asyncio.Redis.from_url(
                self.redis_url, socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s)
        return client

    async def get(self, kind: str, aggregate_id: UUID | str) -> dict[str, Any] | None:
        try:
            raw = await self._client().hget(cache_key(kind, aggregate_id), "row")  # type: ignore[misc]
        except redis.RedisError as error:
            log.warning("status_cache_unavailable", error=str(error))
            return None
        return json.loads(raw) if raw else None

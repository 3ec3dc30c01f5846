"""The Redis status cache against the read model it copies: written inside each batch's
transaction, repaired by a redelivered batch, and checked by ``StatusCache.differences``."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
import redis

from adapters.dev.servers import ServerURLs
from api.bootstrap import envelope_opener, personal_data_reader
from api.settings import Settings
from application.ledger import Ledger
from projections.engine import ProjectionStore
from projections.registry import all_projections
from projections.status_cache import StatusCache, _row_json, cache_key
from tests.application.flows import new_merchant, open_session, pay
from tests.projections.test_engine import feed


@pytest.fixture
def cache(servers: ServerURLs) -> StatusCache:
    return StatusCache(redis.Redis.from_url(servers.redis_url))


@pytest.fixture
def cached_store(database_url: str, settings: Settings, cache: StatusCache) -> Iterator[ProjectionStore]:
    s = ProjectionStore(database_url, list(all_projections(personal_data_reader(settings)).values()),
                        envelope_opener(settings),
                        on_batch=cache.refresh)
    yield s
    s.close()


def session_row(database_url: str, session_id: object) -> dict[str, object]:
    with psycopg.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT * FROM session_status WHERE session_id = %s", (session_id,))
        values = cur.fetchone()
        assert values is not None
        return dict(zip([c.name for c in cur.description or ()], values, strict=True))


def test_a_batch_writes_the_cache_in_its_transaction_and_a_redelivery_repairs_a_lost_write(
    ledger: Ledger, cached_store: ProjectionStore, cache: StatusCache, database_url: str, settings: Settings
) -> None:
    merchant = new_merchant(ledger, "cache")
    session_id = open_session(ledger, merchant, "cache-s")
    first = feed(database_url, settings)
    cached_store.apply_batch(first)
    live = session_row(database_url, session_id)
    assert cache.get("session", session_id) == _plain(live)

    # A worker killed after its read-model commit but before its cache write (what the old
    # post-commit write allowed): the cache still holds the session's previous version.
    payment_id = pay(ledger, session_id, prefix="cache-")
    ledger.authorize_payment(payment_id)
    everything = feed(database_url, settings)
    cached_store.apply_batch(everything)
    newer = session_row(database_url, session_id)
    assert newer["version"] != live["version"]
    cache.client.delete(cache_key("session", session_id))
    cache.client.hset(cache_key("session", session_id),
                      mapping={"version": str(live["version"]), "row": _row_json(live)})
    with psycopg.connect(database_url) as conn:
        assert [(kind, str(i)) for kind, i, _ in cache.differences(conn)] == [("session", str(session_id))]

    # Kafka redelivers the batch: every event is a duplicate, and the cache is repaired anyway.
    result = cached_store.apply_batch(everything)
    assert result.applied == 0 and result.duplicates > 0
    assert cache.get("session", session_id) == _plain(newer)
    with psycopg.connect(database_url) as conn:
        assert cache.differences(conn) == []


def test_a_cache_write_made_before_a_failed_commit_is_made_true_by_the_retry(
    ledger: Ledger, cache: StatusCache, database_url: str, settings: Settings
) -> None:
    merchant = new_merchant(ledger, "cache2")
    session_id = open_session(ledger, merchant, "cache2-s")
    calls = []

    def write_then_fail(conn: psycopg.Connection[object], ids: object) -> None:
        cache.refresh(conn, ids)  # type: ignore[arg-type]
        calls.append(ids)
        if len(calls) == 1:
            raise ConnectionError("the worker died before its commit")

    store = ProjectionStore(database_url, list(all_projections(personal_data_reader(settings)).values()),
                            envelope_opener(settings),
                            on_batch=write_then_fail)
    try:
        with pytest.raises(ConnectionError):
            store.apply_batch(feed(database_url, settings))
        with psycopg.connect(database_url) as conn:  # nothing committed, the cache is ahead of it
            assert conn.execute("SELECT count(*) FROM session_status").fetchone() == (0,)
        assert cache.get("session", session_id) is not None
        store.apply_batch(feed(database_url, settings))  # the redelivery
    finally:
        store.close()
    assert cache.get("session", session_id) == _plain(session_row(database_url, session_id))


def _plain(row: dict[str, object]) -> dict[str, object]:
    import json

    return json.loads(_row_json(row))  # type: ignore[no-any-return]


def test_the_event_loop_read_answers_what_the_blocking_read_answers_and_defers_the_rest(
    ledger: Ledger, cached_store: ProjectionStore, servers: ServerURLs, database_url: str, settings: Settings,
) -> None:
    """StatusQueries.cached (the API's GET without a thread hand-off) gives the cached row only
    when the blocking ``get`` would: visible to the caller's scope and at its position."""
    import asyncio
    from uuid import uuid4

    from projections.queries import StatusQueries
    from projections.status_cache import AsyncStatusReader
    from projections.views import ReadViews, Scope

    merchant = new_merchant(ledger, "loop")
    session_id = open_session(ledger, merchant, "loop-s")
    cached_store.apply_batch(feed(database_url, settings))
    with ReadViews(database_url) as views:
        queries = StatusQueries(views, cache=StatusCache(redis.Redis.from_url(servers.redis_url)),
                                loop_cache=AsyncStatusReader(servers.redis_url))
        mine, theirs = Scope("merchant", merchant), Scope("merchant", uuid4())
        position = int(session_row(database_url, session_id)["position"])  # type: ignore[call-overload]

        async def reads() -> list[object]:
            return [await queries.cached("session", session_id, scope=mine),
                    await queries.cached("session", session_id, scope=theirs),
                    await queries.cached("session", session_id, scope=mine, wait_for_position=position + 1),
                    await queries.cached("session", uuid4(), scope=mine)]

        answers = asyncio.run(reads())
        assert answers[0] == queries.get("session", session_id, scope=mine)[0]
        assert answers[1:] == [None, None, None]
        # Redis unreachable: a miss, and the blocking read answers from PostgreSQL.
        gone = StatusQueries(views, loop_cache=AsyncStatusReader("redis://127.0.0.1:1", timeout_s=0.2))
        assert asyncio.run(gone.cached("session", session_id, scope=mine)) is None


def test_a_redis_gone_back_in_time_loses_every_entry_not_just_the_stale_ones(
    ledger: Ledger, cached_store: ProjectionStore, cache: StatusCache, database_url: str, settings: Settings
) -> None:
    """Redis restarted from an older snapshot brings back entries older than the read model, and
    no later event may come to overwrite them: the next write (or an idle worker's check) sees
    the write clock go back and drops the whole cache."""
    merchant = new_merchant(ledger, "cache-back")
    session_id = open_session(ledger, merchant, "cache-back-s")
    cached_store.apply_batch(feed(database_url, settings))
    old = session_row(database_url, session_id)
    ledger.authorize_payment(pay(ledger, session_id, prefix="cache-back-"))
    cached_store.apply_batch(feed(database_url, settings))
    assert session_row(database_url, session_id)["version"] != old["version"]

    # The snapshot: the clock as it was, the session as it was.
    cache.client.set("echotransact:status-clock", 1)
    cache.client.delete(cache_key("session", session_id))
    cache.client.hset(cache_key("session", session_id), mapping={"version": str(old["version"]), "row": _row_json(old)})
    with psycopg.connect(database_url) as conn:
        assert cache.differences(conn) != []

    assert cache.check() is True  # an idle worker's look
    assert cache.get("session", session_id) is None  # a miss: the read model answers
    with psycopg.connect(database_url) as conn:
        assert cache.differences(conn) == []
    assert cache.check() is False  # and only once


def test_a_worker_starts_with_an_empty_cache(servers: ServerURLs, database_url: str, settings: Settings) -> None:
    """A worker that died may have held cache writes that had failed (Redis was down), to retry:
    its successor cannot know which, so it drops every entry before it applies anything."""
    from projections.worker import ProjectionWorker

    client = redis.Redis.from_url(servers.redis_url)
    client.hset(cache_key("session", "00000000-0000-0000-0000-000000000001"), mapping={"version": "1", "row": "{}"})
    worker = ProjectionWorker(database_url=database_url, kafka_bootstrap_servers=servers.kafka_bootstrap_servers,
                              redis_url=servers.redis_url,
                              projections=list(all_projections(personal_data_reader(settings)).values()),
                              open_envelope=envelope_opener(settings), topic_prefix="cache-start")
    try:
        worker._catch_up()  # what run() does first
    finally:
        worker.close()
    assert client.exists(cache_key("session", "00000000-0000-0000-0000-000000000001")) == 0

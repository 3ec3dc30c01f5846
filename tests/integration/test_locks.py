"""Per-payment authorization locks (adapters/postgres/locks.py) on the real PostgreSQL: exclusive across
connections, bounded waits that end in a retryable error, released on errors, and the lock's
connection is not returned to the pool still holding it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from adapters.postgres.locks import PostgresAdvisoryLocks
from application.errors import ProcessorUnavailable


@pytest.fixture
def locks(database_url: str) -> Iterator[PostgresAdvisoryLocks]:
    made = PostgresAdvisoryLocks(database_url, max_holders=4, timeout_s=0.5)
    yield made
    made.close()


def test_a_second_holder_waits_at_most_the_timeout_then_is_told_to_retry(locks: PostgresAdvisoryLocks) -> None:
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with locks.hold("authorize:p1"):
            held.set()
            release.wait(5)

    thread = threading.Thread(target=holder)
    thread.start()
    assert held.wait(5)
    started = time.monotonic()
    with pytest.raises(ProcessorUnavailable, match="try again"), locks.hold("authorize:p1"):
        pass
    assert time.monotonic() - started < 3  # bounded by lock_timeout (0.5 s), not by the holder
    with locks.hold("authorize:p2"):  # another key is not blocked
        pass
    release.set()
    thread.join()
    with locks.hold("authorize:p1"):  # released
        pass


def test_an_error_inside_releases_the_lock(locks: PostgresAdvisoryLocks) -> None:
    with pytest.raises(ValueError), locks.hold("authorize:p3"):
        raise ValueError("the processor call failed")
    done = threading.Event()

    def other() -> None:
        with locks.hold("authorize:p3"):
            done.set()

    thread = threading.Thread(target=other)  # another thread, so likely another connection
    thread.start()
    thread.join(5)
    assert done.is_set()


def test_on_the_process_pool_holders_are_bounded_and_connections_come_back_unchanged(database_url: str) -> None:
    """On a shared pool: more holders than ``max_holders`` wait for a turn (and are told to retry)
    instead of taking the connections the rest of the process needs; a connection comes back
    with the lock_timeout it had."""
    from adapters.postgres.connection import open_pool

    pool = open_pool(database_url, max_size=4, max_idle_s=2.0, wait_s=2.0)
    shared = PostgresAdvisoryLocks(pool, max_holders=2, timeout_s=0.5)
    try:
        held, release = threading.Barrier(3), threading.Event()

        def holder(key: str) -> None:
            with shared.hold(key):
                held.wait(5)
                release.wait(5)

        threads = [threading.Thread(target=holder, args=(f"authorize:h{n}",)) for n in range(2)]
        for thread in threads:
            thread.start()
        held.wait(5)
        with pytest.raises(ProcessorUnavailable), shared.hold("authorize:h3"):
            pass  # a third key, free in PostgreSQL, but no turn left
        with pool.connection() as conn:  # the pool still serves the rest of the process
            assert conn.execute("SELECT 1").fetchone() == (1,)
        release.set()
        for thread in threads:
            thread.join()
        with shared.hold("authorize:h3"):
            pass
        with pool.connection() as conn:
            before = conn.execute("SHOW lock_timeout").fetchone()
        for _ in range(4):  # every connection the pool has
            with shared.hold("authorize:h4"):
                pass
        with pool.connection() as conn:
            assert conn.execute("SHOW lock_timeout").fetchone() == before
    finally:
        shared.close()
        pool.close()

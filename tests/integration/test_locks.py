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
    made = PostgresAdvisoryLocks(database_url, max_size=4, timeout_s=0.5)
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

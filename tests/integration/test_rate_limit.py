"""The API's rate limiter (adapters/redis/rate_limit.py) on the test run's real Redis: a sliding
window, so a burst across the turn of a window gets the limit, not twice it.

Not a pure unit test: the counting is a Lua script inside Redis, so only Redis can show it. The
turn of a window is made by shortening the window key's TTL (the counter keys expire on
Redis's clock), so no test waits a minute.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis
from structlog.testing import capture_logs

from adapters.dev.servers import ServerURLs, free_port
from adapters.redis.rate_limit import KEY_PREFIX, WINDOW_S, RateLimiter

LIMIT = 10


@pytest.fixture
def client(servers: ServerURLs) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(servers.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
    yield client
    client.close()


@pytest.fixture
def subject() -> str:
    # Fresh per test: the test run's Redis is shared.
    return f"key-{uuid.uuid4()}"


def hits(limiter: RateLimiter, subject: str, n: int) -> list[bool]:
    return [limiter.hit(subject).allowed for _ in range(n)]


def window_keys(client: redis.Redis, subject: str) -> tuple[bytes, bytes | None]:
    """The subject's current window key, and the previous window's (once the window has turned)."""
    keys = sorted(client.scan_iter(f"{KEY_PREFIX}:*{subject}*"))
    current = [key for key in keys if not key.endswith(b"/-1")]
    previous = [key for key in keys if key.endswith(b"/-1")]
    assert len(current) == 1, keys
    return current[0], previous[0] if previous else None


def turn_the_window(client: redis.Redis, subject: str, *, ms_ago: int = 10) -> None:
    """As if the subject's current window had ended ``ms_ago`` milliseconds ago. The current key
    lives two windows from its first hit; a TTL under one window means its window is over."""
    current, _ = window_keys(client, subject)
    assert client.pexpire(current, WINDOW_S * 1000 - ms_ago)


def test_the_limit_holds_within_a_window(client: redis.Redis, subject: str) -> None:
    limiter = RateLimiter(client, LIMIT)
    decisions = [limiter.hit(subject) for _ in range(LIMIT + 2)]
    assert [d.allowed for d in decisions] == [True] * LIMIT + [False] * 2
    refused = decisions[-1]
    assert 1 <= refused.retry_after_s <= WINDOW_S


def test_a_burst_at_a_window_edge_does_not_get_twice_the_limit(client: redis.Redis, subject: str) -> None:
    """A fixed window per clock minute let LIMIT through in the last moment of one minute and
    LIMIT more in the first moment of the next. The sliding window still counts the burst just
    before the turn (weighted by how much of its window still overlaps the last minute)."""
    limiter = RateLimiter(client, LIMIT)
    before = hits(limiter, subject, LIMIT)
    turn_the_window(client, subject)
    after = hits(limiter, subject, LIMIT)
    assert before == [True] * LIMIT
    # The previous window weighs 59.99/60 of LIMIT, rounded down: room for one more at most.
    assert sum(after) <= 1
    assert sum(before) + sum(after) < 2 * LIMIT


def test_the_window_slides_room_comes_back_as_the_last_burst_ages(client: redis.Redis, subject: str) -> None:
    limiter = RateLimiter(client, LIMIT)
    hits(limiter, subject, LIMIT)
    turn_the_window(client, subject)
    limiter.hit(subject)  # shifts the finished window to "previous"
    _, previous = window_keys(client, subject)
    assert previous is not None
    # A little under half a window since the burst (55% of it still overlaps the last minute, a
    # margin for the milliseconds this test takes): half of it still counts, rounded down.
    assert client.pexpire(previous, WINDOW_S * 1000 * 55 // 100)
    allowed = sum(hits(limiter, subject, LIMIT))
    counted = LIMIT * 55 // 100 + 1  # the older burst, weighted, and the hit that shifted the window
    assert allowed == LIMIT - counted


def test_each_subject_has_its_own_limit(client: redis.Redis, subject: str) -> None:
    limiter = RateLimiter(client, LIMIT)
    hits(limiter, subject, LIMIT + 1)
    assert limiter.hit(f"{subject}-other").allowed


def test_without_redis_or_without_a_limit_every_request_passes(client: redis.Redis, subject: str) -> None:
    assert all(hits(RateLimiter(None, 1), subject, 5))
    assert all(hits(RateLimiter(client, 0), subject, 5))  # 0: no limit (the setting's meaning)


def test_an_unreachable_redis_lets_requests_through_and_logs(subject: str) -> None:
    unreachable = redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5, socket_timeout=0.5)
    limiter = RateLimiter(unreachable, 1)
    with capture_logs() as logs:
        decisions = [limiter.hit(subject) for _ in range(3)]
    assert all(d.allowed for d in decisions)
    assert [log["event"] for log in logs] == ["rate_limit_redis_unavailable"] * 3

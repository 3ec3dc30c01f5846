"""Per-key request rate limits in Redis: a sliding window of a minute (the ``limits`` library's
sliding window counter), so a burst across the turn of a minute gets the limit, not twice it as
with a fixed window per clock minute. If Redis is unreachable the limiter lets requests through
(and logs): losing the cache must not stop payments."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import redis
import structlog
from limits import RateLimitItemPerMinute
from limits.storage import RedisStorage
from limits.strategies import SlidingWindowCounterRateLimiter

log = structlog.get_logger(__name__)
WINDOW_S = 60
KEY_PREFIX = "echotransact:ratelimit"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_s: int = 0  # for a refusal: when a request would be let through again


class RateLimiter:
    def __init__(self, client: redis.Redis | None, per_minute: int) -> None:
        self.client = client
        self.per_minute = per_minute
        self._limiter: SlidingWindowCounterRateLimiter | None = None
        if client is not None and per_minute > 0:
            # On the client's own connection pool (and so its timeouts): no second pool to Redis.
            # Nothing connects here; the counting is two keys and a Lua script per subject.
            storage = RedisStorage("redis://", connection_pool=client.connection_pool, key_prefix=KEY_PREFIX)
            self._limiter = SlidingWindowCounterRateLimiter(storage)
            self._item = RateLimitItemPerMinute(per_minute)

    @property
    def counts(self) -> bool:
        """Whether a request is counted (in Redis); without a limit nothing is."""
        return self._limiter is not None

    def hit(self, subject: str) -> Decision:
        """Count one request of ``subject`` (an API key id) if the limit allows it.

        A refused request is not counted, so a client that keeps calling while limited is let
        through again as soon as the window has room."""
        if self._limiter is None:
            return Decision(True)
        try:
            if self._limiter.hit(self._item, subject):
                return Decision(True)  # one round trip: the window is read only for a refusal
            reset_at, _remaining = self._limiter.get_window_stats(self._item, subject)
        except redis.RedisError as error:
            log.warning("rate_limit_redis_unavailable", error=str(error))
            return Decision(True)
        # When a request would be let through again; at least a second (Retry-After is whole
        # seconds, and 0 would invite an immediate retry), at most the window.
        return Decision(False, min(WINDOW_S, max(1, math.ceil(reset_at - time.time()))))

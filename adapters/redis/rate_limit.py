"""Per-key request rate limits in Redis: a fixed window per minute. If Redis is unreachable the
limiter lets requests through (and logs): losing the cache must not stop payments."""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis
import structlog

log = structlog.get_logger(__name__)
WINDOW_S = 60


@dataclass(frozen=True)
class Decision:
    allowed: bool
    remaining: int
    retry_after_s: int


class RateLimiter:
    def __init__(self, client: redis.Redis | None, per_minute: int) -> None:
        self.client = client
        self.per_minute = per_minute

    def hit(self, subject: str) -> Decision:
        if self.client is None or self.per_minute <= 0:
            return Decision(True, self.per_minute, 0)
        now = time.time()
        window = int(now // WINDOW_S)
        key = f"echotransact:ratelimit:{subject}:{window}"
        try:
            pipe = self.client.pipeline()
            pipe.incr(key)
            pipe.expire(key, WINDOW_S + 5)
            count = int(pipe.execute()[0])
        except redis.RedisError as error:
            log.warning("rate_limit_redis_unavailable", error=str(error))
            return Decision(True, self.per_minute, 0)
        retry_after = max(1, int((window + 1) * WINDOW_S - now + 0.999))
        return Decision(count <= self.per_minute, max(0, self.per_minute - count), retry_after)

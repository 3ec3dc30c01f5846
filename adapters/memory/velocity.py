"""The velocity counter in memory, for tests and examples: the semantics of the PostgreSQL one
(adapters/postgres/velocity.py) in one process, without pruning."""

from __future__ import annotations

import threading
from collections import defaultdict
from datetime import datetime, timedelta


class InMemoryVelocityCounter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (kind, key) -> attempt id -> the time it was first recorded.
        self._attempts: defaultdict[tuple[str, str], dict[str, datetime]] = defaultdict(dict)

    def record_and_count(
        self, attempt_id: str, at: datetime, window_seconds: int, keys: dict[str, str]
    ) -> dict[str, int]:
        assert at.tzinfo is not None, "attempt times are timezone-aware"
        window = timedelta(seconds=window_seconds)
        counts: dict[str, int] = {}
        with self._lock:
            for kind, key in sorted(keys.items()):
                attempts = self._attempts[(kind, key)]
                mine = attempts.setdefault(attempt_id, at)  # a retried attempt keeps its first time
                counts[kind] = sum(1 for t in attempts.values() if mine - window < t <= mine)
        return counts

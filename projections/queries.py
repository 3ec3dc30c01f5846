"""Status reads with read-your-writes, through the Redis cache and the read views.

A command's result carries the position of its last event. A reader that passes it as
``wait_for_position`` waits (bounded) until the status row has reached it, so a voice
integrator never reads a status older than its own last command.
"""

from __future__ import annotations

import time
from typing import Any
from uuid import UUID

from projections.status_cache import AsyncStatusReader, StatusCache
from projections.views import ReadViews, Scope

MAX_WAIT_S = 5.0


class StatusQueries:
    def __init__(self, views: ReadViews, cache: StatusCache | None = None,
                 loop_cache: AsyncStatusReader | None = None) -> None:
        self.views = views
        self.cache = cache
        self.loop_cache = loop_cache

    async def cached(self, kind: str, aggregate_id: UUID, *, scope: Scope,
                     wait_for_position: int | None = None) -> dict[str, Any] | None:
        """On the event loop, from the cache alone: the row when it is cached, visible to
        ``scope`` and at ``wait_for_position``; else None, and ``get`` (blocking) decides."""
        if self.loop_cache is None:
            return None
        row = self._visible(await self.loop_cache.get(kind, aggregate_id), scope)
        if row is None or (wait_for_position is not None and int(row["position"]) < wait_for_position):
            return None
        return row

    def _visible(self, row: dict[str, Any] | None, scope: Scope) -> dict[str, Any] | None:
        if row is None or scope.role == "admin":
            return row
        return row if scope.merchant_id is not None and str(row["merchant_id"]) == str(scope.merchant_id) else None

    def _load(self, kind: str, aggregate_id: UUID, scope: Scope) -> dict[str, Any] | None:
        return self.views.session(scope, aggregate_id) if kind == "session" else self.views.payment(scope, aggregate_id)

    def get(
        self, kind: str, aggregate_id: UUID, *, scope: Scope, wait_for_position: int | None = None,
        timeout_s: float = MAX_WAIT_S,
    ) -> tuple[dict[str, Any] | None, bool]:
        """(row or None, whether it has reached ``wait_for_position``). Another merchant's row is
        None, exactly like a missing one: the cache is filtered here, the database by its
        row-level security."""
        deadline = time.monotonic() + min(timeout_s, MAX_WAIT_S)
        delay = 0.01
        while True:
            row = self._visible(self.cache.get(kind, aggregate_id), scope) if self.cache else None
            if row is None or (wait_for_position is not None and int(row["position"]) < wait_for_position):
                row = self._load(kind, aggregate_id, scope)
            reached = wait_for_position is None or (row is not None and int(row["position"]) >= wait_for_position)
            if reached or time.monotonic() >= deadline:
                return row, reached
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

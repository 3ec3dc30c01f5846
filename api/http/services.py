"""What the HTTP layer needs, built once by the composition root and handed to the app."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis
from psycopg_pool import ConnectionPool

from adapters.postgres.idempotency import IdempotencyStore
from adapters.postgres.vault import CardVault
from adapters.redis.rate_limit import RateLimiter
from api.http.health import Dependencies
from api.settings import Settings
from application.checkout import Checkout
from application.ledger import Ledger
from projections.queries import StatusQueries
from projections.views import ReadViews


@dataclass
class ApiServices:
    settings: Settings
    ledger: Ledger
    views: ReadViews
    status: StatusQueries
    idempotency: IdempotencyStore
    rate_limiter: RateLimiter
    redis: redis.Redis | None
    health: Dependencies
    extra: dict[str, Any] | None = None
    vault: CardVault | None = None
    # The process's one PostgreSQL pool (api/bootstrap.py's open_database), closed last.
    pool: ConnectionPool[Any] | None = None

    @property
    def checkout(self) -> Checkout:
        """The payment page's use case, over this ledger and vault. Built on each use (it holds
        nothing of its own), so it always sees the vault as configured now."""
        return Checkout(self.ledger, self.vault)

    def close(self) -> None:
        if self.vault is not None:
            self.vault.close()
        self.views.close()
        self.ledger.close()
        if self.pool is not None:
            self.pool.close()

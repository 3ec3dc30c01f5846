"""Liveness and readiness: is the process up, and can it reach PostgreSQL, Redis and Kafka."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import psycopg
import redis.asyncio as aioredis
from confluent_kafka.admin import AdminClient
from litestar import Controller, Request, Response, get
from litestar.status_codes import HTTP_200_OK, HTTP_503_SERVICE_UNAVAILABLE

from api.http.problems import problem

CHECK_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Dependencies:
    database_url: str
    redis_url: str
    kafka_bootstrap_servers: str


async def check_postgres(deps: Dependencies) -> None:
    async with await psycopg.AsyncConnection.connect(deps.database_url, connect_timeout=2) as conn:
        await conn.execute("SELECT 1")


async def check_redis(deps: Dependencies) -> None:
    client = aioredis.Redis.from_url(deps.redis_url, socket_timeout=CHECK_TIMEOUT_S)
    try:
        await client.ping()
    finally:
        await client.aclose()


async def check_kafka(deps: Dependencies) -> None:
    def list_topics() -> None:
        admin = AdminClient({"bootstrap.servers": deps.kafka_bootstrap_servers, "log_level": 0})
        admin.list_topics(timeout=CHECK_TIMEOUT_S)

    await asyncio.to_thread(list_topics)


CHECKS: dict[str, Callable[[Dependencies], Awaitable[None]]] = {
    "postgres": check_postgres,
    "redis": check_redis,
    "kafka": check_kafka,
}


async def read_side_state(deps: Dependencies) -> dict[str, object]:
    """How far the relay and the projections are behind the ledger: reported, not judged (the
    API serves commands whatever they are)."""
    async with await psycopg.AsyncConnection.connect(deps.database_url, connect_timeout=2) as conn:
        cur = await conn.execute(
            # The oldest waiting row is the first queued: one probe of the outbox, whatever its size.
            "SELECT count(*), extract(epoch FROM now() - (SELECT created_at FROM outbox"
            " WHERE outbox_id = (SELECT min(outbox_id) FROM outbox_pending))) FROM outbox_pending"
        )
        unpublished, oldest_s = await cur.fetchone() or (0, None)
        cur = await conn.execute(
            "SELECT p.name, (SELECT coalesce(max(position), 0) FROM outbox)"
            " - coalesce((SELECT applied_position FROM projection_checkpoints c WHERE c.projection = p.name), 0)"
            " FROM (VALUES ('status'), ('analytics'), ('audit'), ('balances')) AS p(name)"
        )
        lag = {name: int(behind) for name, behind in await cur.fetchall()}
    return {
        "relay_backlog": {"unpublished": int(unpublished),
                          "oldest_unpublished_s": round(float(oldest_s), 1) if oldest_s is not None else None},
        "projection_lag_events": lag,
    }


async def _run(name: str, deps: Dependencies) -> dict[str, object]:
    started = time.perf_counter()
    try:
        await asyncio.wait_for(CHECKS[name](deps), CHECK_TIMEOUT_S + 1)
    except Exception as error:  # any failure means "not ready", with its reason
        return {"ok": False, "error": f"{type(error).__name__}: {error}"[:300]}
    return {"ok": True, "latency_ms": round((time.perf_counter() - started) * 1000, 1)}


class HealthController(Controller):
    path = "/health"
    tags = ["operations"]  # noqa: RUF012  (Litestar's layer attribute)

    @get("/live", operation_id="getLiveness", summary="The process is up")
    async def live(self) -> dict[str, str]:
        return {"status": "live"}

    @get("/ready", operation_id="getReadiness", summary="PostgreSQL, Redis and Kafka are reachable")
    async def ready(self, request: Request[Any, Any, Any], deps: Dependencies) -> Response[dict[str, Any]]:
        names = list(CHECKS)
        results = dict(zip(names, await asyncio.gather(*(_run(n, deps) for n in names)), strict=True))
        ok = all(r["ok"] for r in results.values())
        if ok:
            try:
                read_side = await asyncio.wait_for(read_side_state(deps), CHECK_TIMEOUT_S)
            except Exception as error:  # any failure, e.g. a database not yet migrated
                read_side = {"error": f"{type(error).__name__}: {error}"[:300]}
            return Response({"status": "ready", "checks": results, "read_side": read_side}, status_code=HTTP_200_OK)
        return problem(HTTP_503_SERVICE_UNAVAILABLE, "not_ready",
                       ", ".join(f"{n}: {r['error']}" for n, r in results.items() if not r["ok"]),
                       request, checks=results)

"""API latency: ``GET /v1/payment-sessions/{id}`` through the whole Litestar app against a
trivial Litestar endpoint returning the same JSON, both served by uvicorn the same way.

Ours runs what a voice integrator's status poll runs: request id and log line, API key check
(in-process cache), the per-key rate limit (a Redis round trip), then the status query: from the
Redis status cache ("cached", the hot path the worker keeps warm) or from PostgreSQL through the
row-level-security views ("database", a cache miss). The baseline has the same path shape and
response body, and nothing else. One keep-alive httpx client per side, one request at a time;
server and client share this process, alike for both sides.
"""

from __future__ import annotations

import dataclasses
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any
from uuid import UUID

import httpx
import uvicorn
from litestar import Litestar, get

from adapters.dev.servers import free_port
from api.bootstrap import build_api_services, envelope_opener, personal_data_reader
from api.http.app import asgi_app
from api.http.services import ApiServices
from bench.context import BenchContext
from bench.harness import Benchmark, Metric, Sample
from projections.engine import ProjectionStore
from projections.queries import StatusQueries
from projections.registry import all_projections

_START_TIMEOUT_S = 20.0


@contextmanager
def served(app: Any) -> Iterator[str]:
    """An ASGI app served by uvicorn on a free loopback port, in a thread, as the API tests do."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_config=None,
                                           access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, name="bench-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + _START_TIMEOUT_S
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(10)


def trivial_app(body: dict[str, Any]) -> Litestar:
    """The least Litestar can do for the same request: match the route, return the body."""

    @get("/v1/payment-sessions/{session_id:uuid}", sync_to_thread=False)
    def read(session_id: UUID) -> dict[str, Any]:
        return body

    return Litestar(route_handlers=[read])


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class ApiLatency(Benchmark):
    baseline = "trivial Litestar endpoint, same path and body, uvicorn, same client"

    def __init__(self, ctx: BenchContext, requests: int, sessions: int, *, cached: bool) -> None:
        self.ctx = ctx
        self.requests = requests
        self.session_count = sessions
        self.cached = cached
        where = "Redis status cache" if cached else "PostgreSQL read views (cache miss)"
        self.name = f"api.get_session.{'cached' if cached else 'database'}"
        self.ours = f"GET /v1/payment-sessions/{{id}}: auth, rate limit, status from the {where}"
        # A cached read adds about two Redis round trips and two thread hops to a ~1 ms request;
        # a database read adds a pooled PostgreSQL transaction with row-level security.
        p50, p99 = (3.0, 4.0) if cached else (5.0, 6.0)
        self.metrics = (
            Metric("p50_ms", "p50 ms", higher_is_better=False, target_ratio=p50,
                   target_why="the reads it adds cost no more than a few bare requests"),
            Metric("p99_ms", "p99 ms", higher_is_better=False, target_ratio=p99,
                   target_why="no long tail of its own beyond the median's cost"),
        )
        self._services: ApiServices | None = None
        self._stack = ExitStack()
        self._clients: dict[str, httpx.Client] = {}
        self._paths: list[str] = []

    def setup(self) -> None:
        ctx = self.ctx
        services = build_api_services(ctx.settings, ctx.database_url, ctx.servers.redis_url,
                                      ctx.servers.kafka_bootstrap_servers)
        if not self.cached:
            services = dataclasses.replace(services, status=StatusQueries(services.views, cache=None))
        self._services = services
        ledger = services.ledger
        tag = self.name
        merchant_id = ctx.register_merchant(ledger, f"{tag}:merchant")
        _, key = ledger.issue_api_key(ctx.command_id(tag, "key"), role="merchant", merchant_id=merchant_id)
        session_ids = ctx.seed_sessions(tag, self.session_count, ledger=ledger, merchant_id=merchant_id)
        store = ProjectionStore(ctx.database_url, list(all_projections(personal_data_reader(ctx.settings)).values()),
                                envelope_opener(ctx.settings))
        try:
            store.apply_batch(ctx.envelopes(session_ids))
            if self.cached:
                assert services.status.cache is not None
                services.status.cache.refresh(store.connection(), session_ids)
        finally:
            store.close()
        self._paths = [f"/v1/payment-sessions/{i}" for i in session_ids]

        ours_url = self._serve(asgi_app(services))
        self._clients["ours"] = httpx.Client(base_url=ours_url, timeout=30,
                                             headers={"Authorization": f"Bearer {key}"})
        first = self._clients["ours"].get(self._paths[0])
        if first.status_code != 200:
            raise RuntimeError(f"GET {self._paths[0]} answered {first.status_code}: {first.text[:300]}")
        baseline_url = self._serve(trivial_app(first.json()))
        self._clients["baseline"] = httpx.Client(base_url=baseline_url, timeout=30)

    def _serve(self, app: Any) -> str:
        return self._stack.enter_context(served(app))

    def _run(self, side: str) -> Sample:
        client = self._clients[side]
        latencies_ms: list[float] = []
        paths = self._paths
        started = time.perf_counter()
        for i in range(self.requests):
            sent = time.perf_counter()
            response = client.get(paths[i % len(paths)])
            latencies_ms.append((time.perf_counter() - sent) * 1000)
            if response.status_code != 200:
                raise RuntimeError(f"{side}: GET answered {response.status_code}: {response.text[:300]}")
        elapsed = time.perf_counter() - started
        return {"p50_ms": statistics.median(latencies_ms), "p99_ms": _percentile(latencies_ms, 0.99),
                "requests_per_s": self.requests / elapsed}

    def run_ours(self, round_no: int) -> Sample:
        return self._run("ours")

    def run_baseline(self, round_no: int) -> Sample:
        return self._run("baseline")

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients = {}
        self._stack.close()
        if self._services is not None:
            self._services.close()
            self._services = None

    def describe(self) -> dict[str, Any]:
        return {"requests_per_round": self.requests, "sessions": len(self._paths), "cached": self.cached}

"""Prometheus metrics: the API's ``/metrics`` (beside its routes, outside Litestar and its
OpenAPI), one ``/metrics`` port per background process, the HTTP and command counters, and
which scrape-time database gauges each process shows.

Counters and histograms live in the module that counts (adapters/kafka/relay.py,
adapters/notifications/webhooks.py, adapters/postgres/event_store.py, projections/worker.py, here)
in prometheus_client's default registry; gauges that need a query are computed when scraped, by
adapters/postgres/metrics.py, cached for a few seconds. Each process serves the default registry
together with its own collectors (``process_registry``), so tests and processes never share one.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import anyio
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from psycopg_pool import ConnectionPool

from adapters.postgres.metrics import DatabaseGauges, PoolCollector, connect_per_scrape
from api import tracing
from api.settings import Settings
from api.tracing import ASGIApp, Message, Receive, Scope, Send
from application.errors import ConcurrencyConflict
from application.ledger import Ledger
from application.unit_of_work import CommandResult
from domain.errors import DomainError

__all__ = ["COMMANDS", "HTTP_REQUESTS", "PROCESS_CHECKS", "InstrumentedLedger", "MetricsMiddleware",
           "observed", "process_registry", "serve_process_metrics"]

# No "_created" series beside every counter: they double the output and no dashboard reads them.
disable_created_metrics()

METRICS_PATH = "/metrics"
UNMATCHED = "unmatched"  # the route label of requests that matched no route (any path: never the path)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

HTTP_REQUESTS = Counter("echotransact_http_requests_total", "HTTP requests answered, by method, route template "
                        "and status", ["method", "route", "status"])
HTTP_DURATION = Histogram("echotransact_http_request_duration_seconds", "Time to answer an HTTP request, by method "
                          "and route template", ["method", "route"], buckets=_LATENCY_BUCKETS_S)
COMMANDS = Counter("echotransact_commands_total", "Ledger commands, by name and outcome (saved, replayed: an "
                   "idempotent repeat, rejected: a business rule said no, conflict: lost the race 8 times, error)",
                   ["command", "outcome"])
COMMAND_DURATION = Histogram("echotransact_command_duration_seconds", "Time a ledger command took (its decision "
                             "and save; a processor call inside it too), by name", ["command"],
                             buckets=_LATENCY_BUCKETS_S)

# Labelled children, found once: a dict lookup per request instead of labels()' lock and checks.
_http_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
_command_children: dict[tuple[str, str], tuple[Any, Any]] = {}


def _http_child(method: str, route: str, status: int) -> tuple[Any, Any]:
    key = (method, route, status)
    found = _http_children.get(key)
    if found is None:
        found = _http_children[key] = (HTTP_REQUESTS.labels(method, route, str(status)),
                                       HTTP_DURATION.labels(method, route))
    return found


def _command_child(command: str, outcome: str) -> tuple[Any, Any]:
    key = (command, outcome)
    found = _command_children.get(key)
    if found is None:
        found = _command_children[key] = (COMMANDS.labels(command, outcome), COMMAND_DURATION.labels(command))
    return found


class InstrumentedLedger(Ledger):
    """The ledger with one counter increment and one histogram observation per command, and,
    with tracing on, a span around it (the events it saves carry that span's context)."""

    # The library names an application after its class unless told (its tables, its variables).
    name = Ledger.name

    def _execute(self, command_id: str, command_name: str, *args: Any, **kwargs: Any) -> CommandResult:
        started = time.perf_counter()
        outcome = "error"
        try:
            with tracing.command_span(command_name) if tracing.enabled() else nullcontext():
                result: CommandResult = super()._execute(command_id, command_name, *args, **kwargs)
            outcome = "replayed" if result.replayed else "saved"
            return result
        except ConcurrencyConflict:
            outcome = "conflict"
            raise
        except DomainError:
            outcome = "rejected"
            raise
        finally:
            count, duration = _command_child(command_name, outcome)
            count.inc()
            duration.observe(time.perf_counter() - started)


class MetricsMiddleware:
    """Counts every HTTP request by route template (Litestar's ``path_template``, set once the
    route matched) and serves ``GET /metrics`` from ``registry`` before Litestar sees it."""

    def __init__(self, app: ASGIApp, registry: CollectorRegistry) -> None:
        self.app = app
        self.registry = registry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "GET")
        if scope.get("path") == METRICS_PATH and method in ("GET", "HEAD"):
            await self._serve(send, head=method == "HEAD")
            return
        started = time.perf_counter()
        status = [500]  # what the caller saw if the app raised before answering

        async def send_with_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = scope.get("path_template") or UNMATCHED
            count, duration = _http_child(method if method in _METHODS else "other", route, status[0])
            count.inc()
            duration.observe(time.perf_counter() - started)

    async def _serve(self, send: Send, *, head: bool) -> None:
        # Collectors may query (a pool's stats do not; a process's database gauges might): off the loop.
        body = await anyio.to_thread.run_sync(generate_latest, self.registry)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", CONTENT_TYPE_LATEST.encode()),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": b"" if head else body})


class _Union(Collector):
    """Several registries and collectors as one."""

    def __init__(self, sources: Iterable[Any]) -> None:
        self._sources = list(sources)

    def collect(self) -> Iterator[Any]:
        for source in self._sources:
            yield from source.collect()


def process_registry(*collectors: Collector) -> CollectorRegistry:
    """The default registry (every module's counters) with this process's own collectors."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Union([REGISTRY, *collectors]))
    return registry


def api_registry(pool: ConnectionPool[Any] | None) -> CollectorRegistry:
    return process_registry(*([PoolCollector(pool)] if pool is not None else []))


# The scrape-time database gauges each background process shows (adapters/postgres/metrics.py).
PROCESS_CHECKS: dict[str, tuple[str, ...]] = {
    "relay": ("outbox",), "worker": ("projections",), "dispatch": ("sms",), "webhooks": ("webhooks",),
}


def metrics_port(settings: Settings, process: str) -> int:
    return int(getattr(settings, f"{process}_metrics_port"))


def serve_process_metrics(settings: Settings, process: str, database_url: str, *,
                          projections: Iterable[str] = (), collectors: Iterable[Collector] = ()) -> Any:
    """Serve this background process's ``/metrics`` on its port (ECHOTRANSACT_<PROCESS>_METRICS_PORT,
    0: not at all), with its own ``collectors`` too; returns the server to ``shutdown()``, or None."""
    port = metrics_port(settings, process)
    if not port:
        return None
    gauges = DatabaseGauges(connect_per_scrape(database_url), PROCESS_CHECKS[process], projections=list(projections))
    server, _thread = start_http_server(port, addr=settings.metrics_host,
                                        registry=process_registry(gauges, *collectors))
    return server


@contextmanager
def observed(settings: Settings, process: str, database_url: str, *, projections: Iterable[str] = (),
             collectors: Iterable[Collector] = ()) -> Iterator[None]:
    """For as long as a background process runs: its traces (when OTEL_EXPORTER_OTLP_ENDPOINT is
    set, api/tracing.py) and its ``/metrics`` port (when set)."""
    tracing.configure_tracing(process, settings.otel_exporter_otlp_endpoint)
    server = serve_process_metrics(settings, process, database_url, projections=projections, collectors=collectors)
    try:
        yield
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()

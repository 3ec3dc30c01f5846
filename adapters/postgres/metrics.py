"""Gauges read from PostgreSQL when Prometheus scrapes, and the connection pool's use.

Each gauge is one cheap query (an index, a bounded count), made at most once per ``cache_s``
however often the endpoint is scraped; a failed query leaves its gauges out of that scrape
(``echotransact_metrics_query_errors_total`` counts it) rather than failing the others.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

import psycopg
import structlog
from prometheus_client import Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from psycopg_pool import ConnectionPool

__all__ = ["DatabaseGauges", "PoolCollector", "connect_per_scrape"]

_log = structlog.get_logger(__name__)

# Counted up to this many rows: a backlog of a million costs a bounded scan, and a gauge that
# reads "100000" already says what it needs to.
COUNT_CAP = 100_000

QUERY_ERRORS = Counter(
    "echotransact_metrics_query_errors_total", "Scrape-time database queries that failed, by check", ["check"])

Connect = Callable[[], AbstractContextManager[psycopg.Connection[Any]]]


def connect_per_scrape(database_url: str) -> Connect:
    """A connection for one scrape's queries (at most one per ``cache_s``), closed after it: a
    process holds no connection for its metrics between scrapes."""

    def connect() -> AbstractContextManager[psycopg.Connection[Any]]:
        return psycopg.connect(database_url, autocommit=True, connect_timeout=3,
                               application_name="echotransact-metrics")

    return connect


def _outbox(conn: psycopg.Connection[Any], _names: Sequence[str]) -> Iterator[Metric]:
    rows = conn.execute(
        "SELECT (SELECT count(*) FROM (SELECT 1 FROM outbox_pending LIMIT %s) c),"
        " (SELECT EXTRACT(EPOCH FROM now() - created_at)::float8 FROM outbox"
        "  WHERE outbox_id = (SELECT min(outbox_id) FROM outbox_pending))", (COUNT_CAP,),
    ).fetchone()
    assert rows is not None
    yield GaugeMetricFamily("echotransact_outbox_unpublished_rows",
                            f"Outbox rows not yet published to Kafka (counted up to {COUNT_CAP})", value=rows[0])
    yield GaugeMetricFamily("echotransact_outbox_oldest_unpublished_age_seconds",
                            "Age of the oldest unpublished outbox row (0: none)", value=max(0.0, rows[1] or 0.0))


def _sms(conn: psycopg.Connection[Any], _names: Sequence[str]) -> Iterator[Metric]:
    # Pending rows through the partial due index; failed ones (dead letters) are few and kept
    # for the retention window only.
    row = conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE attempts > 0),"
        " (SELECT count(*) FROM (SELECT 1 FROM outbox_messages WHERE state = 'failed' LIMIT %s) f)"
        " FROM (SELECT attempts FROM outbox_messages WHERE state = 'pending' LIMIT %s) p", (COUNT_CAP, COUNT_CAP),
    ).fetchone()
    assert row is not None
    queue = GaugeMetricFamily("echotransact_sms_queue_messages", "SMS by state: pending (to send, retrying "
                              "among them) and failed (dead letters, within retention)", labels=["state"])
    queue.add_metric(["pending"], row[0])
    queue.add_metric(["retrying"], row[1])
    queue.add_metric(["failed"], row[2])
    yield queue


def _webhooks(conn: psycopg.Connection[Any], _names: Sequence[str]) -> Iterator[Metric]:
    row = conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE attempts > 0),"
        " (SELECT count(*) FROM (SELECT 1 FROM webhook_deliveries WHERE status = 'dead' LIMIT %s) d)"
        " FROM (SELECT attempts FROM webhook_deliveries WHERE status = 'pending' LIMIT %s) p",
        (COUNT_CAP, COUNT_CAP),
    ).fetchone()
    assert row is not None
    queue = GaugeMetricFamily("echotransact_webhook_queue_deliveries", "Webhook and commerce-order deliveries "
                              "by state: pending (retrying among them) and dead (dead letters)", labels=["state"])
    queue.add_metric(["pending"], row[0])
    queue.add_metric(["retrying"], row[1])
    queue.add_metric(["dead"], row[2])
    yield queue


def _projections(conn: psycopg.Connection[Any], names: Sequence[str]) -> Iterator[Metric]:
    # The highest position each projection applied (kept on its checkpoint row), and how long
    # the first outbox event after it has waited.
    rows = conn.execute(
        "SELECT p.name, v.position, COALESCE(EXTRACT(EPOCH FROM now() - o.created_at)::float8, 0)"
        " FROM unnest(%s::text[]) AS p(name)"
        " CROSS JOIN LATERAL (SELECT COALESCE(max(applied_position), 0) AS position FROM projection_checkpoints"
        "  WHERE projection = p.name) v"
        " LEFT JOIN LATERAL (SELECT created_at FROM outbox WHERE position > v.position ORDER BY position LIMIT 1) o"
        "  ON TRUE", (list(names),),
    ).fetchall()
    position = GaugeMetricFamily("echotransact_projection_position",
                                 "Highest event position a projection has applied", labels=["projection"])
    lag = GaugeMetricFamily("echotransact_projection_lag_seconds", "How long the first event a projection "
                            "has not applied has waited (0: caught up)", labels=["projection"])
    for name, reached, waited in rows:
        position.add_metric([name], reached)
        lag.add_metric([name], max(0.0, waited))
    yield position
    yield lag


CHECKS: dict[str, Callable[[psycopg.Connection[Any], Sequence[str]], Iterator[Metric]]] = {
    "outbox": _outbox, "sms": _sms, "webhooks": _webhooks, "projections": _projections,
}


class DatabaseGauges(Collector):
    """The chosen checks (``CHECKS``' names) as a Prometheus collector, cached for ``cache_s``."""

    def __init__(self, connect: Connect, checks: Iterable[str], *, projections: Sequence[str] = (),
                 cache_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._connect = connect
        self._checks = list(checks)
        unknown = set(self._checks) - set(CHECKS)
        if unknown:
            raise ValueError(f"unknown checks {sorted(unknown)}; known: {sorted(CHECKS)}")
        self._projections = list(projections)
        self._cache_s = cache_s
        self._clock = clock
        self._lock = threading.Lock()  # one scrape queries at a time; the others read its result
        self._cached: list[Metric] = []
        self._cached_at: float | None = None

    def describe(self) -> list[Metric]:
        # Registration must not query the database (nothing connects at import or build time).
        return []

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            now = self._clock()
            if self._cached_at is None or now - self._cached_at >= self._cache_s:
                self._cached = self._query()
                self._cached_at = now
            metrics = list(self._cached)
        yield from metrics

    def _query(self) -> list[Metric]:
        metrics: list[Metric] = []
        try:
            with self._connect() as conn:
                for check in self._checks:
                    try:
                        metrics += CHECKS[check](conn, self._projections)
                    except psycopg.Error as error:
                        QUERY_ERRORS.labels(check).inc()
                        _log.warning("metrics_query_failed", check=check, error=str(error))
                        if conn.closed or conn.broken:
                            break
        except psycopg.Error as error:
            for check in self._checks:
                QUERY_ERRORS.labels(check).inc()
            _log.warning("metrics_connect_failed", error=str(error))
        return metrics


class PoolCollector(Collector):
    """The process pool's use (psycopg_pool ``get_stats``), read at scrape time: no cost between."""

    def __init__(self, pool: ConnectionPool[Any]) -> None:
        self._pool = pool

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        stats = self._pool.get_stats()
        connections = GaugeMetricFamily("echotransact_db_pool_connections",
                                        "The process pool's connections: open (size), idle (available), and its "
                                        "bounds (min, max)", labels=["state"])
        for state, key in (("open", "pool_size"), ("idle", "pool_available"), ("min", "pool_min"),
                           ("max", "pool_max")):
            connections.add_metric([state], stats.get(key, 0))
        yield connections
        yield GaugeMetricFamily("echotransact_db_pool_waiting_requests",
                                "Requests waiting for a pooled connection now", value=stats.get("requests_waiting", 0))
        # Totals since the pool opened, so counters (get_stats does not reset them).
        yield CounterMetricFamily("echotransact_db_pool_requests", "Connections asked of the pool",
                                  value=stats.get("requests_num", 0))
        yield CounterMetricFamily("echotransact_db_pool_queued_requests",
                                  "Requests that had to wait for a connection", value=stats.get("requests_queued", 0))
        yield CounterMetricFamily("echotransact_db_pool_wait_seconds", "Time requests waited for a connection",
                                  value=stats.get("requests_wait_ms", 0) / 1000)
        yield CounterMetricFamily("echotransact_db_pool_errors", "Failed requests and connection attempts",
                                  value=stats.get("requests_errors", 0) + stats.get("connections_errors", 0))

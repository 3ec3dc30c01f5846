"""Prometheus metrics on real PostgreSQL and Redis: the API's /metrics over HTTP, the scrape-time
database gauges, the circuit breakers, and a background process's own /metrics port."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapters.clock import ManualClock
from adapters.dev.sandbox_processor import SandboxProcessor
from adapters.dev.servers import ServerURLs, free_port
from adapters.postgres.metrics import DatabaseGauges, connect_per_scrape
from adapters.processors.circuit_breaker import CircuitBreaker
from adapters.processors.client import HttpProcessor
from api.bootstrap import envelope_opener, personal_data_reader
from api.metrics import process_registry, serve_process_metrics
from api.settings import Settings
from application.errors import IdempotencyKeyReused
from application.ledger import Ledger
from projections.engine import ProjectionStore
from projections.registry import all_projections
from tests.api.conftest import Api, make_api, session_body
from tests.application.flows import new_merchant, open_session

UUID_TEXT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32}")
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def api(settings: Settings, database_url: str, servers: ServerURLs, clock: ManualClock,
        processor: SandboxProcessor) -> Iterator[Api]:
    yield from make_api(settings, database_url, servers, clock, processor)


def scrape(api: Api) -> tuple[httpx.Response, Samples]:
    response = httpx.get(f"{api.url}/metrics", timeout=10)
    return response, samples(response.text)


def test_the_api_counts_requests_by_route_template_and_commands_by_outcome(api: Api) -> None:
    _, before = scrape(api)
    with api.client("a") as client:
        created = client.post("/v1/payment-sessions", json=session_body(), headers={"Idempotency-Key": "m-1"})
        assert created.status_code == 201, created.text
        assert client.get(f"/v1/payment-sessions/{created.json()['id']}").status_code == 200
        assert client.get(f"/v1/payment-sessions/{uuid.uuid4()}").status_code == 404
        assert client.get(f"/no/such/{uuid.uuid4()}").status_code == 404
    response, after = scrape(api)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("echotransact_http_requests_total", method="POST", route="/v1/payment-sessions", status="201") == 1
    get_route = next(dict(labels)["route"] for name, labels in after
                     if name == "echotransact_http_requests_total" and dict(labels)["method"] == "GET"
                     and dict(labels)["route"].startswith("/v1/payment-sessions/"))
    assert "{" in get_route  # the template, e.g. /v1/payment-sessions/{session_id:uuid}
    assert grew("echotransact_http_requests_total", method="GET", route=get_route, status="200") == 1
    assert grew("echotransact_http_requests_total", method="GET", route=get_route, status="404") == 1
    assert grew("echotransact_http_requests_total", method="GET", route="unmatched", status="404") == 1
    assert grew("echotransact_http_request_duration_seconds_count", method="POST", route="/v1/payment-sessions") == 1
    # No id, token or path in any label: the series stay bounded.
    assert not [labels for _, labels in after if any(UUID_TEXT.search(v) for _, v in labels)]
    commands = {dict(labels)["command"] for name, labels in after
                if name == "echotransact_commands_total" and dict(labels)["outcome"] == "saved"}
    assert commands, "the session's command is counted"
    assert grew("echotransact_event_store_append_seconds_count") >= 1
    # The pool the API borrows from, and /metrics itself stays out of the OpenAPI document.
    assert value(after, "echotransact_db_pool_connections", state="max") == 20
    assert value(after, "echotransact_db_pool_connections", state="open") >= 1
    assert "/metrics" not in httpx.get(f"{api.url}/schema/openapi.json").json()["paths"]


def test_commands_are_counted_by_outcome(ledger: Ledger) -> None:
    from api.metrics import COMMANDS

    def count(outcome: str) -> float:
        return COMMANDS.labels("register_merchant", outcome)._value.get()

    saved, replayed, rejected = count("saved"), count("replayed"), count("rejected")
    ledger.register_merchant("metrics-merchant", name="Metrics")
    ledger.register_merchant("metrics-merchant", name="Metrics")
    with pytest.raises(IdempotencyKeyReused):
        ledger.register_merchant("metrics-merchant", name="Another name")
    assert (count("saved") - saved, count("replayed") - replayed, count("rejected") - rejected) == (1, 1, 1)


class CountingConnect:
    def __init__(self, database_url: str) -> None:
        self.connect = connect_per_scrape(database_url)
        self.calls = 0

    def __call__(self) -> Any:
        self.calls += 1
        return self.connect()


def gauges_of(collector: DatabaseGauges) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for m in collector.collect() for s in m.samples}


def test_database_gauges_read_the_backlog_queues_and_lags_and_are_cached(
    ledger: Ledger, database_url: str, settings: Settings,
) -> None:
    merchant_id = new_merchant(ledger)
    for n in range(3):
        ledger.send_link(f"gauge-link-{n}", open_session(ledger, merchant_id, f"gauge-{n}"))  # an SMS each
    names = list(all_projections())
    connect = CountingConnect(database_url)
    clock = [0.0]
    collector = DatabaseGauges(connect, ["outbox", "sms", "webhooks", "projections"], projections=names,
                               cache_s=5, clock=lambda: clock[0])
    found = gauges_of(collector)
    with psycopg.connect(database_url) as conn:
        unpublished = conn.execute("SELECT count(*) FROM outbox_pending").fetchone()[0]
        pending_sms = conn.execute("SELECT count(*) FROM outbox_messages WHERE state = 'pending'").fetchone()[0]
        last = conn.execute("SELECT max(position) FROM outbox").fetchone()[0]
    assert unpublished > 0 and pending_sms == 3
    assert value(found, "echotransact_outbox_unpublished_rows") == unpublished
    assert value(found, "echotransact_outbox_oldest_unpublished_age_seconds") >= 0
    assert value(found, "echotransact_sms_queue_messages", state="pending") == 3
    assert value(found, "echotransact_webhook_queue_deliveries", state="dead") == 0
    assert value(found, "echotransact_projection_position", projection="status") == 0
    assert value(found, "echotransact_projection_lag_seconds", projection="status") > 0
    assert connect.calls == 1

    # Within the cache's time, a scrape reads the last result: no query.
    store = ProjectionStore(database_url, list(all_projections(personal_data_reader(settings)).values()),
                            envelope_opener(settings))
    try:
        store.catch_up(grace=timedelta(0))
    finally:
        store.close()
    assert gauges_of(collector) == found and connect.calls == 1
    clock[0] += 5
    caught_up = gauges_of(collector)
    assert connect.calls == 2
    for name in names:
        assert value(caught_up, "echotransact_projection_position", projection=name) == last, name
        assert value(caught_up, "echotransact_projection_lag_seconds", projection=name) == 0, name


def test_a_database_that_cannot_be_reached_leaves_its_gauges_out_not_the_scrape() -> None:
    collector = DatabaseGauges(connect_per_scrape(f"postgresql://nobody@127.0.0.1:{free_port()}/none"), ["outbox"])
    assert list(collector.collect()) == []


def test_each_processor_s_circuit_state_is_read_when_scraped() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=2, reset_timeout_s=30, clock=lambda: now[0], name="metrics-primary")
    processor = HttpProcessor("metrics-primary", "http://127.0.0.1:9", breaker=breaker)
    try:
        registry = process_registry()

        def state() -> dict[str, float]:
            found = samples(_text(registry))
            return {dict(labels)["state"]: v for (name, labels), v in found.items()
                    if name == "echotransact_processor_circuit_state"
                    and dict(labels)["processor"] == "metrics-primary"}

        assert state() == {"closed": 1, "open": 0, "half_open": 0}
        breaker.record_failure()
        breaker.record_failure()
        assert state() == {"closed": 0, "open": 1, "half_open": 0}
        now[0] += 30  # the cool-down passed: half-open without any call
        assert state() == {"closed": 0, "open": 0, "half_open": 1}
    finally:
        processor.close()


def _text(registry: Any) -> str:
    from prometheus_client import generate_latest

    return generate_latest(registry).decode()


def test_a_background_process_serves_its_own_metrics_on_its_port(database_url: str, settings: Settings) -> None:
    import adapters.kafka.relay  # the relay process has it loaded, with its counters

    assert serve_process_metrics(settings, "relay", database_url) is None  # 0: no port, no server
    port = free_port()
    server = serve_process_metrics(settings.replace(relay_metrics_port=port), "relay", database_url)
    try:
        found = samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)
    finally:
        server.shutdown()
        server.server_close()
    assert ("echotransact_outbox_unpublished_rows", ()) in found
    assert ("echotransact_relay_published_messages_total", ()) in found, adapters.kafka.relay.PUBLISHED
    assert not [name for name, _ in found if name.startswith("echotransact_projection_lag")]


def test_the_workers_consumer_lag_is_what_their_group_has_not_committed(servers: ServerURLs) -> None:
    from confluent_kafka import Consumer, Producer, TopicPartition

    from adapters.kafka.lag import NAME, ConsumerLag
    from adapters.kafka.topics import ensure_topics
    from application.envelope import event_topics
    from projections.worker import consumer_group

    prefix = f"lag-{uuid.uuid4().hex[:8]}"
    topics = ensure_topics(servers.kafka_bootstrap_servers, prefix)
    producer = Producer({"bootstrap.servers": servers.kafka_bootstrap_servers})
    for i in range(5):  # one produce request each (Tansu numbers a batch's records as one offset)
        producer.produce(topics[0], key=f"k{i}".encode(), value=b"v", partition=i % 2)
        assert producer.flush(15) == 0
    lag = ConsumerLag(servers.kafka_bootstrap_servers, consumer_group(prefix), event_topics(prefix), cache_s=0)
    others = dict.fromkeys(event_topics(prefix)[1:], 0)
    assert lag.lag() == {topics[0]: 5, **others}  # nothing committed yet

    # The group commits what it applied of partition 0 (3 of its messages).
    committer = Consumer({"bootstrap.servers": servers.kafka_bootstrap_servers, "group.id": consumer_group(prefix),
                          "enable.auto.commit": False})
    try:
        committer.commit(offsets=[TopicPartition(topics[0], 0, 3)], asynchronous=False)
    finally:
        committer.close()
    assert lag.lag()[topics[0]] == 2
    scraped = {s.labels["topic"]: s.value for family in lag.collect() for s in family.samples if s.name == NAME}
    assert scraped == {topics[0]: 2, **others}

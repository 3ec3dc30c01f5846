"""One payment session, one trace: the HTTP request, its command, the event's envelope, the relay's
Kafka message, the projection's apply and the webhook's delivery, on real PostgreSQL, Redis and
Kafka, with the SDK's in-memory exporter in place of OTLP."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import structlog
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from adapters.clock import ManualClock
from adapters.dev.sandbox_processor import SandboxProcessor
from adapters.dev.servers import ServerURLs
from adapters.kafka.relay import OutboxRelay
from adapters.notifications.webhooks import WebhookDispatcher, WebhookPlanner
from api import tracing
from api.bootstrap import envelope_opener, personal_data_reader
from api.settings import Settings
from application.envelope import decode, encode
from projections.engine import ProjectionStore
from projections.registry import all_projections
from projections.worker import _trace_applied
from tests.api.conftest import Api, make_api, session_body

EXPORTER = InMemorySpanExporter()
_PROVIDER = TracerProvider()
_PROVIDER.add_span_processor(SimpleSpanProcessor(EXPORTER))


@pytest.fixture
def traced() -> Iterator[InMemorySpanExporter]:
    tracing.install(_PROVIDER)
    EXPORTER.clear()
    try:
        yield EXPORTER
    finally:
        tracing.uninstall()


@pytest.fixture
def receiver() -> Iterator[str]:
    class Ok(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/callback"
    server.shutdown()
    server.server_close()


@pytest.fixture
def api(traced: InMemorySpanExporter, settings: Settings, database_url: str, servers: ServerURLs,
        clock: ManualClock, processor: SandboxProcessor) -> Iterator[Api]:
    yield from make_api(settings.replace(topic_prefix=f"trace{time.monotonic_ns()}"), database_url, servers, clock,
                        processor)


def test_one_session_is_one_connected_trace_across_the_outbox_and_kafka(
    api: Api, traced: InMemorySpanExporter, servers: ServerURLs, settings: Settings, database_url: str,
    receiver: str,
) -> None:
    opener = envelope_opener(settings)
    caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"  # the voice platform's own trace
    traced.clear()
    with api.client("a") as client:
        created = client.post("/v1/payment-sessions", json=session_body(callback_url=receiver),
                              headers={"Idempotency-Key": "trace-1", "traceparent": caller})
        assert created.status_code == 201, created.text
    session_id = created.json()["id"]

    # The outbox: each event's envelope keeps the command's context.
    store = ProjectionStore(database_url, list(all_projections(personal_data_reader(settings)).values()), opener)
    with store.connection().cursor() as cur:
        envelopes = [opener(bytes(row[0])) for row in cur.execute(
            "SELECT envelope FROM outbox WHERE message_key = %s ORDER BY position", (session_id,))]
    assert envelopes and all(e.trace_context for e in envelopes)

    # The relay: a publish span per message, whose context the message carries on.
    relay = OutboxRelay(database_url, servers.kafka_bootstrap_servers, open_envelope=opener,
                        topic_prefix=api.services.settings.topic_prefix)
    try:
        relay.ensure_topics()
        deadline = time.monotonic() + 30
        while relay.run_once() or time.monotonic() < deadline:
            with store.connection().cursor() as cur:
                if not cur.execute("SELECT count(*) FROM outbox_pending").fetchone()[0]:
                    break
    finally:
        relay.close()
    consumer = Consumer({"bootstrap.servers": servers.kafka_bootstrap_servers, "group.id": f"trace-{time.time_ns()}",
                         "auto.offset.reset": "earliest"})
    topic = f"{api.services.settings.topic_prefix}.payment_session.events"
    consumer.assign([TopicPartition(topic, partition, OFFSET_BEGINNING) for partition in range(8)])  # no group join
    messages: list[tuple[bytes, dict[str, Any]]] = []
    deadline = time.monotonic() + 30
    while len(messages) < len(envelopes) and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is not None and message.error() is None and message.key() == session_id.encode():
            messages.append((message.value() or b"", dict(message.headers() or [])))
    consumer.close()
    assert len(messages) == len(envelopes)
    consumed = [decode(value) for value, _ in messages]
    for (_, headers), envelope in zip(messages, consumed, strict=True):
        assert headers["traceparent"].decode() == envelope.trace_context

    # The projection applies what Kafka brought (the worker's path), then the webhook goes out.
    started = time.time_ns()
    store.apply_batch(consumed)
    _trace_applied(consumed, started)
    store.close()
    planner = WebhookPlanner(database_url, opener)
    dispatcher = WebhookDispatcher(database_url, settings.hash_key, allow_private_destinations=True,
                                   open_envelope=opener)
    try:
        planner.plan()
        outcomes = dispatcher.dispatch_due()
    finally:
        planner.close()
        dispatcher.close()
    assert [o.status for o in outcomes] == ["delivered"]

    # The setup's own commands (merchants, keys) are traces of their own; this session's is the caller's.
    trace_id = int(caller.split("-")[1], 16)
    spans = [s for s in traced.get_finished_spans() if s.context.trace_id == trace_id]
    by_id = {s.context.span_id: s for s in spans}

    def parent_of(span: ReadableSpan) -> ReadableSpan:
        assert span.parent is not None, span.name
        return by_id[span.parent.span_id]

    # Every span's parent is in the trace (or is the caller's span).
    assert all(s.parent is not None and (s.parent.span_id in by_id or s.name.startswith("POST")) for s in spans)
    (request,) = [s for s in spans if s.name == "POST /v1/payment-sessions"]
    assert request.parent is not None and request.parent.span_id == int(caller.split("-")[2], 16)
    commands = [s for s in spans if s.name.startswith("command ")]
    assert commands and all(parent_of(c) is request for c in commands)
    publishes = [s for s in spans if s.name.startswith("publish ")]
    projects = [s for s in spans if s.name.startswith("project ")]
    delivers = [s for s in spans if s.name.startswith("deliver ")]
    assert len(publishes) == len(projects) == len(envelopes) and len(delivers) == 1
    assert all(parent_of(p).name.startswith("command ") for p in publishes)
    assert all(parent_of(p).name.startswith("publish ") for p in projects)  # across the Kafka hop
    assert parent_of(delivers[0]).name.startswith("command ")
    assert {p.name for p in projects} == {f"project {e.event_type}" for e in envelopes}


def test_logs_carry_the_active_span_s_ids(traced: InMemorySpanExporter) -> None:
    with structlog.testing.capture_logs(processors=[tracing.add_trace_ids]) as logs:
        structlog.get_logger("t").info("outside")
        with tracing.tracer().start_as_current_span("inside") as span:
            structlog.get_logger("t").info("inside")
    context = span.get_span_context()
    assert "trace_id" not in logs[0]
    assert (logs[1]["trace_id"], logs[1]["span_id"]) == (f"{context.trace_id:032x}", f"{context.span_id:016x}")


def test_with_tracing_off_envelopes_carry_no_context_and_no_span_is_made(
    ledger: Any, database_url: str, settings: Settings,
) -> None:
    from tests.application.flows import new_merchant, open_session

    tracing.uninstall()
    EXPORTER.clear()
    open_session(ledger, new_merchant(ledger))
    store = ProjectionStore(database_url, [], envelope_opener(settings))
    try:
        with store.connection().cursor() as cur:
            payloads = cur.execute("SELECT envelope FROM outbox").fetchall()
    finally:
        store.close()
    opener = envelope_opener(settings)
    envelopes = [opener(bytes(p[0])) for p in payloads]
    assert envelopes and all(e.trace_context is None for e in envelopes)
    assert not [e for e in envelopes if b"trace_context" in encode(e)]  # the JSON is as before
    assert EXPORTER.get_finished_spans() == ()


def test_an_envelope_written_before_trace_context_existed_still_decodes() -> None:
    old = (b'{"event_id":"6f1d8a53-3c4e-4b8e-9d4a-2b3c5e7f9a10","aggregate_id":"6f1d8a53-3c4e-4b8e-9d4a-2b3c5e7f9a11",'
           b'"aggregate_type":"merchant","version":1,"position":3,"event_type":"merchant.registered",'
           b'"occurred_at":"2026-01-01T00:00:00Z","merchant_id":null,"data":{}}')
    assert decode(old).trace_context is None


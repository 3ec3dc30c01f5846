"""Webhooks and commerce orders on real PostgreSQL, against local fake receivers: signed and
masked events, receivers that are down for a while, the dead letter and redelivery, an order
that survives a dispatcher killed between its POST and its commit, re-planning, and two
dispatchers at once. Events come from the real Ledger; time moves on the tests' ManualClock.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import pytest

from adapters.clock import ManualClock
from adapters.dev.servers import free_port
from adapters.notifications.commerce import HttpCommerceBackend, MissingIdempotencyKey, decode_order
from adapters.notifications.webhooks import (
    PLATFORM_ID,
    WEBHOOK_RULES,
    Delivery,
    WebhookAdmin,
    WebhookDispatcher,
    WebhookPlanner,
    event_body,
    platform_webhook_secret,
    run_webhooks,
    sign,
    verify_signature,
    webhook_secret,
)
from api.bootstrap import ServerUrls, build_webhooks, envelope_opener
from api.settings import ConfigurationError, Settings
from application.envelope import EventEnvelope, encode, event_id_for
from application.ledger import Ledger
from tests.application.flows import PHONE, new_merchant, pay
from tests.projections.test_reconciliations import reconcile_day

REPO = Path(__file__).resolve().parents[2]

# -- fake receivers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.body)

    @property
    def event_id(self) -> str:
        return self.headers["echotransact-event-id"]


@dataclass
class Receiver:
    """An HTTP endpoint on loopback that records every POST. ``respond(n, request)`` gives the
    status of the n-th request (1-based); ``delay_s`` holds each request that long."""

    respond: Callable[[int, Received], int] = lambda n, r: 200
    delay_s: float = 0.0
    port: int = 0
    requests: list[Received] = field(default_factory=list)
    max_in_flight_per_key: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight: Counter[tuple[str, str]] = Counter()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                request = Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                status, reply = receiver.handle(request)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply)
                except OSError:
                    pass  # the client is gone (killed): what a real backend would see too

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str = "/hooks") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def handle(self, request: Received) -> tuple[int, bytes]:
        key = (request.headers.get("echotransact-event-id", ""), request.path)
        with self._lock:
            self.requests.append(request)
            number = len(self.requests)
            self._in_flight[key] += 1
            self.max_in_flight_per_key = max(self.max_in_flight_per_key, self._in_flight[key])
        try:
            time.sleep(self.delay_s)
            return self.respond(number, request), b"{}"
        finally:
            with self._lock:
                self._in_flight[key] -= 1

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class CommerceServer(Receiver):
    """A merchant's commerce backend: one order per Idempotency-Key, the same answer on a retry;
    a request without the key is refused. ``after_create`` runs once an order exists."""

    orders: dict[str, dict[str, Any]] = field(default_factory=dict)
    after_create: Callable[[], None] | None = None

    def handle(self, request: Received) -> tuple[int, bytes]:
        with self._lock:
            self.requests.append(request)
            key = request.headers.get("idempotency-key")
            if not key:
                return 400, b'{"error": "Idempotency-Key required"}'
            replay = key in self.orders
            if not replay:
                self.orders[key] = {"order_number": len(self.orders) + 1, **request.json}
            order = self.orders[key]
        if not replay and self.after_create is not None:
            self.after_create()
        return (200 if replay else 201), json.dumps(order).encode()


@pytest.fixture
def receivers() -> Iterator[Callable[..., Any]]:
    made: list[Receiver] = []

    def make(cls: type[Receiver] = Receiver, **kwargs: Any) -> Any:
        made.append(cls(**kwargs))
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()


# -- helpers -----------------------------------------------------------------------------------


def open_session(ledger: Ledger, merchant_id: UUID, command_id: str, callback_url: str | None,
                 amount_minor: int = 2_500) -> UUID:
    result = ledger.open_session(
        command_id, merchant_id=merchant_id, amount_minor=amount_minor, currency="USD", customer_phone=PHONE,
        order_reference=f"ORDER-{command_id}",
        line_items=[{"sku": "PZ-L", "name": "Large pizza", "quantity": 1, "unit_amount_minor": amount_minor}],
        voice_platform="alexa", conversation_id="conv-1", callback_url=callback_url,
    )
    return UUID(result.result["session_id"])


@pytest.fixture
def planner(database_url: str, settings: Settings, clock: ManualClock) -> Iterator[WebhookPlanner]:
    p = WebhookPlanner(database_url, envelope_opener(settings), clock=clock)
    yield p
    p.close()


@pytest.fixture
def dispatchers(
    database_url: str, settings: Settings, clock: ManualClock
) -> Iterator[Callable[..., WebhookDispatcher]]:
    made: list[WebhookDispatcher] = []

    def make(**kwargs: Any) -> WebhookDispatcher:
        kwargs.setdefault("clock", clock)
        kwargs.setdefault("jitter", 0.0)
        kwargs.setdefault("allow_private_destinations", True)  # the receivers here are on loopback
        made.append(WebhookDispatcher(database_url, settings.hash_key, **kwargs))
        return made[-1]

    yield make
    for d in made:
        d.close()


def rows(database_url: str, query: str, *params: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url) as conn:
        return conn.execute(query, params).fetchall()


# -- tests -------------------------------------------------------------------------------------


def test_signatures_verify_and_reject_tampering() -> None:
    secret = webhook_secret(b"k" * 32, "7b1f2a0e-0000-4000-8000-000000000001")
    assert secret != webhook_secret(b"k" * 32, "7b1f2a0e-0000-4000-8000-000000000002")
    body, now = b'{"id": "x"}', int(time.time())
    header = sign(secret, body, now)
    assert header.startswith(f"t={now},v1=")
    assert verify_signature(secret, header, body)
    assert not verify_signature(secret, header, body + b" ")
    assert not verify_signature("other", header, body)
    assert not verify_signature(secret, sign(secret, body, now - 301), body)
    assert not verify_signature(secret, None, body) and not verify_signature(secret, "garbage", body)
    # Two v1 values (a secret rotation): either may match.
    assert verify_signature(secret, f"t={now},v1={'0' * 64},v1={header.split('v1=')[1]}", body)


def test_backoff_doubles_up_to_the_cap_with_bounded_jitter(
    database_url: str, dispatchers: Callable[..., WebhookDispatcher]
) -> None:
    exact = dispatchers(backoff_base=timedelta(seconds=10), backoff_cap=timedelta(seconds=60))
    assert [exact.retry_delay(n).total_seconds() for n in range(1, 7)] == [10, 20, 40, 60, 60, 60]
    jittery = dispatchers(backoff_base=timedelta(seconds=10), backoff_cap=timedelta(seconds=60), jitter=0.2)
    assert all(8 <= jittery.retry_delay(1).total_seconds() <= 10 for _ in range(50))
    assert exact.retry_delay(10_000).total_seconds() == 60


def test_merchant_and_callback_receive_signed_masked_events_and_one_order(
    ledger: Ledger, settings: Settings, database_url: str, planner: WebhookPlanner,
    dispatchers: Callable[..., WebhookDispatcher], receivers: Callable[..., Any],
) -> None:
    merchant, callback, commerce = receivers(), receivers(), receivers(CommerceServer)
    m = new_merchant(ledger, "m-hooks", webhook_url=merchant.url("/hooks"),
                     commerce_backend_uri=commerce.url("/orders"))
    other = new_merchant(ledger, "m-other")  # no webhook URL: nothing is sent for it
    s1 = open_session(ledger, m, "s1", callback.url("/cb"))
    p1 = pay(ledger, s1, prefix="s1-")
    ledger.authorize_payment(p1)
    ledger.capture_payment("cap1", p1)
    ledger.refund_payment("ref1", p1, amount_minor=500)
    s2 = open_session(ledger, m, "s2", callback.url("/cb"))
    ledger.cancel_session("c2", s2)
    ledger.cancel_session("c3", open_session(ledger, other, "s3", None))

    planned = planner.plan()
    outcomes = dispatchers(on_order_delivered=lambda delivery, result: ledger.record_order_delivered(
        UUID(delivery.idempotency_key), result.status_code)).dispatch_due()
    # The session records that the merchant's backend took its order: evidence in a dispute.
    assert ledger.get_session(s1).order_delivered and not ledger.get_session(s2).order_delivered

    paid = ["payment_session.link_sent", "payment_session.code_verified", "payment.authorized",
            "payment_session.completed", "payment.captured", "payment.refunded"]
    expected = Counter([*paid, "payment_session.cancelled"])
    assert Counter(r.json["type"] for r in merchant.requests) == expected
    assert Counter(r.json["type"] for r in callback.requests) == expected
    assert planned.deliveries == len(outcomes) == 2 * len(paid) + 2 + 1
    assert {o.status for o in outcomes} == {"delivered"}

    secret = webhook_secret(settings.hash_key, m)
    for request in [*merchant.requests, *callback.requests]:
        event = request.json
        assert verify_signature(secret, request.headers["echotransact-signature"], request.body)
        assert not verify_signature(webhook_secret(settings.hash_key, other),
                                    request.headers["echotransact-signature"], request.body)
        assert request.event_id == event["id"]
        assert request.headers["content-type"] == "application/json"
        assert "idempotency-key" not in request.headers
        assert event["data"]["merchant_id"] == str(m)
        assert set(event) == {"id", "type", "created", "data"}
        assert PHONE not in request.body.decode()
        assert not {"link_token_hash", "code_hash", "card_token"} & set(event["data"])
        if event["type"].startswith("payment."):
            assert event["data"]["aggregate_id"] == str(p1) and event["data"]["session_id"] == str(s1)
    refunded = next(r.json for r in merchant.requests if r.json["type"] == "payment.refunded")
    assert refunded["data"]["amount_minor"] == 500
    # Events go to the URL given by the session (callback) and the merchant (webhook), each once.
    everything = merchant.requests + callback.requests
    assert len({(r.event_id, r.path) for r in everything}) == len(everything) == 2 * sum(expected.values())

    assert len(commerce.requests) == 1 and len(commerce.orders) == 1
    order_request = commerce.requests[0]
    assert order_request.headers["idempotency-key"] == str(s1)
    assert verify_signature(secret, order_request.headers["echotransact-signature"], order_request.body)
    completed = next(r for r in merchant.requests if r.json["type"] == "payment_session.completed")
    assert order_request.event_id == completed.event_id
    order = decode_order(order_request.body)
    assert (order.reference, order.amount_minor, order.currency, order.payment_id, order.session_id) == (
        "ORDER-s1", 2_500, "USD", p1, s1)
    assert order.items == [{"sku": "PZ-L", "name": "Large pizza", "quantity": 1, "unit_amount_minor": 2_500}]

    log = WebhookAdmin(database_url).attempts(endpoint=merchant.url("/hooks"))
    assert len(log) == sum(expected.values()) and {a["status_code"] for a in log} == {200}


def test_a_url_into_our_own_network_is_never_called_and_dead_at_once(
    ledger: Ledger, planner: WebhookPlanner, dispatchers: Callable[..., WebhookDispatcher],
    receivers: Callable[..., Any],
) -> None:
    """Without ECHOTRANSACT_ALLOW_PRIVATE_DESTINATIONS a merchant's URL on loopback (here: a live
    receiver) is refused before any request: server-side request forgery goes nowhere."""
    merchant, commerce = receivers(), receivers(CommerceServer)
    m = new_merchant(ledger, "m-ssrf", webhook_url=merchant.url("/hooks"), commerce_backend_uri=commerce.url("/o"))
    ledger.authorize_payment(pay(ledger, open_session(ledger, m, "s1", None), prefix="s1-"))
    planner.plan()
    outcomes = dispatchers(allow_private_destinations=False).dispatch_due()
    assert outcomes and {o.status for o in outcomes} == {"dead"}
    assert all((o.error or "").startswith("unsafe_destination: 127.0.0.1 resolves to 127.0.0.1") for o in outcomes)
    assert merchant.requests == [] and commerce.requests == []


def test_bodies_mask_the_phone_and_drop_secrets(
    ledger: Ledger, settings: Settings, database_url: str
) -> None:
    m = new_merchant(ledger, "m1")
    s = open_session(ledger, m, "s1", None)
    ledger.send_link("send", s)
    opener = envelope_opener(settings)
    envelopes = {
        e.event_type: e
        for e in (opener(bytes(p)) for (p,) in rows(database_url, "SELECT envelope FROM outbox"))
    }
    opened = json.loads(event_body(envelopes["payment_session.opened"]))
    # The customer by pseudonym; neither the phone nor its sealed copy leaves.
    assert opened["data"]["customer_id"] and "personal" not in opened["data"]
    assert "customer_phone" not in opened["data"] and PHONE not in json.dumps(opened)
    link_sent = json.loads(event_body(envelopes["payment_session.link_sent"]))
    assert not {"link_token_hash", "code_hash"} & set(link_sent["data"])


def test_planning_again_creates_no_duplicate_deliveries(
    ledger: Ledger, database_url: str, planner: WebhookPlanner, settings: Settings, clock: ManualClock,
    receivers: Callable[..., Any],
) -> None:
    hooks, commerce = receivers(), receivers(CommerceServer)
    m = new_merchant(ledger, "m1", webhook_url=hooks.url(), commerce_backend_uri=commerce.url("/orders"))
    s = open_session(ledger, m, "s1", hooks.url("/cb"))
    ledger.authorize_payment(pay(ledger, s))
    first = planner.plan()
    count = rows(database_url, "SELECT count(*) FROM webhook_deliveries")[0][0]
    assert first.deliveries == count == 2 * 4 + 1  # link_sent, code_verified, authorized, completed; order
    assert planner.checkpoint() == rows(database_url, "SELECT max(position) FROM outbox")[0][0]

    assert planner.plan().events == 0
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE webhook_checkpoint SET position = 0")
    # Two planners from zero at once: the checkpoint's row lock serializes them.
    others = [
        WebhookPlanner(database_url, envelope_opener(settings), clock=clock, batch_size=3) for _ in range(2)
    ]
    results: list[Any] = []
    threads = [threading.Thread(target=lambda p=p: results.append(p.plan())) for p in others]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in others:
        p.close()
    assert sum(r.deliveries for r in results) == 0 and sum(r.events for r in results) == first.events
    assert rows(database_url, "SELECT count(*) FROM webhook_deliveries")[0][0] == count


def test_a_batch_plans_what_event_by_event_planning_plans(
    ledger: Ledger, database_url: str, owner_database_url: str, settings: Settings, clock: ManualClock,
    receivers: Callable[..., Any],
) -> None:
    """The planner keeps what a batch's events need in memory and writes it after the batch; a
    merchant's new webhook URL, a session opened and paid and a payment refunded within one
    batch must come out as they do planned one event at a time."""
    hooks, moved, commerce = receivers(), receivers(), receivers(CommerceServer)
    m = new_merchant(ledger, "m1", webhook_url=hooks.url(), commerce_backend_uri=commerce.url("/orders"))
    s1 = open_session(ledger, m, "s1", hooks.url("/cb"))
    p1 = pay(ledger, s1, prefix="s1-")
    ledger.authorize_payment(p1)
    ledger.change_merchant_settings("move", m, webhook_url=moved.url("/new"))
    ledger.rotate_webhook_secret("rotate", m)
    ledger.capture_payment("cap1", p1)
    ledger.refund_payment("ref1", p1, amount_minor=300)
    s2 = open_session(ledger, m, "s2", None)
    ledger.authorize_payment(pay(ledger, s2, prefix="s2-", last4="1111"))
    ledger.cancel_session("c3", open_session(ledger, new_merchant(ledger, "m2"), "s3", moved.url("/cb3")))

    def planned_with(batch_size: int) -> tuple[list[Any], ...]:
        with psycopg.connect(owner_database_url, autocommit=True) as conn:
            for table in ("webhook_deliveries", "webhook_sessions", "webhook_payments", "webhook_merchants"):
                conn.execute(f"DELETE FROM {table}")
            conn.execute("UPDATE webhook_checkpoint SET position = 0, deliver_after = 0")
        planner = WebhookPlanner(database_url, envelope_opener(settings), clock=clock, batch_size=batch_size)
        try:
            planner.plan()
        finally:
            planner.close()
        return (
            rows(database_url, "SELECT event_id, event_type, position, merchant_id, kind, endpoint_url, body,"
                               " idempotency_key FROM webhook_deliveries ORDER BY position, kind, endpoint_url"),
            rows(database_url, "SELECT * FROM webhook_merchants ORDER BY merchant_id"),
            rows(database_url, "SELECT * FROM webhook_sessions ORDER BY session_id"),
            rows(database_url, "SELECT * FROM webhook_payments ORDER BY payment_id"),
        )

    one_by_one, batched = planned_with(1), planned_with(500)
    assert batched == one_by_one
    # A batch that ends with s2 opened: its payment starts and is authorized in the next one.
    s2_opened = rows(database_url, "SELECT position FROM outbox WHERE message_key = %s ORDER BY position",
                     str(s2))[0][0]
    assert planned_with(s2_opened) == one_by_one
    deliveries = batched[0]
    assert {d[5] for d in deliveries if d[1] == "payment.captured"} == {moved.url("/new"), hooks.url("/cb")}
    assert {d[5] for d in deliveries if d[1] == "payment.authorized" and d[0] != deliveries[0][0]} >= {
        hooks.url()}
    assert [d[4] for d in deliveries].count("commerce_order") == 2


def test_history_before_webhooks_existed_is_remembered_but_not_sent(
    ledger: Ledger, database_url: str, planner: WebhookPlanner, receivers: Callable[..., Any],
) -> None:
    hooks, commerce = receivers(), receivers(CommerceServer)
    m = new_merchant(ledger, "m1", webhook_url=hooks.url(), commerce_backend_uri=commerce.url("/orders"))
    s = open_session(ledger, m, "s1", None)
    p = pay(ledger, s)
    with psycopg.connect(database_url, autocommit=True) as conn:  # what 0007 does on a live database
        conn.execute("UPDATE webhook_checkpoint SET deliver_after = (SELECT max(position) FROM outbox)")
    ledger.authorize_payment(p)
    planner.plan()
    planned = rows(database_url, "SELECT event_type, kind FROM webhook_deliveries ORDER BY delivery_id")
    assert planned == [
        ("payment.authorized", "merchant_webhook"),
        ("payment_session.completed", "merchant_webhook"),
        ("payment_session.completed", "commerce_order"),
    ]


def test_a_receiver_that_is_down_for_a_while_gets_the_event_later(
    ledger: Ledger, database_url: str, clock: ManualClock, planner: WebhookPlanner,
    dispatchers: Callable[..., WebhookDispatcher], receivers: Callable[..., Any],
) -> None:
    closed_port = free_port()  # nothing listens here until the receiver starts below
    callback = receivers(respond=lambda n, r: 503 if n <= 2 else 200)
    m = new_merchant(ledger, "m1", webhook_url=f"http://127.0.0.1:{closed_port}/hooks")
    ledger.cancel_session("c1", open_session(ledger, m, "s1", callback.url("/cb")))
    planner.plan()
    dispatcher = dispatchers(backoff_base=timedelta(seconds=10), backoff_cap=timedelta(minutes=1))

    start = clock.now()
    first = dispatcher.dispatch_due()
    assert [(o.status, o.attempt) for o in first] == [("pending", 1)] * 2
    assert {o.next_attempt_at for o in first} == {start + timedelta(seconds=10)}
    assert dispatcher.dispatch_due() == []  # not due yet
    clock.advance(timedelta(seconds=10))
    assert [(o.status, o.attempt) for o in dispatcher.dispatch_due()] == [("pending", 2)] * 2
    clock.advance(timedelta(seconds=19))
    assert dispatcher.dispatch_due() == []  # the second pause is 20 s
    merchant = receivers(port=closed_port)
    clock.advance(timedelta(seconds=1))
    assert [(o.status, o.attempt) for o in dispatcher.dispatch_due()] == [("delivered", 3)] * 2

    assert len(merchant.requests) == 1 and len(callback.requests) == 3
    assert len({r.event_id for r in callback.requests + merchant.requests}) == 1
    admin = WebhookAdmin(database_url)
    merchant_log = sorted(admin.attempts(endpoint=merchant.url("/hooks")), key=lambda a: a["attempt"])
    assert [(a["status_code"], (a["error"] or "").split(":")[0]) for a in merchant_log] == [
        (None, "connect_error"), (None, "connect_error"), (200, "")]
    callback_log = sorted(admin.attempts(endpoint=callback.url("/cb")), key=lambda a: a["attempt"])
    assert [(a["status_code"], a["error"]) for a in callback_log] == [
        (503, "HTTP 503"), (503, "HTTP 503"), (200, None)]
    assert [a["attempted_at"] - start for a in callback_log] == [
        timedelta(0), timedelta(seconds=10), timedelta(seconds=30)]


def test_past_the_horizon_a_delivery_is_dead_until_an_operator_redelivers_it(
    ledger: Ledger, database_url: str, clock: ManualClock, planner: WebhookPlanner,
    dispatchers: Callable[..., WebhookDispatcher], receivers: Callable[..., Any],
) -> None:
    up = threading.Event()
    hooks = receivers(respond=lambda n, r: 200 if up.is_set() else 503)
    m = new_merchant(ledger, "m1", webhook_url=hooks.url())
    ledger.cancel_session("c1", open_session(ledger, m, "s1", None))
    planner.plan()
    dispatcher = dispatchers(backoff_base=timedelta(minutes=1), backoff_cap=timedelta(minutes=2),
                             retry_horizon=timedelta(minutes=10))
    statuses = []
    for _ in range(10):
        statuses += [o.status for o in dispatcher.dispatch_due()]
        clock.advance(timedelta(minutes=2))
    # Attempts at 0, 2, 4, 6, 8 and 10 min; the next would be past the horizon.
    assert statuses == ["pending"] * 5 + ["dead"]
    (delivery_id, status, attempts, dead_at), = rows(
        database_url, "SELECT delivery_id, status, attempts, dead_at FROM webhook_deliveries")
    assert (status, attempts) == ("dead", 6) and dead_at is not None
    clock.advance(timedelta(days=2))
    assert dispatcher.dispatch_due() == []

    up.set()
    admin = WebhookAdmin(database_url, clock=clock)
    assert admin.redeliver(endpoint="http://elsewhere.example/hooks") == 0
    assert admin.redeliver(endpoint=hooks.url()) == 1
    assert [o.status for o in dispatcher.dispatch_due()] == ["delivered"]
    assert admin.redeliver() == 0  # nothing is dead any more
    assert admin.redeliver([delivery_id]) == 1  # a named delivery is sent again even if delivered
    assert [(o.status, o.attempt) for o in dispatcher.dispatch_due()] == [("delivered", 1)]

    assert [r.headers["echotransact-event-id"] for r in hooks.requests] == [hooks.requests[0].event_id] * 8
    assert len(admin.attempts(delivery_id=delivery_id)) == 8
    assert admin.deliveries(endpoint=hooks.url())[0]["redeliveries"] == 2


def test_an_order_sent_twice_by_a_crashed_dispatcher_is_created_once(
    ledger: Ledger, database_url: str, settings: Settings, planner: WebhookPlanner,
    dispatchers: Callable[..., WebhookDispatcher], receivers: Callable[..., Any],
) -> None:
    victim: dict[str, subprocess.Popen[bytes]] = {}

    def kill_the_dispatcher() -> None:
        # The order exists; the dispatcher dies before it hears so, let alone commits.
        victim["dispatcher"].send_signal(signal.SIGKILL)
        victim["dispatcher"].wait(10)

    commerce = receivers(CommerceServer, after_create=kill_the_dispatcher)
    m = new_merchant(ledger, "m1", commerce_backend_uri=commerce.url("/orders"))
    s = open_session(ledger, m, "s1", None)
    ledger.authorize_payment(pay(ledger, s))
    planner.plan()
    script = textwrap.dedent("""
        import sys
        from adapters.notifications.webhooks import WebhookDispatcher
        WebhookDispatcher(sys.argv[1], bytes.fromhex(sys.argv[2]), allow_private_destinations=True).dispatch_due()
        sys.exit(3)  # only reached if the kill did not happen
    """)
    victim["dispatcher"] = subprocess.Popen(
        [sys.executable, "-c", script, database_url, settings.hash_key.hex()], cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert victim["dispatcher"].wait(30) == -signal.SIGKILL
    assert rows(database_url, "SELECT status, attempts FROM webhook_deliveries") == [("pending", 0)]

    # The killed session's row lock goes when PostgreSQL notices the closed socket.
    dispatcher, deadline = dispatchers(), time.monotonic() + 10
    outcomes: list[Any] = []
    while not outcomes and time.monotonic() < deadline:
        outcomes = dispatcher.dispatch_due()
        time.sleep(0.05)
    assert [(o.kind, o.status, o.status_code) for o in outcomes] == [("commerce_order", "delivered", 200)]

    # And the send step alone, twice more (a crash loop): still one order.
    claimed = rows(database_url,
                   "SELECT delivery_id, event_id, event_type, merchant_id, kind, endpoint_url, body,"
                   " idempotency_key, attempts, first_attempt_at FROM webhook_deliveries")[0]
    names = ("delivery_id", "event_id", "event_type", "merchant_id", "kind", "endpoint_url", "body",
             "idempotency_key", "attempts", "first_attempt_at")
    delivery = Delivery(**{**dict(zip(names, claimed, strict=True)), "body": bytes(claimed[6])})
    assert [dispatcher.send(delivery).status_code for _ in range(2)] == [200, 200]

    assert len(commerce.requests) == 4 and len(commerce.orders) == 1
    assert {r.headers.get("idempotency-key") for r in commerce.requests} == {str(s)}
    assert len({r.event_id for r in commerce.requests}) == 1
    assert commerce.orders[str(s)]["payment_id"] == str(decode_order(delivery.body).payment_id)


def test_an_order_is_never_sent_without_an_idempotency_key(
    database_url: str, receivers: Callable[..., Any],
) -> None:
    commerce = receivers(CommerceServer)
    backend = HttpCommerceBackend()
    with pytest.raises(MissingIdempotencyKey):
        backend.create_order(commerce.url("/orders"), b"{}", idempotency_key="")
    assert commerce.requests == []
    assert backend.create_order(commerce.url("/orders"), b'{"x": 1}', idempotency_key="k1").created
    backend.close()
    with psycopg.connect(database_url) as conn, pytest.raises(psycopg.errors.CheckViolation):
        conn.execute(
            "INSERT INTO webhook_deliveries (event_id, event_type, position, merchant_id, kind, endpoint_url,"
            " body, next_attempt_at, created_at) VALUES (gen_random_uuid(), 'payment_session.completed', 1,"
            " gen_random_uuid(), 'commerce_order', 'http://127.0.0.1:1/', '', now(), now())"
        )


def test_two_dispatchers_never_send_one_delivery_at_once(
    ledger: Ledger, database_url: str, planner: WebhookPlanner,
    dispatchers: Callable[..., WebhookDispatcher], receivers: Callable[..., Any],
) -> None:
    hooks = receivers(delay_s=0.08)
    m = new_merchant(ledger, "m1", webhook_url=hooks.url("/hooks"))
    for i in range(8):
        ledger.cancel_session(f"c{i}", open_session(ledger, m, f"s{i}", hooks.url("/cb")))
    assert planner.plan().deliveries == 16
    pair = [dispatchers(), dispatchers()]
    start = threading.Barrier(2)
    sent: dict[int, list[Any]] = {}

    def work(index: int) -> None:
        start.wait()
        sent[index] = pair[index].dispatch_due()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(sent[i] for i in range(2)), "both dispatchers took a share"
    delivered = [o.delivery_id for i in range(2) for o in sent[i]]
    assert sorted(delivered) == sorted(set(delivered)) and len(delivered) == 16
    assert len(hooks.requests) == 16 == len({(r.event_id, r.path) for r in hooks.requests})
    assert hooks.max_in_flight_per_key == 1
    by_status = rows(database_url, "SELECT status, count(*) FROM webhook_deliveries GROUP BY status")
    assert by_status == [("delivered", 16)]
    assert rows(database_url, "SELECT count(*) FROM webhook_attempts")[0][0] == 16


def test_the_long_running_loop_plans_sends_and_stops(
    ledger: Ledger, database_url: str, settings: Settings, receivers: Callable[..., Any],
) -> None:
    hooks, commerce = receivers(), receivers(CommerceServer)
    m = new_merchant(ledger, "m1", webhook_url=hooks.url(), commerce_backend_uri=commerce.url("/orders"))
    stop = threading.Event()
    loop = threading.Thread(
        target=run_webhooks, args=(database_url, envelope_opener(settings), settings.hash_key, stop),
        kwargs={"concurrency": 2, "poll_interval_s": 0.05, "allow_private_destinations": True},
    )
    loop.start()
    try:
        s = open_session(ledger, m, "s1", None)
        ledger.authorize_payment(pay(ledger, s))
        deadline = time.monotonic() + 10
        while (len(hooks.requests) < 4 or not commerce.orders) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        loop.join(10)
    assert not loop.is_alive()
    assert sorted(r.json["type"] for r in hooks.requests) == [
        "payment.authorized", "payment_session.code_verified", "payment_session.completed",
        "payment_session.link_sent"]
    assert list(commerce.orders) == [str(s)]


# -- by aggregate type: the platform's reconciliations, payouts, and types without a rule -----------


def append_synthetic(owner_database_url: str, ledger: Ledger, aggregate_type: str, event_type: str,
                     merchant_id: UUID | None, data: dict[str, Any]) -> EventEnvelope:
    """An event of an aggregate the ledger does not have (yet), written as a save writes one: its
    event row and an outbox row with its envelope, compressed and encrypted with the ledger's
    mapper. As the tables' owner: the application appends only through ledger_append."""
    aggregate_id = uuid.uuid4()
    mapper = ledger.mapper
    with psycopg.connect(owner_database_url, autocommit=True) as conn, conn.transaction():
        inserted = conn.execute(
            "INSERT INTO ledger_events (originator_id, originator_version, topic, state)"
            " VALUES (%s, 1, 'synthetic', ''::bytea) RETURNING notification_id", (aggregate_id,)).fetchone()
        assert inserted is not None
        (position,) = inserted
        envelope = EventEnvelope(
            event_id=event_id_for(aggregate_id, 1), aggregate_id=aggregate_id, aggregate_type=aggregate_type,
            version=1, position=position, event_type=event_type, occurred_at=datetime.now(UTC),
            merchant_id=merchant_id, data=data)
        payload = encode(envelope)
        if mapper.compressor:
            payload = mapper.compressor.compress(payload)
        if mapper.cipher:
            payload = mapper.cipher.encrypt(payload)
        conn.execute("INSERT INTO outbox (position, event_id, topic, message_key, envelope)"
                     " VALUES (%s, %s, %s, %s, %s)",
                     (position, envelope.event_id, f"synthetic.{aggregate_type}.events", str(aggregate_id), payload))
    return envelope


@pytest.fixture
def platform_planner(
    database_url: str, settings: Settings, clock: ManualClock, receivers: Callable[..., Any],
) -> Iterator[tuple[WebhookPlanner, Receiver]]:
    platform = receivers()
    p = WebhookPlanner(database_url, envelope_opener(settings), clock=clock,
                       platform_webhook_url=platform.url("/platform"))
    yield p, platform
    p.close()


def test_a_reconciliation_with_discrepancies_goes_to_the_platform_signed_with_its_secret(
    ledger: Ledger, settings: Settings, database_url: str, platform_planner: tuple[WebhookPlanner, Receiver],
    dispatchers: Callable[..., WebhookDispatcher], receivers: Callable[..., Any],
) -> None:
    planner, platform = platform_planner
    merchant = receivers()  # a merchant's URL gets none of the platform's events
    new_merchant(ledger, "m-platform", webhook_url=merchant.url())
    short = reconcile_day(ledger, mismatched=1, missing=1)
    reconcile_day(ledger, processor="secondary", matched=3, late=1)  # late is paid: no discrepancy

    assert planner.plan().deliveries == 1
    assert rows(database_url, "SELECT event_type, kind, merchant_id, endpoint_url FROM webhook_deliveries") == [
        ("reconciliation.reconciled", "platform_webhook", PLATFORM_ID, platform.url("/platform"))]
    assert [(o.kind, o.status) for o in dispatchers().dispatch_due()] == [("platform_webhook", "delivered")]

    (request,) = platform.requests
    assert merchant.requests == []
    secret = platform_webhook_secret(settings.hash_key)
    assert secret == webhook_secret(settings.hash_key, "00000000-0000-0000-0000-000000000000")
    assert verify_signature(secret, request.headers["echotransact-signature"], request.body)
    assert not verify_signature(webhook_secret(settings.hash_key, uuid.uuid4()),
                                request.headers["echotransact-signature"], request.body)
    assert request.headers["echotransact-event-type"] == "reconciliation.reconciled"
    event = request.json
    assert request.event_id == event["id"] == str(event_id_for(short, 1))
    assert set(event) == {"id", "type", "created", "data"}
    data = event["data"]
    assert (data["aggregate_id"], data["aggregate_type"], data["merchant_id"]) == (
        str(short), "reconciliation", None)
    assert set(data) == {"aggregate_id", "aggregate_type", "merchant_id", "processor", "day", "currency",
                         "findings", "deposits"}
    assert (data["processor"], data["currency"]) == ("primary", "USD")
    assert sorted(f["outcome"] for f in data["findings"]) == ["amount_mismatch", "matched", "matched",
                                                               "missing_from_report"]
    assert data["deposits"] and {"deposit_id", "total_minor"} == set(data["deposits"][0])


def test_a_reconciliation_without_discrepancies_is_not_sent(
    ledger: Ledger, platform_planner: tuple[WebhookPlanner, Receiver],
) -> None:
    planner, _ = platform_planner
    reconcile_day(ledger, matched=2, late=2)
    reconcile_day(ledger, processor="secondary", matched=0)  # a day with nothing at all
    result = planner.plan()
    assert (result.events, result.deliveries) == (2, 0)


def test_without_a_platform_url_nothing_is_planned_for_the_platform(
    ledger: Ledger, database_url: str, planner: WebhookPlanner,
) -> None:
    reconcile_day(ledger, unknown=1)
    result = planner.plan()
    assert (result.events, result.deliveries) == (1, 0)
    assert rows(database_url, "SELECT count(*) FROM webhook_deliveries") == [(0,)]


def test_a_merchants_payout_goes_to_its_webhook_url_alone(
    ledger: Ledger, settings: Settings, owner_database_url: str, database_url: str, planner: WebhookPlanner,
    dispatchers: Callable[..., WebhookDispatcher], receivers: Callable[..., Any],
) -> None:
    """The rule for aggregate types of a merchant (payouts are next): its webhook URL, no session
    callback, no order; only the rule's event types."""
    hooks = receivers()
    m = new_merchant(ledger, "m-payout", webhook_url=hooks.url())
    assert WEBHOOK_RULES["payout"].events == {"payout.paid", "payout.failed"}
    assert not WEBHOOK_RULES["payout"].session_callback and not WEBHOOK_RULES["payout"].to_platform
    paid = append_synthetic(owner_database_url, ledger, "payout", "payout.paid", m,
                            {"amount_minor": 12_000, "currency": "USD", "bank_reference": "b-1"})
    append_synthetic(owner_database_url, ledger, "payout", "payout.created", m, {"amount_minor": 12_000})

    assert planner.plan().deliveries == 1
    assert rows(database_url, "SELECT event_type, kind, merchant_id FROM webhook_deliveries") == [
        ("payout.paid", "merchant_webhook", m)]
    assert [o.status for o in dispatchers().dispatch_due()] == ["delivered"]
    (request,) = hooks.requests
    assert verify_signature(webhook_secret(settings.hash_key, m), request.headers["echotransact-signature"],
                            request.body)
    assert request.json == {
        "id": str(paid.event_id), "type": "payout.paid", "created": request.json["created"],
        "data": {"aggregate_id": str(paid.aggregate_id), "aggregate_type": "payout", "merchant_id": str(m),
                 "amount_minor": 12_000, "currency": "USD", "bank_reference": "b-1"},
    }


def test_an_event_of_an_aggregate_type_without_a_rule_plans_nothing_and_stops_nothing(
    ledger: Ledger, owner_database_url: str, database_url: str, planner: WebhookPlanner,
    receivers: Callable[..., Any],
) -> None:
    hooks = receivers()
    m = new_merchant(ledger, "m-unknown", webhook_url=hooks.url())
    # Without a merchant, and with the name of an event that is delivered for payments: once this
    # tripped an assertion and stopped the planner for good.
    append_synthetic(owner_database_url, ledger, "settlement_batch", "payment.captured", None, {"amount_minor": 1})
    append_synthetic(owner_database_url, ledger, "settlement_batch", "settlement_batch.closed", m, {})
    # A type with a merchant's rule whose event names no merchant: nobody to send it to.
    append_synthetic(owner_database_url, ledger, "payout", "payout.failed", None, {"reason": "closed_account"})
    ledger.cancel_session("c1", open_session(ledger, m, "s1", None))  # and what follows still goes

    result = planner.plan()
    assert result.events == 3 + 1 + 2  # the synthetic ones, the merchant, the session's two
    assert rows(database_url, "SELECT event_type, kind FROM webhook_deliveries") == [
        ("payment_session.cancelled", "merchant_webhook")]
    assert planner.checkpoint() == rows(database_url, "SELECT max(position) FROM outbox")[0][0]


def test_the_platform_url_is_a_setting_wired_into_the_webhooks_process(
    ledger: Ledger, settings: Settings, database_url: str, servers: Any, receivers: Callable[..., Any],
) -> None:
    key = base64.b64encode(settings.hash_key).decode()
    with pytest.raises(ConfigurationError, match=r"^ECHOTRANSACT_PLATFORM_WEBHOOK_URL: must be an http\(s\)://"):
        Settings.from_env({"ECHOTRANSACT_HASH_KEY": key, "ECHOTRANSACT_PLATFORM_WEBHOOK_URL": "ops.example/hooks"})
    assert Settings.from_env({"ECHOTRANSACT_HASH_KEY": key,
                              "ECHOTRANSACT_PLATFORM_WEBHOOK_URL": ""}).platform_webhook_url is None

    platform = receivers()
    configured = settings.replace(platform_webhook_url=platform.url("/platform"), allow_private_destinations=True,
                                  webhook_concurrency=1)
    run = build_webhooks(configured, ServerUrls(database_url, servers.redis_url, servers.kafka_bootstrap_servers))
    stop = threading.Event()
    loop = threading.Thread(target=run, args=(stop,))
    loop.start()
    try:
        reconciliation = reconcile_day(ledger, mismatched=1)
        deadline = time.monotonic() + 10
        while not platform.requests and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        loop.join(10)
    assert not loop.is_alive()
    assert [r.json["data"]["aggregate_id"] for r in platform.requests] == [str(reconciliation)]


# -- signing secret rotation (issue 13) ------------------------------------------------------------


def _signatures(header: str) -> list[str]:
    return [part.split("=", 1)[1] for part in header.split(",") if part.startswith("v1=")]


def test_version_1_of_a_secret_is_the_secret_merchants_had_before_rotation() -> None:
    from application.hashing import keyed_hash

    key, merchant = b"k" * 32, "7b1f2a0e-0000-4000-8000-000000000001"
    # The derivation of before rotation existed, written out: receivers configured with it keep verifying.
    assert webhook_secret(key, merchant) == webhook_secret(key, merchant, 1) == keyed_hash(key, "webhook-secret",
                                                                                             merchant)
    versions = {webhook_secret(key, merchant, v) for v in (1, 2, 3)}
    assert len(versions) == 3  # each version its own secret
    assert webhook_secret(key, merchant, 2) != webhook_secret(key, "7b1f2a0e-0000-4000-8000-000000000002", 2)
    with pytest.raises(ValueError):
        webhook_secret(key, merchant, 0)
    body, now = b'{"id": "x"}', int(time.time())
    both = sign([webhook_secret(key, merchant, 2), webhook_secret(key, merchant, 1)], body, now)
    assert len(_signatures(both)) == 2
    assert all(verify_signature(webhook_secret(key, merchant, v), both, body) for v in (1, 2))
    assert not verify_signature(webhook_secret(key, merchant, 3), both, body)


def test_a_rotation_signs_with_both_secrets_during_the_overlap_and_only_the_new_one_after(
    ledger: Ledger, settings: Settings, database_url: str, planner: WebhookPlanner, clock: ManualClock,
    dispatchers: Callable[..., WebhookDispatcher], receivers: Callable[..., Any],
) -> None:
    failing: set[str] = set()  # sessions whose deliveries the receiver refuses for now
    receiver = receivers(respond=lambda n, r: 500 if r.json["data"]["aggregate_id"] in failing else 200)
    m = new_merchant(ledger, "m-rotate", webhook_url=receiver.url("/hooks"))
    dispatcher = dispatchers()
    old, new = webhook_secret(settings.hash_key, m, 1), webhook_secret(settings.hash_key, m, 2)

    def sent(session: UUID) -> list[Received]:
        return [r for r in receiver.requests if r.json["data"]["aggregate_id"] == str(session)]

    def cancel_one(name: str) -> Received:
        """One more delivery (a cancelled session), planned and sent: its request."""
        session = open_session(ledger, m, name, None)
        ledger.cancel_session(f"c-{name}", session)
        planner.plan()
        dispatcher.dispatch_due()
        [request] = sent(session)
        return request

    def verifies(secret: str, request: Received) -> bool:
        return verify_signature(secret, request.headers["echotransact-signature"], request.body)

    stuck = open_session(ledger, m, "stuck", None)  # planned before the rotation, sent after it
    failing.add(str(stuck))
    ledger.cancel_session("c-stuck", stuck)
    before = cancel_one("before")
    assert len(_signatures(before.headers["echotransact-signature"])) == 1
    assert verifies(old, before) and not verifies(new, before)
    [refused] = sent(stuck)
    assert verifies(old, refused) and not verifies(new, refused)

    rotated = ledger.rotate_webhook_secret("rotate-1", m).result
    assert rotated["secret_version"] == 2
    assert datetime.fromisoformat(rotated["previous_secret_valid_until"]) == clock.now() + timedelta(hours=24)
    # The same command again is the same rotation (idempotent by command id), not a third version.
    assert ledger.rotate_webhook_secret("rotate-1", m).result == rotated
    assert ledger.get_merchant(m).webhook_secret_version == 2

    failing.clear()
    clock.advance(timedelta(minutes=1))  # the stuck delivery's retry is due
    during = cancel_one("during")
    header = during.headers["echotransact-signature"]
    assert verifies(new, during) and verifies(old, during)
    t = int(header.split(",")[0].removeprefix("t="))
    assert header == sign([new, old], during.body, t)  # two v1, the new secret's first
    retried = sent(stuck)[-1]  # signed at its attempt with what signs now, not when it was planned
    assert len(sent(stuck)) == 2 and verifies(new, retried) and verifies(old, retried)

    clock.advance(timedelta(hours=23, minutes=58))
    late = cancel_one("late")  # a minute before the overlap ends: still both
    assert len(_signatures(late.headers["echotransact-signature"])) == 2

    clock.advance(timedelta(minutes=2))  # the overlap is over
    after = cancel_one("after")
    assert len(_signatures(after.headers["echotransact-signature"])) == 1
    assert verifies(new, after) and not verifies(old, after)

    # The event says which version and until when; no secret reaches the outbox or the planner's memory.
    opened = envelope_opener(settings)
    [envelope] = [e for e in (opened(bytes(p)) for (p,) in rows(database_url, "SELECT envelope FROM outbox"))
                  if e.event_type == "merchant.webhook_secret_rotated"]
    assert set(envelope.data) == {"version", "previous_valid_until"} and envelope.data["version"] == 2
    [(version, until)] = rows(database_url, "SELECT secret_version, previous_secret_valid_until"
                                            " FROM webhook_merchants WHERE merchant_id = %s", m)
    assert (version, until) == (2, datetime.fromisoformat(rotated["previous_secret_valid_until"]))

"""The whole voice payment journey against `echotransact run` (API, relay, worker, SMS dispatcher
with the authorization resolver, webhook dispatcher, all as `run` supervises them) on the test
session's PostgreSQL, Redis and Kafka, driven only over HTTP as the voice platform, the customer
and the merchant would, under three faults of the outside world:

1. the processor times out: the customer is told the bank has not answered, the background
   resolver later asks the processor with the same idempotency key, the read side ends
   authorized and completed, and the processor saw exactly one authorization request;
2. the primary processor is down (connection refused): payments fail over to the secondary,
   the read side's timeline names it, and a payment sent to the primary before its circuit
   opened is charged nowhere; and the very first payment of the outage, sent to the primary
   while its circuit was still closed, is approved by the secondary at once (the refused
   connection proves the primary got nothing, so the ledger reroutes it with the same key);
3. the merchant's webhook receiver and commerce backend are down when the payment completes:
   with a fast backoff the signed webhooks arrive once they are back, and exactly one order
   is created even though an answer of the backend was lost and the order was sent again.

Fakes stand in only for the outside world: two sandbox processors (adapters/dev/processor_server.py,
real HTTP services started here so the test can stop one and read their counters) and the
merchant's receivers (tiny HTTP servers below). Every wait polls with a generous deadline.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil
import psycopg
import pytest

from adapters.dev.processor_server import SandboxProcessorServer
from adapters.dev.servers import ServerURLs, free_port
from tests.integration.test_webhooks import Received  # the same record of a received request

REPO = Path(__file__).resolve().parents[2]
HASH_KEY = b"j" * 32
TIMEOUT_CARD = "4000 0000 0000 0119"  # the sandbox records the approval but answers too late
SANDBOX_SPECIAL_LAST4 = {"0002", "0019", "0119", "0259"}  # declines, timeout, server error
EXPIRY = f"12/{(time.gmtime().tm_year + 3) % 100:02d}"
WAIT_S = 90.0
T = TypeVar("T")


# -- the running system ---------------------------------------------------------------------------


@dataclass
class RunningSystem:
    """`echotransact run` as a subprocess, with the keys it printed."""

    url: str
    env: dict[str, str]
    proc: subprocess.Popen[bytes]
    output: Path
    keys: dict[str, str]
    database_url: str

    def log(self) -> str:
        return self.output.read_text(errors="replace")

    def tail(self, lines: int = 60) -> str:
        """The log's last lines, without the API's access lines (one per poll)."""
        kept = [line for line in self.log().splitlines() if '"event": "request"' not in line]
        return "\n".join(kept[-lines:])

    def api(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)

    def cli(self, *args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "api.cli", *args], cwd=REPO, env=self.env,
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                child.kill()
            self.proc.kill()
            self.proc.wait(10)
            raise


@pytest.fixture(scope="module")
def processors() -> Iterator[tuple[SandboxProcessorServer, SandboxProcessorServer]]:
    """The outside world's processors: real HTTP services in this process, so a test can stop
    one and read what each was asked."""
    primary = SandboxProcessorServer("primary", timeout_card_delay_s=5.0)
    secondary = SandboxProcessorServer("secondary", timeout_card_delay_s=5.0)
    primary.start()
    secondary.start()
    yield primary, secondary
    primary.stop()
    secondary.stop()


@pytest.fixture(scope="module")
def system(servers: ServerURLs, module_database: str, module_owner_database: str,
           processors: tuple[SandboxProcessorServer, ...],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSystem]:
    """One `echotransact run` for the module (start-up costs a few seconds)."""
    primary, secondary = processors
    tmp = tmp_path_factory.mktemp("journey")
    tmp.chmod(0o777)
    env = {
        **os.environ,
        "DATABASE_URL": module_database,  # the application's role, as in production
        "MIGRATION_DATABASE_URL": module_owner_database,  # the start-up migration's
        "REDIS_URL": servers.redis_url,
        "KAFKA_BOOTSTRAP_SERVERS": servers.kafka_bootstrap_servers,
        "ECHOTRANSACT_HASH_KEY": base64.b64encode(HASH_KEY).decode(),
        "ECHOTRANSACT_MASTER_KEY": base64.b64encode(b"m" * 32).decode(),
        "ECHOTRANSACT_ENCRYPTION_KEY": base64.b64encode(b"k" * 32).decode(),
        "ECHOTRANSACT_VAULT_KEY": base64.b64encode(b"w" * 32).decode(),
        "ECHOTRANSACT_TOPIC_PREFIX": f"j{uuid.uuid4().hex[:10]}",
        "ECHOTRANSACT_PROCESSORS": f"primary={primary.url},secondary={secondary.url}",
        "ECHOTRANSACT_WEBHOOK_BACKOFF_BASE_S": "0.5",
        "ECHOTRANSACT_WEBHOOK_BACKOFF_CAP_S": "1",
        "ECHOTRANSACT_CATCH_UP_EVERY_S": "1",
        "ECHOTRANSACT_CATCH_UP_GRACE_S": "2",
        # The resolver asks about an unknown authorization after 10 s instead of 30: long after
        # the first read of a payment whose card POST timed out, so that read sees "processing"
        # even on a loaded machine (at 3 s it once had under 2 s of margin).
        "ECHOTRANSACT_RESOLVE_AFTER_S": "10",
        "ECHOTRANSACT_RESOLVE_EVERY_S": "1",
        "ECHOTRANSACT_DATA_DIR": str(tmp / "data"),
        "ECHOTRANSACT_PORT": "0",
        "ECHOTRANSACT_LOG_LEVEL": "info",
    }
    output = tmp / "run.log"
    with output.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "api.cli", "run"], cwd=REPO, env=env,
                                stdout=sink, stderr=subprocess.STDOUT)
    running = RunningSystem("", env, proc, output, {}, module_database)
    deadline = time.monotonic() + 60
    while not (served := re.search(r"serving on (http://\S+)", running.log())):
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                running.stop()
            pytest.fail(f"echotransact run never printed its URL:\n{running.tail()}")
        time.sleep(0.1)
    running.url = served.group(1)
    running.keys = dict(re.findall(r"^\s+(\w+)\s+key: (\S+)$", running.log(), re.MULTILINE))
    assert {"merchant", "admin"} <= set(running.keys), running.tail()
    yield running
    running.stop()
    print(running.tail())  # shown by pytest when a test failed


# -- helpers: waiting, the voice platform, the customer -----------------------------------------


def wait_for(what: str, probe: Callable[[], T | None], system: RunningSystem, timeout_s: float = WAIT_S) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` and the last value."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s:.0f} s (last seen: {last!r})\n{system.tail(40)}")
        time.sleep(0.3)


# Phones are handed out in sequence from a random start, so no two journeys of a test run share
# one (a shared phone would meet the velocity rules, and its mailbox would hold two links).
_PHONE_NUMBERS = itertools.count(random.randrange(2_000_000, 9_000_000))


def new_phone() -> str:
    return f"+1415{next(_PHONE_NUMBERS):07d}"


def link_sms(conn: psycopg.Connection[Any], phone: str, session_id: str) -> tuple[str, str] | None:
    """(link path, code) of the SMS that carries this session's link (its token starts with the
    session's id), from the development mailbox; None while it has not been sent."""
    row = conn.execute("SELECT body FROM dev_sms_inbox WHERE to_phone = %s AND body LIKE %s",
                       (phone, f"%/pay/{uuid.UUID(session_id).hex}%")).fetchone()
    found = re.search(r"(/pay/\S+) - your code is (\d{6})", row[0]) if row else None
    return (found.group(1), found.group(2)) if found else None


def new_visa() -> str:
    """A Luhn-valid Visa number of its own that the sandbox approves: a customer per payment, so
    velocity rules on one card or phone never enter into these tests."""
    while True:
        body = "424242" + f"{uuid.uuid4().int % 10**9:09d}"
        total = sum(d if i % 2 else sum(divmod(2 * d, 10))
                    for i, d in enumerate(int(c) for c in reversed(body)))
        number = body + str(-total % 10)
        if number[-4:] not in SANDBOX_SPECIAL_LAST4:
            return number


def open_session(api: httpx.Client, phone: str, amount: int = 2_500) -> dict[str, Any]:
    """What the voice platform does when the caller has ordered."""
    tag = uuid.uuid4().hex[:8]
    created = api.post("/v1/payment-sessions", headers={"Idempotency-Key": f"journey-{tag}"}, json={
        "amount": amount, "currency": "USD", "customer_phone": phone,
        "order": {"reference": f"J-{tag}", "items": [
            {"sku": "PZ-L", "name": "Large pizza", "quantity": 1, "unit_amount": amount}]},
        "voice": {"platform": "alexa", "conversation_id": f"call-{tag}"}})
    assert created.status_code == 201, created.text
    assert created.json()["status"] == "link_sent"
    return created.json()


def read_sms(system: RunningSystem, phone: str, session_id: str) -> tuple[str, str]:
    """(link path, code) from the development SMS mailbox, once the dispatcher has sent it."""
    def probe() -> tuple[str, str] | None:
        with psycopg.connect(system.database_url) as conn:
            return link_sms(conn, phone, session_id)

    return wait_for(f"the SMS to {phone}", probe, system)


def form_fields(html: str) -> dict[str, str]:
    fields = dict(re.findall(r'name="(csrf|form_id)" value="([^"]*)"', html))
    assert set(fields) == {"csrf", "form_id"}, "the page's form lacks its csrf and form_id fields"
    return fields


def customer_pays(system: RunningSystem, phone: str, session_id: str, card_number: str) -> httpx.Response:
    """Read the SMS, open the link, enter the code, then the card; the card post's response."""
    link, code = read_sms(system, phone, session_id)
    with httpx.Client(base_url=system.url, timeout=30, follow_redirects=False) as page:
        summary = page.get(link)
        assert summary.status_code == 200, summary.text
        verified = page.post(f"{link}/code", data={"code": code, **form_fields(summary.text)})
        assert verified.status_code == 303, verified.text
        card_step = page.get(link)
        assert 'name="card_number"' in card_step.text, card_step.text
        return page.post(f"{link}/card", data={"card_number": card_number, "expiry": EXPIRY, "cvv": "123",
                                               **form_fields(card_step.text)})


def read(api: httpx.Client, path: str) -> dict[str, Any] | None:
    response = api.get(path)
    return response.json() if response.status_code == 200 else None


def payment_of(system: RunningSystem, api: httpx.Client, session_id: str) -> str:
    """The session's payment id, from the read side."""
    return wait_for("the session's payment on the read side",
                    lambda: (read(api, f"/v1/payment-sessions/{session_id}") or {}).get("payment_id"), system)


def read_until(system: RunningSystem, api: httpx.Client, path: str, status: str) -> dict[str, Any]:
    row = wait_for(f"GET {path} showing {status}",
                   lambda: (r := read(api, path)) and r["status"] == status and r, system)
    return row


def sent_payment(system: RunningSystem, api: httpx.Client, payment_id: str) -> dict[str, Any]:
    """The payment on the read side once it shows more than its creation."""
    return wait_for(f"payment {payment_id} past initiated on the read side", lambda: (r := read(
        api, f"/v1/payments/{payment_id}")) and r["status"] != "initiated" and r, system)


def timeline(payment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["event_type"]: entry["data"] for entry in payment["timeline"]}


def authorizations(processors: tuple[SandboxProcessorServer, ...], key: str) -> tuple[int, int]:
    """(requests, money movements) with this idempotency key, at every processor together."""
    return sum(p.requests(key) for p in processors), sum(p.money_movements(key) for p in processors)


# -- 1. the processor times out ----------------------------------------------------------------------


def test_a_processor_timeout_is_settled_in_the_background_with_one_authorization(
    system: RunningSystem, processors: tuple[SandboxProcessorServer, SandboxProcessorServer],
) -> None:
    api, phone = system.api(system.keys["merchant"]), new_phone()
    session = open_session(api, phone)
    paid = customer_pays(system, phone, session["id"], TIMEOUT_CARD)
    # The processor's answer never came in time: the customer is told to wait, not to pay again.
    assert paid.status_code == 202 and "Please do not pay again" in paid.text
    payment_id = payment_of(system, api, session["id"])
    # The read side shows the unknown outcome first. (The customer does not reload the page:
    # that would settle it in the request; here only the background resolver may.)
    first = sent_payment(system, api, payment_id)
    assert first["status"] == "processing", first

    payment = read_until(system, api, f"/v1/payments/{payment_id}", "authorized")
    final = read_until(system, api, f"/v1/payment-sessions/{session['id']}", "completed")
    assert final["payment_id"] == payment_id and payment["authorized_amount"] == 2_500
    resolved = [json.loads(line) for line in system.log().splitlines()
                if '"authorization_resolved"' in line and payment_id in line]
    assert resolved and resolved[0]["status"] == "authorized", "the dispatch process's resolver did not settle it"

    key = f"authorize:{payment_id}"
    assert authorizations(processors, key) == (1, 1), "the processor was asked to authorize more than once"
    with httpx.Client(base_url=processors[0].url if processors[0].requests(key) else processors[1].url) as p:
        at_processor = p.get(f"/v1/operations/{key}").json()
    events = timeline(payment)
    assert events["payment.authorized"]["processor_reference"] == at_processor["reference"]
    assert events["payment.authorized"]["processor"] == events["payment.processing_started"]["processor"]


# -- 2. the primary processor is down ------------------------------------------------------------------


class LeftWaiting(AssertionError):
    """The customer got "we are confirming your payment" instead of the result."""


def test_the_first_payment_with_the_primary_down_is_approved_by_the_secondary(
    system: RunningSystem, processors: tuple[SandboxProcessorServer, SandboxProcessorServer],
) -> None:
    """The brief's journey: the primary is down before anyone pays (its circuit is still closed)."""
    primary, secondary = processors
    api, phone = system.api(system.keys["merchant"]), new_phone()
    session = open_session(api, phone)
    primary.stop()  # connection refused from now on
    try:
        paid = customer_pays(system, phone, session["id"], new_visa())
    finally:
        primary.start()  # same port, same records
    if paid.status_code != 303:
        raise LeftWaiting(f"the card post answered {paid.status_code}, not the result (303)")
    final = read_until(system, api, f"/v1/payment-sessions/{session['id']}", "completed")
    payment = read_until(system, api, f"/v1/payments/{final['payment_id']}", "authorized")
    assert timeline(payment)["payment.authorized"]["processor"] == "secondary"
    assert (secondary.requests(f"authorize:{payment['id']}"), primary.requests(f"authorize:{payment['id']}")) == (1, 0)


def test_with_the_primary_down_payments_fail_over_to_the_secondary_and_none_is_charged_twice(
    system: RunningSystem, processors: tuple[SandboxProcessorServer, SandboxProcessorServer],
) -> None:
    """Customers keep paying while the primary refuses connections. Until its circuit opens a
    payment is first sent to the primary and rerouted (the timeline shows both); after that,
    payments go to the secondary directly. Every one is approved by the secondary at once, and
    the primary never received any of them."""
    primary, secondary = processors
    api = system.api(system.keys["merchant"])
    primary.stop()  # connection refused from now on
    payments: list[dict[str, Any]] = []
    try:
        for _ in range(4):
            phone = new_phone()
            session = open_session(api, phone)
            paid = customer_pays(system, phone, session["id"], new_visa())
            assert paid.status_code == 303, f"the customer was not shown the result: {paid.status_code}"
            final = read_until(system, api, f"/v1/payment-sessions/{session['id']}", "completed")
            payments.append(read_until(system, api, f"/v1/payments/{final['payment_id']}", "authorized"))
    finally:
        primary.start()  # same port, same records

    chosen = []
    for payment in payments:
        events = timeline(payment)
        assert events["payment.authorized"]["processor"] == "secondary"
        chosen.append(events["payment.processing_started"]["processor"])
        if chosen[-1] == "primary":
            assert events["payment.processing_rerouted"] == {"processor": "secondary", "previous": "primary"}
        else:
            assert "payment.processing_rerouted" not in events
        key = f"authorize:{payment['id']}"
        assert (secondary.requests(key), secondary.money_movements(key)) == (1, 1)
        assert (primary.requests(key), primary.money_movements(key)) == (0, 0)
    # The primary's circuit opens after a few refused connections: later payments skip it (one
    # at least: the circuit half-opens again after 30 s, which a slow machine may reach).
    assert "secondary" in chosen[1:], chosen


# -- 3. the merchant's receivers are down ------------------------------------------------------------


@dataclass
class MerchantEndpoint:
    """The merchant's side on one loopback port: closed until ``start``; then it records every
    POST and answers ``answer(request)`` (an HTTP status)."""

    port: int
    answer: Callable[[Received], int]
    requests: list[Received] = field(default_factory=list)
    answered: list[tuple[Received, int]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                request = Received(self.path, {k.lower(): v for k, v in self.headers.items()},
                                   self.rfile.read(int(self.headers.get("Content-Length", 0))))
                endpoint.requests.append(request)
                status = endpoint.answer(request)
                endpoint.answered.append((request, status))
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


class Shop:
    """A commerce backend: one order per Idempotency-Key. Its first answer is lost (a 500 after
    the order was made), as after a crash between its commit and its reply."""

    def __init__(self) -> None:
        self.orders: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()

    def __call__(self, request: Received) -> int:
        key = request.headers.get("idempotency-key")
        if not key:
            return 400
        with self.lock:
            if key in self.orders:
                return 200  # a duplicate: the order it already made
            self.orders[key] = request.json
            return 500 if len(self.orders) == 1 else 201


def signed(secret: str, request: Received) -> bool:
    """The check a merchant makes, from the documented format: t=<unix>,v1=HMAC-SHA256(secret,
    "<t>.<body>"), with t within five minutes."""
    parts = dict(part.split("=", 1) for part in request.headers.get("echotransact-signature", "").split(","))
    if not parts.get("t", "").isdigit() or abs(time.time() - int(parts["t"])) > 300:
        return False
    mac = hmac.new(secret.encode(), parts["t"].encode() + b"." + request.body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(mac, parts.get("v1", ""))


def failed_attempts(system: RunningSystem, merchant_id: str) -> dict[str, int]:
    """Failed delivery attempts per kind, from the delivery log."""
    with psycopg.connect(system.database_url) as conn:
        rows = conn.execute(
            "SELECT d.kind, count(*) FROM webhook_attempts a JOIN webhook_deliveries d USING (delivery_id)"
            " WHERE d.merchant_id = %s AND (a.status_code IS NULL OR a.status_code >= 300) GROUP BY d.kind",
            (merchant_id,)).fetchall()
    return dict(rows)


def undelivered(system: RunningSystem, merchant_id: str) -> int:
    with psycopg.connect(system.database_url) as conn:
        row = conn.execute("SELECT count(*) FROM webhook_deliveries WHERE merchant_id = %s"
                           " AND status <> 'delivered'", (merchant_id,)).fetchone()
    assert row is not None
    return int(row[0])


def test_webhooks_and_one_order_arrive_after_the_receivers_come_back(system: RunningSystem) -> None:
    down = threading.Event()
    down.set()
    hooks = MerchantEndpoint(free_port(), lambda request: 503 if down.is_set() else 200)
    shop = Shop()
    backend = MerchantEndpoint(free_port(), shop)  # not started: connection refused
    hooks.start()  # up, but answering 503
    try:
        admin = system.api(system.keys["admin"])
        merchant = admin.post("/v1/merchants", headers={"Idempotency-Key": f"m-{uuid.uuid4().hex}"}, json={
            "name": "Journey Pizza", "webhook_url": hooks.url("/hooks"),
            "commerce_backend_uri": backend.url("/orders")})
        assert merchant.status_code == 201, merchant.text
        merchant_id = merchant.json()["id"]
        issued = admin.post(f"/v1/merchants/{merchant_id}/keys",
                            headers={"Idempotency-Key": f"k-{uuid.uuid4().hex}"}, json={"role": "merchant"})
        assert issued.status_code == 201, issued.text
        api, phone = system.api(issued.json()["api_key"]), new_phone()
        session = open_session(api, phone)
        assert customer_pays(system, phone, session["id"], new_visa()).status_code == 303
        completed = read_until(system, api, f"/v1/payment-sessions/{session['id']}", "completed")

        # Both receivers were really tried while down, and refused (503, connection refused).
        wait_for("failed attempts at both receivers", lambda: (f := failed_attempts(system, merchant_id))
                 and f.get("merchant_webhook") and f.get("commerce_order") and f, system)
        backend.start()
        down.clear()

        def arrived() -> bool:
            accepted = {request.json["type"] for request, status in hooks.answered if status == 200}
            ordered = any(200 <= status < 300 for _, status in backend.answered)
            return {"payment.authorized", "payment_session.completed"} <= accepted and ordered

        wait_for("the webhooks and the order after the receivers came back", arrived, system)
        wait_for("every delivery delivered", lambda: undelivered(system, merchant_id) == 0, system)
    finally:
        hooks.close()
        backend.close()

    secret = system.cli("webhooks", "secret", "--merchant", merchant_id).strip()
    assert all(signed(secret, r) for r in hooks.requests + backend.requests), "a request was not validly signed"
    assert not signed("another secret", hooks.requests[0])
    # Exactly one order, though the backend was asked at least twice (its first answer was lost):
    # every request carried the session's id as its Idempotency-Key, and the repeat was dropped.
    orders = backend.requests
    assert [r.headers.get("idempotency-key") for r in orders] == [session["id"]] * len(orders)
    assert len(shop.orders) == 1 and len(orders) >= 2
    assert [status for _, status in backend.answered][:2] == [500, 200]
    order = shop.orders[session["id"]]
    assert (order["session_id"], order["payment_id"], order["amount_minor"]) == (
        session["id"], completed["payment_id"], 2_500)
    # The merchant accepted each event once (retries carry the same event id), all of this session.
    accepted = [r.headers["echotransact-event-id"] for r, status in hooks.answered if status == 200]
    assert len(accepted) == len(set(accepted)), "an event was sent again after it was accepted"
    received = {r.headers["echotransact-event-id"]: r.json for r in hooks.requests}
    assert set(accepted) == set(received)
    assert {e["type"] for e in received.values()} >= {
        "payment_session.link_sent", "payment_session.code_verified", "payment.authorized",
        "payment_session.completed"}
    assert all(session["id"] in (e["data"]["aggregate_id"], e["data"].get("session_id"))
               for e in received.values())

"""Processors' signed notifications over real HTTP: ``POST /v1/processor-events/{processor}`` on the
served API (real PostgreSQL and Redis), fed by the sandbox processor (a real HTTP service) whose
notifier signs, sends and retries them. Refusals give one answer whatever the reason; a dispute
opened at the sandbox on a captured payment reaches the ledger once, however often and in
whatever order it is delivered."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import httpx
import pytest

from adapters.clock import ManualClock
from adapters.dev.processor_server import NOTIFY_ATTEMPTS, SandboxProcessorServer
from adapters.dev.servers import ServerURLs, free_port
from adapters.processors.client import HttpProcessor
from adapters.processors.notifications import SIGNATURE_HEADER, event_body, signature_header
from api.bootstrap import build_api_services
from api.http.app import asgi_app
from api.http.services import ApiServices
from api.settings import Settings
from application.disputes import DISPUTE_OPENED, DISPUTE_WON, ProcessorEvent
from domain.dispute import DisputeStatus, dispute_id
from tests.api.conftest import serve
from tests.application.flows import new_merchant, open_session, pay
from tests.projections.test_views import catch_up

PROBLEM_JSON = "application/problem+json"
SECRET, OLD_SECRET = "whsec_primary_current", "whsec_primary_previous"


@dataclass
class Served:
    url: str
    services: ApiServices
    sandbox: SandboxProcessorServer
    database_url: str
    settings: Settings

    def post(self, body: bytes, *, processor: str = "primary", header: str | None = None,
             sign_with: str = SECRET, now: float | None = None, **headers: str) -> httpx.Response:
        signature = header if header is not None else signature_header(sign_with, body, now=now)
        return httpx.post(f"{self.url}/v1/processor-events/{processor}", content=body, timeout=30, headers={
            "Content-Type": "application/json", SIGNATURE_HEADER: signature, **headers})

    def captured_payment(self, tag: str) -> tuple[UUID, str]:
        """A payment authorized and captured at the sandbox, projected (so its reference is
        known to the read side); (payment id, the sandbox's capture reference)."""
        ledger = self.services.ledger
        merchant = new_merchant(ledger, f"merchant-{tag}")
        payment = pay(ledger, open_session(ledger, merchant, command_id=f"open-{tag}"), prefix=f"{tag}-")
        ledger.authorize_payment(payment)
        ledger.capture_payment(f"capture-{tag}", payment)
        catch_up(self.database_url, self.settings)
        reference = ledger.get_payment(payment).capture_reference
        assert reference is not None
        return payment, reference


@pytest.fixture
def sandbox() -> Iterator[SandboxProcessorServer]:
    # Retries a few tens of milliseconds apart: the tests wait for them.
    with SandboxProcessorServer("primary", secret=SECRET, notify_backoff_base_s=0.05) as server:
        yield server


@pytest.fixture
def served(settings: Settings, database_url: str, servers: ServerURLs, clock: ManualClock,
           sandbox: SandboxProcessorServer) -> Iterator[Served]:
    # The API knows the processor's current secret and the one it is rotating away from.
    settings = settings.replace(processor_webhook_secrets={"primary": (SECRET, OLD_SECRET)})
    services = build_api_services(settings, database_url, servers.redis_url, servers.kafka_bootstrap_servers,
                                  clock=clock, processor=HttpProcessor("primary", sandbox.url))
    try:
        for url in serve(asgi_app(services)):
            sandbox.configure_notifications(notify_url=f"{url}/v1/processor-events/primary")
            yield Served(url, services, sandbox, database_url, settings)
            sandbox.stop()  # no retry outlives the API it was sending to
    finally:
        services.close()


def notification(reference: str = "primary_capt_unknown", **changes: Any) -> bytes:
    event = ProcessorEvent(
        event_id=f"evt_{uuid.uuid4().hex}", type=DISPUTE_OPENED, created_at=datetime.now(UTC),
        payment_reference=reference, dispute_id=f"dp_{uuid.uuid4().hex[:12]}", reason="fraudulent",
        amount_minor=2_500, currency="USD", due_by=datetime.now(UTC) + timedelta(days=7))
    body: dict[str, Any] = json.loads(event_body(event))
    body.update(changes)
    return json.dumps(body).encode()


def _problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    body: dict[str, Any] = response.json()
    assert (body["status"], body["code"]) == (status, code), body
    return body


def _until(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# -- refusals: one answer, whatever the reason ---------------------------------------------------


def test_every_bad_signature_gets_the_same_401_and_changes_nothing(served: Served) -> None:
    body = notification()
    now = time.time()
    refusals = {
        "missing": served.post(body, header=""),
        "forged": served.post(body, sign_with="whsec_guessed"),
        "tampered": served.post(body.replace(b"2500", b"9999"), header=signature_header(SECRET, body)),
        "stale": served.post(body, now=now - 3_600),
        "from the future": served.post(body, now=now + 3_600),
        "malformed": served.post(body, header="t=now,v1=yes"),
        "unknown processor": served.post(body, processor="tertiary"),
        "another processor's secret": served.post(body, processor="secondary"),
        "an API key instead": served.post(body, header="", Authorization="Bearer et_live_whatever"),
    }
    answers = set()
    for reason, response in refusals.items():
        problem = _problem(response, 401, "invalid_signature")
        assert "Traceback" not in response.text, reason
        answers.add((problem["title"], problem["detail"], problem["type"]))
    assert len(answers) == 1, answers  # no oracle: nothing tells a forger which part was wrong
    assert served.sandbox.notifications() == []


def test_a_bad_signature_is_refused_before_the_body_is_read(served: Served) -> None:
    _problem(served.post(b'{"id": ', sign_with="whsec_guessed"), 401, "invalid_signature")


@pytest.mark.parametrize(("body", "field"), [
    (b'{"id": ', "body"),
    (b"[]", "body"),
    (notification(type="dispute.reopened"), "type"),
    (notification(created="2026-01-02T03:04:05"), "created"),
    (notification(data={"dispute_id": "dp_1"}), "data.payment_reference"),
])
def test_a_signed_but_malformed_body_is_400_naming_the_field(served: Served, body: bytes, field: str) -> None:
    problem = _problem(served.post(body), 400, "validation_error")
    assert problem["errors"] == [{"field": field, "message": problem["errors"][0]["message"]}]


def test_the_previous_secret_still_verifies_while_it_rotates(served: Served) -> None:
    # A valid signature reaches the ledger: here, about a payment nobody has (404, retried later).
    _problem(served.post(notification(), sign_with=OLD_SECRET), 404, "not_found")


def test_an_event_for_a_payment_we_do_not_know_is_404_so_the_processor_retries(served: Served) -> None:
    _problem(served.post(notification("primary_capt_nobody")), 404, "not_found")


def test_the_operation_is_documented_as_signed_not_keyed(served: Served) -> None:
    document = httpx.get(f"{served.url}/schema/openapi.json").json()
    operation = document["paths"]["/v1/processor-events/{processor}"]["post"]
    assert operation["operationId"] == "receiveProcessorEvent"
    assert operation["security"] == [{"processorSignature": []}]
    scheme = document["components"]["securitySchemes"]["processorSignature"]
    assert (scheme["type"], scheme["in"], scheme["name"]) == ("apiKey", "header", SIGNATURE_HEADER)
    assert operation["requestBody"]["content"]["application/json"]["schema"]["required"] == [
        "id", "type", "created", "data"]


# -- the sandbox's notifications, end to end ---------------------------------------------------------


def test_a_dispute_opened_at_the_sandbox_reaches_the_ledger_once_however_often_it_is_sent(served: Served) -> None:
    payment, reference = served.captured_payment("twice")
    opened = served.sandbox.open_dispute(reference, reason="product_not_received", amount_minor=1_000)
    assert served.sandbox.wait_for_notifications()
    again = served.sandbox.deliver(opened["event_id"])  # the processor did not hear our answer: same event
    assert served.sandbox.wait_for_notifications()
    first, second = served.sandbox.notifications()
    assert (first["event_id"], first["type"], first["outcome"], first["answers"]) == \
        (opened["event_id"], DISPUTE_OPENED, "delivered", [200])
    assert (second["event_id"], second["outcome"], again.answers) == (opened["event_id"], "delivered", [200])
    dispute = served.services.ledger.get_dispute(dispute_id("primary", opened["dispute_id"]))
    assert (dispute.payment_id, dispute.status, dispute.amount_minor, dispute.reason) == \
        (payment, DisputeStatus.NEEDS_RESPONSE, 1_000, "product_not_received")
    version = dispute.version
    # What our endpoint answered each time: applied, then replayed.
    body = event_body(ProcessorEvent(
        event_id=opened["event_id"], type=DISPUTE_OPENED, created_at=datetime.now(UTC), payment_reference=reference,
        dispute_id=opened["dispute_id"], reason="product_not_received", amount_minor=1_000, currency="USD"))
    answer = served.post(body)
    assert answer.status_code == 200 and answer.json() == {"received": True, "replayed": True}
    assert served.services.ledger.get_dispute(dispute.id).version == version


def test_a_ruling_that_arrives_before_the_dispute_it_rules_on_is_applied_and_the_late_opening_changes_nothing(
    served: Served,
) -> None:
    payment, reference = served.captured_payment("order")
    opened = served.sandbox.open_dispute(reference, send=False)  # held back: it arrives last
    won = served.sandbox.rule_dispute(opened["dispute_id"], "won")
    assert served.sandbox.wait_for_notifications()
    served.sandbox.deliver(opened["event_id"])
    assert served.sandbox.wait_for_notifications()
    assert [(n["type"], n["outcome"]) for n in served.sandbox.notifications()] == \
        [(DISPUTE_WON, "delivered"), (DISPUTE_OPENED, "delivered")]
    assert won["event_id"] != opened["event_id"]
    dispute = served.services.ledger.get_dispute(dispute_id("primary", opened["dispute_id"]))
    assert (dispute.payment_id, dispute.status) == (payment, DisputeStatus.WON)


def test_the_notifier_retries_a_404_with_the_same_event_until_the_payment_is_known(served: Served) -> None:
    ledger = served.services.ledger
    merchant = new_merchant(ledger, "merchant-late")
    payment = pay(ledger, open_session(ledger, merchant, command_id="open-late"), prefix="late-")
    ledger.authorize_payment(payment)
    ledger.capture_payment("capture-late", payment)
    reference = ledger.get_payment(payment).capture_reference
    assert reference is not None
    opened = served.sandbox.open_dispute(reference)  # before the read side knows the capture
    _until(lambda: 404 in served.sandbox.notifications()[0]["answers"])
    catch_up(served.database_url, served.settings)
    assert served.sandbox.wait_for_notifications()
    [sent] = served.sandbox.notifications()
    assert sent["outcome"] == "delivered" and sent["answers"][-1] == 200 and set(sent["answers"]) <= {404, 200}
    assert sent["event_id"] == opened["event_id"]
    assert ledger.get_dispute(dispute_id("primary", opened["dispute_id"])).payment_id == payment


def test_an_early_fraud_warning_reaches_the_ledger(served: Served) -> None:
    _, reference = served.captured_payment("warning")
    served.sandbox.early_fraud_warning(reference)
    assert served.sandbox.wait_for_notifications()
    [sent] = served.sandbox.notifications()
    assert (sent["type"], sent["outcome"], sent["body"]["data"]["dispute_id"]) == \
        ("early_fraud_warning", "delivered", None)


def test_the_sandbox_controls_open_and_rule_disputes_over_http(served: Served) -> None:
    _, reference = served.captured_payment("controls")
    base = served.sandbox.url
    unknown = httpx.post(f"{base}/v1/sandbox/disputes", json={"capture_reference": "primary_capt_nope"})
    assert unknown.status_code == 404 and unknown.json()["error"] == "not_found"
    too_much = httpx.post(f"{base}/v1/sandbox/disputes", json={"capture_reference": reference, "amount_minor": 10**6})
    assert too_much.status_code == 400
    opened = httpx.post(f"{base}/v1/sandbox/disputes", json={"capture_reference": reference, "reason": "duplicate"})
    assert opened.status_code == 200, opened.text
    dispute = opened.json()
    assert (dispute["amount_minor"], dispute["reason"], dispute["status"]) == (2_500, "duplicate", "open")
    lost = httpx.post(f"{base}/v1/sandbox/disputes/{dispute['dispute_id']}/ruling", json={"outcome": "lost"})
    assert lost.status_code == 200 and lost.json()["status"] == "lost"
    twice = httpx.post(f"{base}/v1/sandbox/disputes/{dispute['dispute_id']}/ruling", json={"outcome": "won"})
    assert twice.status_code == 400
    assert httpx.post(f"{base}/v1/sandbox/disputes/dp_nope/ruling", json={"outcome": "won"}).status_code == 404
    assert served.sandbox.wait_for_notifications()
    listed = httpx.get(f"{base}/v1/sandbox/notifications").json()
    assert listed["secret_set"] is True and SECRET not in json.dumps(listed)
    assert [(n["type"], n["outcome"]) for n in listed["data"]] == [("dispute.opened", "delivered"),
                                                                  ("dispute.lost", "delivered")]
    ruled = served.services.ledger.get_dispute(dispute_id("primary", dispute["dispute_id"]))
    assert ruled.status == DisputeStatus.LOST


# -- the notifier's retries, against receivers that misbehave ---------------------------------------


def test_an_unreachable_receiver_is_given_up_on_after_the_last_attempt() -> None:
    with SandboxProcessorServer("primary", secret="not-the-apis", notify_backoff_base_s=0.001) as sandbox:
        capture = _capture_at(sandbox)
        sandbox.configure_notifications(notify_url=f"http://127.0.0.1:{free_port()}/v1/processor-events/primary")
        sandbox.early_fraud_warning(capture)
        assert sandbox.wait_for_notifications()
        [unreachable] = sandbox.notifications()
        assert unreachable["outcome"] == "gave_up" and len(unreachable["answers"]) == NOTIFY_ATTEMPTS
        assert set(unreachable["answers"]) == {"ConnectError"}


def test_a_4xx_refusal_stops_the_retries(served: Served) -> None:
    _, reference = served.captured_payment("refused")
    served.sandbox.configure_notifications(secret="whsec_wrong")
    served.sandbox.open_dispute(reference)
    assert served.sandbox.wait_for_notifications()
    [refused] = served.sandbox.notifications()
    assert (refused["outcome"], refused["answers"]) == ("refused", [401])


def _capture_at(sandbox: SandboxProcessorServer) -> str:
    _, authorized = sandbox.handle_operation("authorize", "authorize:x", {
        "amount_minor": 2_500, "currency": "USD", "card_token": "card_x", "card_last4": "4242", "merchant_id": "m1"})
    _, captured = sandbox.handle_operation("capture", "capture:x", {
        "authorization_reference": authorized["reference"], "amount_minor": 2_500, "currency": "USD"})
    return str(captured["reference"])

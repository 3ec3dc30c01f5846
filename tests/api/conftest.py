"""The API served over real HTTP (uvicorn on a loopback port) on real PostgreSQL and Redis."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from uuid import UUID

import httpx
import pytest
import uvicorn

from adapters.clock import ManualClock
from adapters.dev.sandbox_processor import SandboxProcessor
from adapters.dev.servers import ServerURLs, free_port
from api.bootstrap import build_api_services, envelope_opener, personal_data_reader
from api.http.app import asgi_app
from api.http.services import ApiServices
from api.settings import Settings
from projections.engine import ProjectionStore
from projections.registry import all_projections


@dataclass
class Api:
    url: str
    database_url: str
    services: ApiServices
    keys: dict[str, str]
    merchants: dict[str, UUID]
    project: Callable[[], int]

    def client(self, who: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.keys[who]}"} if who else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


def serve(app: Any) -> Iterator[str]:
    """An ASGI app served by uvicorn on a free loopback port, for as long as the generator runs."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_config=None, access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def make_api(settings: Settings, database_url: str, servers: ServerURLs, clock: ManualClock,
             processor: SandboxProcessor) -> Iterator[Api]:
    services = build_api_services(settings, database_url, servers.redis_url, servers.kafka_bootstrap_servers,
                                  clock=clock, processor=processor)
    ledger = services.ledger
    merchants = {
        name: UUID(ledger.register_merchant(f"setup-{name}", name=f"Merchant {name}").result["merchant_id"])
        for name in ("a", "b")
    }
    keys = {
        "a": ledger.issue_api_key("setup-key-a", role="merchant", merchant_id=merchants["a"])[1],
        "b": ledger.issue_api_key("setup-key-b", role="merchant", merchant_id=merchants["b"])[1],
        **{role: ledger.issue_api_key(f"setup-key-{role}", role=role)[1]
           for role in ("analyst", "compliance", "admin")},
    }
    store = ProjectionStore(database_url, list(all_projections(personal_data_reader(settings)).values()),
                            envelope_opener(settings))

    def project() -> int:
        return store.catch_up(grace=timedelta(0))

    try:
        for url in serve(asgi_app(services)):
            yield Api(url, database_url, services, keys, merchants, project)
    finally:
        store.close()
        services.close()


@pytest.fixture
def api(settings: Settings, database_url: str, servers: ServerURLs, clock: ManualClock,
        processor: SandboxProcessor) -> Iterator[Api]:
    yield from make_api(settings, database_url, servers, clock, processor)


def session_body(amount: int = 2_500, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "amount": amount,
        "currency": "USD",
        "customer_phone": "+14155550123",
        "order": {"reference": "ORDER-1", "items": [
            {"sku": "PZ", "name": "Large pizza", "quantity": 1, "unit_amount": amount}]},
        "voice": {"platform": "alexa", "conversation_id": "conv-1"},
        "callback_url": "https://voice.example/callback",
    }
    body.update(overrides)
    return body


def customer_link(api: Api, session_id: UUID) -> tuple[str, str]:
    """(link token, code) from the SMS the customer received, via the development mailbox."""
    import re

    from adapters.notifications.sms import dev_inbox
    from api.bootstrap import build_message_dispatcher

    build_message_dispatcher(api.services.settings, api.database_url, api.services.ledger).run_once()
    for message in dev_inbox(api.database_url, limit=1000):
        found = re.search(rf"/pay/({session_id.hex}\S+) - your code is (\d{{6}})", message["body"])
        if found:
            return found.group(1), found.group(2)
    raise AssertionError(f"no SMS for session {session_id}")


def paid_payment(api: Api, merchant: str = "a", amount: int = 2_500, tag: str = "p",
                 phone: str = "+14155550123") -> UUID:
    """A session opened through the API, then paid by the customer with the link and code from
    the SMS (through the ledger, as the payment page does), authorized; returns the payment id."""
    with api.client(merchant) as client:
        created = client.post("/v1/payment-sessions", json=session_body(amount, customer_phone=phone),
                              headers={"Idempotency-Key": f"{tag}-open"})
        assert created.status_code == 201, created.text
    session_id = UUID(created.json()["id"])
    token, code = customer_link(api, session_id)
    ledger = api.services.ledger
    ledger.open_link(f"{tag}-open-link", session_id, token)
    assert ledger.verify_code(f"{tag}-code", session_id, code).result["code_check"] == "verified"
    attached = ledger.attach_payment_method(f"{tag}-attach", session_id, card_token=f"tok_{tag}",
                                            card_brand="visa", card_last4="4242")
    payment_id = UUID(attached.result["payment_id"])
    ledger.authorize_payment(payment_id)
    return payment_id


def disputed_payment(api: Api, phone: str) -> UUID:
    """A new dispute of merchant A on a captured payment of its own (on ``phone``: the risk rules
    count a phone's payments), notified by the processor through the ledger; its id."""
    import uuid
    from datetime import UTC, datetime

    from application.disputes import DISPUTE_OPENED, ProcessorEvent

    ledger = api.services.ledger
    tag = uuid.uuid4().hex
    payment = paid_payment(api, "a", tag=f"dispute-{tag}", phone=phone)
    ledger.capture_payment(f"capture-{tag}", payment)
    api.project()
    now = datetime.now(UTC)
    result = ledger.record_processor_event("sandbox", ProcessorEvent(
        event_id=f"evt_{tag}", type=DISPUTE_OPENED, created_at=now,
        payment_reference=ledger.get_payment(payment).capture_reference or "", dispute_id=f"dp_{tag}",
        reason="fraudulent", amount_minor=1_000, currency="USD", due_by=now + timedelta(days=7)))
    api.project()
    return UUID(result.result["dispute_id"])

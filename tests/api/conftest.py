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
from adapters.sandbox_processor import SandboxProcessor
from adapters.servers import ServerURLs, free_port
from api.bootstrap import Settings, build_api_services, envelope_opener
from api.http.app import create_app
from api.http.services import ApiServices
from projections.engine import ProjectionStore
from projections.registry import all_projections


@dataclass
class Api:
    url: str
    services: ApiServices
    keys: dict[str, str]
    merchants: dict[str, UUID]
    project: Callable[[], int]

    def client(self, who: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.keys[who]}"} if who else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


def serve(services: ApiServices) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(services), host="127.0.0.1", port=port,
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
    store = ProjectionStore(database_url, list(all_projections().values()), envelope_opener(settings))

    def project() -> int:
        return store.catch_up(grace=timedelta(0))

    try:
        for url in serve(services):
            yield Api(url, services, keys, merchants, project)
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


def paid_payment(api: Api, merchant: str = "a", amount: int = 2_500, tag: str = "p") -> UUID:
    """A session opened through the API, then paid by the customer (through the ledger, as the
    payment page would), authorized; returns the payment id."""
    from tests.application.flows import pay

    with api.client(merchant) as client:
        created = client.post("/v1/payment-sessions", json=session_body(amount),
                              headers={"Idempotency-Key": f"{tag}-open"})
        assert created.status_code == 201, created.text
    session_id = UUID(created.json()["id"])
    payment_id = pay(api.services.ledger, session_id, prefix=f"{tag}-")
    api.services.ledger.authorize_payment(payment_id)
    return payment_id

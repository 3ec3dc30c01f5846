"""Rotating a merchant's webhook signing secret over HTTP: the new secret in the answer (and in a
replay of it), never in a record; a merchant only its own; problem+json for every refusal."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta

import httpx
import psycopg
import pytest

from adapters.clock import ManualClock
from adapters.dev.sandbox_processor import SandboxProcessor
from adapters.dev.servers import ServerURLs
from adapters.notifications.webhooks import webhook_secret
from api.settings import Settings
from tests.api.conftest import Api, make_api

PROBLEM_JSON = "application/problem+json"


@pytest.fixture(scope="module")
def api(module_database: str, servers: ServerURLs) -> Iterator[Api]:
    settings = Settings(hash_key=b"h" * 32, master_key=b"m" * 32, encryption_key=b"e" * 32, rate_limit_per_minute=0)
    yield from make_api(settings, module_database, servers, ManualClock(), SandboxProcessor())


def rotate(client: httpx.Client, merchant: object, body: dict[str, object] | None = None,
           key: str | None = None) -> httpx.Response:
    return client.post(f"/v1/merchants/{merchant}/webhook-secret/rotate", json=body or {},
                       headers={"Idempotency-Key": key or uuid.uuid4().hex})


def problem(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    assert response.json()["code"] == code


def test_a_merchant_rotates_its_own_secret_and_sees_it_once(api: Api) -> None:
    a, hash_key = api.merchants["a"], api.services.settings.hash_key
    with api.client("a") as client:
        first = rotate(client, a, key="rotate-a-1")
        assert first.status_code == 201, first.text
        body = first.json()
        assert body["merchant_id"] == str(a)
        version = body["secret_version"]
        assert version >= 2
        assert body["secret"] == webhook_secret(hash_key, a, version) != webhook_secret(hash_key, a, version - 1)
        until = datetime.fromisoformat(body["previous_secret_valid_until"])
        assert until - api.services.ledger.clock.now() == timedelta(hours=24)  # the default overlap (ManualClock)
        # The same Idempotency-Key is the same rotation: the same answer, no new version.
        again = rotate(client, a, key="rotate-a-1")
        assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
        assert again.json() == body
        assert api.services.ledger.get_merchant(a).webhook_secret_version == version
        # A new key is a new rotation, with the overlap asked for.
        short = rotate(client, a, {"overlap_s": 600})
        assert short.json()["secret_version"] == version + 1
        assert datetime.fromisoformat(short.json()["previous_secret_valid_until"]) - api.services.ledger.clock.now() \
            == timedelta(minutes=10)
    # Derived, never stored: the idempotency record that answers a replay holds the version only.
    with psycopg.connect(api.database_url) as conn:
        records = str(conn.execute("SELECT response_body FROM idempotency_records").fetchall())
    assert str(a) in records
    for secret in (body["secret"], short.json()["secret"]):
        assert secret not in records


def test_an_admin_rotates_any_merchant_and_a_merchant_no_other(api: Api) -> None:
    b = api.merchants["b"]
    with api.client("admin") as admin:
        rotated = rotate(admin, b)
    assert rotated.status_code == 201, rotated.text
    assert rotated.json()["secret"] == webhook_secret(api.services.settings.hash_key, b,
                                                      rotated.json()["secret_version"])
    with api.client("a") as client:
        # Another merchant's secret answers exactly like a merchant that does not exist.
        problem(rotate(client, b), 404, "not_found")
        problem(rotate(client, uuid.uuid4()), 404, "not_found")
    assert api.services.ledger.get_merchant(b).webhook_secret_version == rotated.json()["secret_version"]
    with api.client("admin") as admin:
        problem(rotate(admin, uuid.uuid4()), 404, "not_found")
    for who in ("analyst", "compliance"):
        with api.client(who) as client:
            problem(rotate(client, b), 403, "forbidden")


@pytest.mark.parametrize("body", [{"overlap_s": -1}, {"overlap_s": 7 * 86400 + 1}, {"overlap_s": "1d"},
                                  {"secret": "mine"}])
def test_a_bad_overlap_or_field_is_a_problem_and_rotates_nothing(api: Api, body: dict[str, object]) -> None:
    a = api.merchants["a"]
    version = api.services.ledger.get_merchant(a).webhook_secret_version
    with api.client("a") as client:
        response = rotate(client, a, body)
    assert response.status_code == 400 and response.headers["content-type"] == PROBLEM_JSON, response.text
    assert api.services.ledger.get_merchant(a).webhook_secret_version == version


def test_a_rotation_needs_an_idempotency_key(api: Api) -> None:
    with api.client("admin") as admin:
        response = admin.post(f"/v1/merchants/{api.merchants['b']}/webhook-secret/rotate", json={})
    problem(response, 400, "idempotency_key_required")

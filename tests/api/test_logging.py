"""The API's logs in their production shape (structlog JSON lines, api.logging.configure_logging):
one line per request with its request id, the id echoed to the caller, and nothing in any line
that identifies a customer or opens an account (phone, API key, card number, Authorization)."""

from __future__ import annotations

import io
import json
import logging
import re
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import structlog

import api.http.middleware
import api.http.problems
from api.logging import configure_logging
from tests.api.conftest import Api, session_body

PHONE = "+14155550123"
CARD_NUMBER = "4242424242424242"
STOLEN_KEY = "et_00000000000000000000000000000000_notARealKeyButShapedLikeOne123"
GENERATED_ID = re.compile(r"[0-9a-f]{32}")


@pytest.fixture
def json_logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """The production configuration, writing to a buffer instead of stderr."""
    saved = structlog.get_config()
    buffer = io.StringIO()
    configure_logging("debug")
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(buffer), cache_logger_on_first_use=False)
    # A logger already used under a caching configuration keeps its old output: use fresh ones.
    monkeypatch.setattr(api.http.middleware, "log", structlog.get_logger("echotransact.http"))
    monkeypatch.setattr(api.http.problems, "log", structlog.get_logger("api.http.problems"))
    yield buffer
    structlog.configure(**saved)


def _idem() -> dict[str, str]:
    # Unique per call: the idempotency records live in the run's one Redis, and merchant A has the
    # same id in every test's database.
    return {"Idempotency-Key": uuid.uuid4().hex}


def _lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    lines = [line for line in buffer.getvalue().splitlines() if line.strip()]
    assert lines, "nothing was logged"
    return [json.loads(line) for line in lines]  # every line is one JSON object


def _request_lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [line for line in _lines(buffer) if line.get("event") == "request"]


def test_every_request_is_one_json_line_with_the_id_the_caller_was_given(api: Api,
                                                                        json_logs: io.StringIO) -> None:
    responses = []
    with api.client("a") as client:
        responses.append(client.get("/v1/balances"))
        responses.append(client.post("/v1/payment-sessions", json={**session_body(), "amount": "lots"},
                                     headers=_idem()))
    with api.client(None) as client:
        responses.append(client.get("/v1/payments"))
    assert [r.status_code for r in responses] == [200, 400, 401]

    lines = _request_lines(json_logs)
    assert len(lines) == len(responses)
    for response, line in zip(responses, lines, strict=True):
        request_id = response.headers["x-request-id"]
        assert GENERATED_ID.fullmatch(request_id)
        assert line["request_id"] == request_id
        assert (line["method"], line["path"], line["status"]) == (
            response.request.method, response.request.url.path, response.status_code)
        assert line["level"] == "info" and line["timestamp"] and isinstance(line["duration_ms"], float)
        if response.status_code >= 400:
            assert response.json().get("request_id", request_id) == request_id
    assert len({r.headers["x-request-id"] for r in responses}) == len(responses)
    assert lines[0]["role"] == "merchant" and lines[0]["key_id"]
    assert lines[2]["role"] is None and lines[2]["key_id"] is None


@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/nowhere"), ("GET", "/v1/payments/not-a-uuid"),
                                              ("DELETE", "/v1/payments")])
def test_a_request_that_matches_no_route_is_logged_with_its_id_too(api: Api, json_logs: io.StringIO,
                                                                   method: str, path: str) -> None:
    with api.client("a") as client:
        response = client.request(method, path)
    assert response.status_code in (404, 405)
    request_id = response.headers["x-request-id"]
    assert response.json()["request_id"] == request_id
    assert [(line["request_id"], line["status"]) for line in _request_lines(json_logs)] == [
        (request_id, response.status_code)]


@pytest.mark.parametrize(("given", "echoed"), [
    ("req-2026-11-23.voice_01", True),
    (uuid.uuid4().hex, True),
    ("short", False),                # under 8 characters
    ("x" * 65, False),               # over 64
    ("id with spaces", False),
    ('"}{"level":"critical', False),  # an attempt to forge a log field
])
def test_an_incoming_request_id_is_echoed_only_when_it_is_safe(api: Api, json_logs: io.StringIO, given: str,
                                                               echoed: bool) -> None:
    with api.client("a") as client:
        response = client.get("/v1/balances", headers={"X-Request-Id": given})
    request_id = response.headers["x-request-id"]
    if echoed:
        assert request_id == given
    else:
        assert GENERATED_ID.fullmatch(request_id) and request_id != given
    assert [line["request_id"] for line in _request_lines(json_logs)] == [request_id]
    assert given not in json_logs.getvalue() or echoed


def test_no_log_line_holds_a_phone_a_key_a_card_number_or_the_authorization_header(
        api: Api, json_logs: io.StringIO, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    merchant_key = api.keys["a"]
    with api.client("a") as client:
        opened = client.post("/v1/payment-sessions", headers=_idem(),
                             json=session_body(metadata={"note": f"card {CARD_NUMBER}"}))
        assert opened.status_code == 201, opened.text
        session = opened.json()["id"]
        unknown_field = client.post("/v1/payment-sessions", headers=_idem(),
                                    json={**session_body(), "card_number": CARD_NUMBER})
        bad_phone = client.post("/v1/payment-sessions", headers=_idem(),
                                json=session_body(customer_phone=PHONE + "999999"))
        api.project()
        found = client.get(f"/v1/payment-sessions/{session}")
        filtered = client.get("/v1/payments", params={"status": PHONE})
    with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {STOLEN_KEY}"}) as client:
        stolen = client.get("/v1/payments")
    with api.client(None) as client:
        anonymous = client.post("/v1/payment-sessions", json=session_body(), headers=_idem())
    assert [unknown_field.status_code, bad_phone.status_code, found.status_code, filtered.status_code,
            stolen.status_code, anonymous.status_code] == [400, 422, 200, 400, 401, 401]

    lines = _lines(json_logs)
    assert len([line for line in lines if line.get("event") == "request"]) == 7
    assert all(line.get("request_id") for line in lines if line.get("event") == "request")
    # The server side of the standard library's logs too. Not the client's own httpx lines, nor
    # uvicorn's access log: the service runs uvicorn with access_log=False (api/cli.py), and only
    # pytest's capture handler turns it on here.
    server_records = [r.getMessage() for r in caplog.records
                      if not r.name.startswith(("httpx", "httpcore", "uvicorn.access"))]
    everything = json_logs.getvalue() + "\n".join(server_records)
    # A key is et_<key id>_<secret>, and the secret (urlsafe base64) may itself hold "_".
    secrets = {
        "the phone": PHONE, "the phone's digits": PHONE[2:], "the card number": CARD_NUMBER,
        "the merchant's key": merchant_key, "its secret part": merchant_key.split("_", 2)[2],
        "a stolen key": STOLEN_KEY, "the Authorization header": "Bearer ",
    }
    leaked = [name for name, value in secrets.items() if value.lower() in everything.lower()]
    assert not leaked, f"the logs hold {leaked}:\n{everything}"

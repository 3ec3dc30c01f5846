"""A sandbox payment processor running as a real local HTTP service, so the ledger's processor
client, retries, circuit breaker and failover are exercised over real sockets.

Run two of them as primary and secondary::

    python -m adapters.dev.processor_server --name primary --port 8101
    python -m adapters.dev.processor_server --name secondary --port 8102

Test cards, chosen by the card's last four digits (the same as adapters/dev/sandbox_processor.py,
plus 0259):

    4242, 4444, 1881, 0005 (and any other)  approved
    0002                                    declined (402): insufficient_funds
    0019                                    declined (402): suspected_fraud
    0119                                    timeout: the approval is recorded at once, but the
                                            answer comes only after ``timeout_card_delay_s``
                                            (longer than any sane client timeout); asking for
                                            the key's status gives the approval
    0259                                    server error: the approval is recorded, then the first
                                            ``server_error_attempts`` requests with that key are
                                            answered 500 (a lost answer); a retry with the same
                                            key gets the recorded approval

API (JSON bodies; amounts are integer minor units):

    POST /v1/authorizations  {amount_minor, currency, card_token, card_last4, merchant_id, cvv?}
    POST /v1/captures        {authorization_reference, amount_minor, currency}
    POST /v1/voids           {authorization_reference}
    POST /v1/refunds         {authorization_reference, amount_minor, currency}
    GET  /v1/operations/{idempotency_key}   the recorded answer, or 404 operation_not_found

Every POST needs an ``Idempotency-Key`` header. The first request with a key decides and is
recorded; the same key and request returns that answer again (``Idempotent-Replayed: true``)
and never moves money twice; the same key with a different request is 409
idempotency_key_reused. The CVV is neither stored nor part of the comparison (a retried
authorization does not carry it). Answers: 200 approved; 402 card declined; 422 operation
refused (unknown or voided authorization, amount above what remains, currency mismatch); 400
malformed request; 500/503 server trouble, safe to retry with the same key.

Sandbox controls (no key needed; not affected by latency or by being down):

    GET  /v1/sandbox/counters  {"requests": {key: n}, "money_movements": {key: n}}
    POST /v1/sandbox/latency   {"latency_ms": n}
    POST /v1/sandbox/down      {"down": true|false}

Listens on loopback by default and has no authentication: a development and test tool only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import signal
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import unquote

_log = logging.getLogger(__name__)

CARD_DECLINES = {
    "0002": ("insufficient_funds", "Insufficient funds"),
    "0019": ("suspected_fraud", "Suspected fraud"),
}
TIMEOUT_LAST4 = "0119"
SERVER_ERROR_LAST4 = "0259"
AUTHORIZATION_LIFETIME = timedelta(days=7)
MAX_BODY_BYTES = 64 * 1024

OPERATIONS = {
    "/v1/authorizations": "authorize",
    "/v1/captures": "capture",
    "/v1/voids": "void",
    "/v1/refunds": "refund",
}
# The request fields that make two requests "the same"; the CVV is deliberately absent.
FINGERPRINT_FIELDS = {
    "authorize": ("amount_minor", "currency", "card_token", "card_last4", "merchant_id"),
    "capture": ("authorization_reference", "amount_minor", "currency"),
    "void": ("authorization_reference",),
    "refund": ("authorization_reference", "amount_minor", "currency"),
}


class InvalidRequest(Exception):
    """The request body is malformed; answered 400."""


@dataclass
class _Answer:
    """One recorded answer: what the first request with a key got, forever."""

    http_status: int
    body: dict[str, Any]
    fingerprint: str
    card_last4: str = ""


@dataclass
class _Authorization:
    reference: str
    amount_minor: int
    currency: str
    captured_minor: int = 0
    refunded_minor: int = 0
    voided: bool = False


@dataclass
class _Ledger:
    """The sandbox's in-memory state; every access holds ``SandboxProcessorServer._lock``."""

    answers: dict[str, _Answer] = field(default_factory=dict)
    authorizations: dict[str, _Authorization] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)
    money_movements: dict[str, int] = field(default_factory=dict)


class SandboxProcessorServer:
    """One sandbox processor; start two (primary, secondary) to exercise failover.

    Its records outlive ``stop()``: a restarted instance remembers every key, like a real
    processor whose database survives an outage.
    """

    def __init__(
        self,
        name: str,
        host: str = "127.0.0.1",
        port: int = 0,
        latency_ms: int = 0,
        *,
        timeout_card_delay_s: float = 5.0,
        server_error_attempts: int = 1,
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.timeout_card_delay_s = timeout_card_delay_s
        self.server_error_attempts = server_error_attempts
        self._latency_ms = max(0, int(latency_ms))
        self._down = False
        self._lock = threading.Lock()
        self._state = _Ledger()
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> str:
        """Listen (on the port it had before, when restarted) and return the base URL."""
        if self._httpd is not None:
            return self.url
        self._stopping.clear()
        httpd = ThreadingHTTPServer((self.host, self.port), _handler_for(self))
        httpd.daemon_threads = True
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"sandbox-processor-{self.name}", daemon=True,
        )
        self._thread.start()
        return self.url

    def stop(self) -> None:
        """Stop listening: new connections are refused. Requests held back by latency or the
        timeout card are released (their clients have given up)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- controls ------------------------------------------------------------------------------

    @property
    def latency_ms(self) -> int:
        return self._latency_ms

    def set_latency(self, ms: int) -> None:
        """Delay every later answer by ``ms`` milliseconds (before the request is handled)."""
        self._latency_ms = max(0, int(ms))

    @property
    def down(self) -> bool:
        return self._down

    def set_down(self, down: bool) -> None:
        """While down, every request is answered 503 and nothing is recorded."""
        self._down = bool(down)

    # -- counters, for tests -------------------------------------------------------------------

    def requests(self, idempotency_key: str) -> int:
        """How many POSTs with this key were handled: replays and conflicts count, requests
        answered 503 while down do not (they never reach the processor)."""
        with self._lock:
            return self._state.requests.get(idempotency_key, 0)

    def money_movements(self, idempotency_key: str) -> int:
        """How many times money moved (funds held, captured, released or refunded) for this
        key: 0 or 1, or there is a bug."""
        with self._lock:
            return self._state.money_movements.get(idempotency_key, 0)

    def total_money_movements(self) -> int:
        with self._lock:
            return sum(self._state.money_movements.values())

    def counters(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {
                "requests": dict(self._state.requests),
                "money_movements": dict(self._state.money_movements),
            }

    # -- the processor -------------------------------------------------------------------------

    def pause(self, seconds: float) -> None:
        """Sleep, but wake up when the server stops."""
        if seconds > 0:
            self._stopping.wait(seconds)

    def handle_operation(self, operation: str, key: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Decide (or replay) one POST; returns (HTTP status, JSON body)."""
        fingerprint = _fingerprint(operation, body)
        with self._lock:
            state = self._state
            state.requests[key] = attempt = state.requests.get(key, 0) + 1
            recorded = state.answers.get(key)
            if recorded is not None and recorded.fingerprint != fingerprint:
                return HTTPStatus.CONFLICT, _error(
                    "idempotency_key_reused",
                    f"idempotency key {key!r} was first used for a different request",
                )
            replayed = recorded is not None
            if recorded is None:
                recorded = self._decide(operation, key, body, fingerprint)
                state.answers[key] = recorded
        if recorded.card_last4 == SERVER_ERROR_LAST4 and attempt <= self.server_error_attempts:
            return HTTPStatus.INTERNAL_SERVER_ERROR, _error("server_error", "sandbox card 0259")
        if recorded.card_last4 == TIMEOUT_LAST4 and not replayed:
            self.pause(self.timeout_card_delay_s)
        body_out = dict(recorded.body, replayed=replayed)
        return recorded.http_status, body_out

    def operation_status(self, key: str) -> tuple[int, dict[str, Any]]:
        with self._lock:
            recorded = self._state.answers.get(key)
        if recorded is None:
            return HTTPStatus.NOT_FOUND, _error("operation_not_found", f"no operation with key {key!r}")
        return HTTPStatus.OK, dict(recorded.body)

    def _decide(self, operation: str, key: str, body: dict[str, Any], fingerprint: str) -> _Answer:
        """The first request with this key: validate, decide, move money. Holds the lock."""
        if operation == "authorize":
            return self._authorize(key, body, fingerprint)
        reference = _text(body, "authorization_reference")
        authorization = self._state.authorizations.get(reference)
        if authorization is None:
            return self._refused(operation, key, fingerprint, "authorization_not_found",
                                 f"no authorization {reference!r} at processor {self.name}")
        if operation == "void":
            if authorization.voided:
                return self._refused(operation, key, fingerprint, "authorization_voided", "already voided")
            if authorization.captured_minor:
                return self._refused(operation, key, fingerprint, "already_captured",
                                     "a captured authorization cannot be voided; refund it")
            authorization.voided = True
            return self._approved(operation, key, fingerprint, amount_minor=authorization.amount_minor,
                                  currency=authorization.currency)
        amount, currency = _amount(body), _currency(body)
        if currency != authorization.currency:
            return self._refused(operation, key, fingerprint, "currency_mismatch",
                                 f"the authorization is in {authorization.currency}, not {currency}")
        if operation == "capture":
            if authorization.voided:
                return self._refused(operation, key, fingerprint, "authorization_voided", "voided")
            remaining = authorization.amount_minor - authorization.captured_minor
            if amount > remaining:
                return self._refused(operation, key, fingerprint, "amount_exceeds_authorized",
                                     f"{amount} asked, {remaining} left to capture")
            authorization.captured_minor += amount
        else:  # refund
            remaining = authorization.captured_minor - authorization.refunded_minor
            if amount > remaining:
                return self._refused(operation, key, fingerprint, "amount_exceeds_captured",
                                     f"{amount} asked, {remaining} left to refund")
            authorization.refunded_minor += amount
        return self._approved(operation, key, fingerprint, amount_minor=amount, currency=currency)

    def _authorize(self, key: str, body: dict[str, Any], fingerprint: str) -> _Answer:
        amount, currency = _amount(body), _currency(body)
        _text(body, "card_token")
        _text(body, "merchant_id")
        last4 = _text(body, "card_last4")
        if len(last4) != 4 or not last4.isdigit():
            raise InvalidRequest("card_last4 must be four digits")
        if last4 in CARD_DECLINES:
            code, message = CARD_DECLINES[last4]
            answer = self._declined("authorize", key, fingerprint, HTTPStatus.PAYMENT_REQUIRED, code, message)
        else:
            answer = self._approved(
                "authorize", key, fingerprint, amount_minor=amount, currency=currency,
                expires_at=(datetime.now(UTC) + AUTHORIZATION_LIFETIME).isoformat(),
            )
            reference = answer.body["reference"]
            self._state.authorizations[reference] = _Authorization(reference, amount, currency)
        answer.card_last4 = last4
        return answer

    def _approved(
        self, operation: str, key: str, fingerprint: str, *, amount_minor: int, currency: str,
        expires_at: str | None = None,
    ) -> _Answer:
        self._state.money_movements[key] = self._state.money_movements.get(key, 0) + 1
        body = _outcome(self.name, operation, key, "approved", amount_minor=amount_minor, currency=currency,
                        reference=f"{self.name}_{operation[:4]}_{uuid.uuid4().hex[:16]}",
                        expires_at=expires_at)
        return _Answer(HTTPStatus.OK, body, fingerprint)

    def _declined(
        self, operation: str, key: str, fingerprint: str, status: int, code: str, message: str
    ) -> _Answer:
        body = _outcome(self.name, operation, key, "declined", reason_code=code, message=message)
        return _Answer(status, body, fingerprint)

    def _refused(self, operation: str, key: str, fingerprint: str, code: str, message: str) -> _Answer:
        return self._declined(operation, key, fingerprint, HTTPStatus.UNPROCESSABLE_ENTITY, code, message)


def _outcome(
    processor: str, operation: str, key: str, decision: str, *, amount_minor: int = 0, currency: str = "",
    reference: str = "", reason_code: str = "", message: str = "", expires_at: str | None = None,
) -> dict[str, Any]:
    return {
        "processor": processor, "operation": operation, "idempotency_key": key, "decision": decision,
        "reference": reference, "amount_minor": amount_minor, "currency": currency,
        "reason_code": reason_code, "message": message, "expires_at": expires_at,
    }


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": code, "message": message}


def _fingerprint(operation: str, body: dict[str, Any]) -> str:
    fields = {name: body.get(name) for name in FINGERPRINT_FIELDS[operation]}
    return hashlib.sha256(json.dumps([operation, fields], sort_keys=True).encode()).hexdigest()


def _text(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value or len(value) > 200:
        raise InvalidRequest(f"{name} must be a non-empty string of at most 200 characters")
    return value


def _amount(body: dict[str, Any]) -> int:
    value = body.get("amount_minor")
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidRequest("amount_minor must be a positive integer")
    return value


def _currency(body: dict[str, Any]) -> str:
    value = _text(body, "currency")
    if len(value) != 3 or not value.isalpha() or not value.isupper():
        raise InvalidRequest("currency must be an ISO 4217 code such as USD")
    return value


def _handler_for(sandbox: SandboxProcessorServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.0: one request per connection, so a stopped server refuses the next call at
        # once instead of leaving clients with half-dead keep-alive connections.
        protocol_version = "HTTP/1.0"
        server_version = f"EchoTransactSandbox/{sandbox.name}"

        def log_message(self, message_format: str, *args: Any) -> None:
            _log.debug("%s %s", sandbox.name, message_format % args)

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/v1/sandbox/counters":
                self._send(HTTPStatus.OK, sandbox.counters())
                return
            if not self._available():
                return
            if path.startswith("/v1/operations/") and len(path) > len("/v1/operations/"):
                self._send(*sandbox.operation_status(unquote(path[len("/v1/operations/"):])))
                return
            self._send(HTTPStatus.NOT_FOUND, _error("not_found", f"no route {path}"))

        def do_POST(self) -> None:
            path = self.path.split("?", 1)[0]
            try:
                body = self._json_body()
            except InvalidRequest as error:
                self._send(HTTPStatus.BAD_REQUEST, _error("invalid_request", str(error)))
                return
            control = controls.get(path)
            if control is not None:
                self._control(control, body)
                return
            if not self._available():
                return
            operation = OPERATIONS.get(path)
            if operation is None:
                self._send(HTTPStatus.NOT_FOUND, _error("not_found", f"no route {path}"))
                return
            key = (self.headers.get("Idempotency-Key") or "").strip()
            if not key or len(key) > 255:
                self._send(HTTPStatus.BAD_REQUEST, _error(
                    "idempotency_key_required", "an Idempotency-Key header (1-255 chars) is required"
                ))
                return
            try:
                status, answer = sandbox.handle_operation(operation, key, body)
            except InvalidRequest as error:
                self._send(HTTPStatus.BAD_REQUEST, _error("invalid_request", str(error)))
                return
            headers = {"Idempotent-Replayed": "true"} if answer.pop("replayed", False) else {}
            self._send(status, answer, headers)

        def _control(self, control: Callable[[dict[str, Any]], None], body: dict[str, Any]) -> None:
            try:
                control(body)
            except (KeyError, TypeError, ValueError) as error:
                self._send(HTTPStatus.BAD_REQUEST, _error("invalid_request", str(error)))
                return
            self._send(HTTPStatus.OK, {"latency_ms": sandbox.latency_ms, "down": sandbox.down})

        def _available(self) -> bool:
            sandbox.pause(sandbox.latency_ms / 1000)
            if sandbox.down:
                self._send(HTTPStatus.SERVICE_UNAVAILABLE, _error("unavailable", f"{sandbox.name} is down"))
                return False
            return True

        def _json_body(self) -> dict[str, Any]:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                raise InvalidRequest("bad Content-Length") from None
            if length > MAX_BODY_BYTES:
                raise InvalidRequest(f"the body is larger than {MAX_BODY_BYTES} bytes")
            raw = self.rfile.read(length) if length else b"{}"
            try:
                body = json.loads(raw)
            except ValueError:
                raise InvalidRequest("the body is not JSON") from None
            if not isinstance(body, dict):
                raise InvalidRequest("the body must be a JSON object")
            return body

        def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            payload = json.dumps(body).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timed out) before the answer came

    controls: dict[str, Callable[[dict[str, Any]], None]] = {
        "/v1/sandbox/latency": lambda body: sandbox.set_latency(int(body["latency_ms"])),
        "/v1/sandbox/down": lambda body: sandbox.set_down(bool(body["down"])),
    }
    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a sandbox payment processor over HTTP.")
    parser.add_argument("--name", default="sandbox", help="the processor's name (primary, secondary)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed at start)")
    parser.add_argument("--latency-ms", type=int, default=0)
    parser.add_argument("--timeout-card-delay-s", type=float, default=5.0)
    args = parser.parse_args(argv)
    server = SandboxProcessorServer(
        args.name, args.host, args.port, args.latency_ms, timeout_card_delay_s=args.timeout_card_delay_s
    )
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    url = server.start()
    print(f"sandbox processor {args.name} listening on {url}", flush=True)
    try:
        stop.wait()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

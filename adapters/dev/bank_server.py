"""A sandbox bank running as a real local HTTP service, so payouts (application/payouts.py) reach a
bank over real sockets through adapters/banks/http.py, timeouts and refusals included.

Run one::

    python -m adapters.dev.bank_server --port 8201

API (JSON bodies; amounts are integer minor units):

    POST /v1/transfers        {merchant_id, amount_minor, currency, description}
    GET  /v1/transfers/{idempotency_key}   the transfer made under that key, or 404 transfer_not_found

A POST needs an ``Idempotency-Key`` header (1-255 characters). The first request with a key pays
the merchant and is recorded: 201 ``{transfer_id, status: "paid", merchant_id, amount_minor,
currency, description, created_at}``. The same key and body answers that again
(``Idempotent-Replayed: true``) and moves no money; the same key with a different body is 409
idempotency_key_reused. Answers: 201 paid; 422 account_closed (refused, nothing recorded); 400
idempotency_key_required or invalid_request (naming the field); 503 unavailable, safe to send
again with the same key.

Misbehaviour, for tests (as methods, or as these controls; no key needed, not affected by being
down):

    GET  /v1/sandbox/counters        {"requests": {key: n}, "money_movements": {key: n}}
    POST /v1/sandbox/fail-next       {"n": n}   the next n transfer requests: 503, nothing recorded
    POST /v1/sandbox/time-out-next   {"n": n}   the next n new transfers are paid, but answered
                                                only after ``timeout_delay_s``
    POST /v1/sandbox/reject-account  {"merchant_id": id}   transfers to it: 422 account_closed
    POST /v1/sandbox/down            {"down": true|false}  503 for everything

Served like adapters/dev/processor_server.py (whose helpers it shares): a Litestar app under
uvicorn, in a thread of the calling process or as a process of its own (the command above), every
answer with ``Connection: close``, loopback by default and no authentication: a development and
test tool only.
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
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

from litestar import Litestar, Request, Response, get, post
from litestar.datastructures import Headers
from litestar.exceptions import HTTPException
from litestar.handlers import HTTPRouteHandler

from adapters.dev.http_service import ThreadedHttpService
from adapters.dev.processor_server import MAX_BODY_BYTES, InvalidRequest, _answer, _error, _json_object

_log = logging.getLogger(__name__)

MAX_KEY_CHARS = 255
MAX_MERCHANT_ID_CHARS = 200
MAX_DESCRIPTION_CHARS = 140  # what a bank statement line shows
MAX_AMOUNT_MINOR = 2**63 - 1
# The request fields that make two transfers "the same".
FINGERPRINT_FIELDS = ("merchant_id", "amount_minor", "currency", "description")


@dataclass(frozen=True)
class RecordedTransfer:
    """A transfer the bank made: money moved to the merchant, once per key."""

    idempotency_key: str
    transfer_id: str
    merchant_id: str
    amount_minor: int
    currency: str
    description: str
    created_at: datetime
    fingerprint: str

    def as_json(self) -> dict[str, Any]:
        """The answer to the POST that made it, to its replays, and to GET /v1/transfers/{key}."""
        return {
            "transfer_id": self.transfer_id, "status": "paid", "merchant_id": self.merchant_id,
            "amount_minor": self.amount_minor, "currency": self.currency, "description": self.description,
            "created_at": self.created_at.isoformat(),
        }


@dataclass
class _Accounts:
    """The sandbox's in-memory state; every access holds ``SandboxBankServer._lock``."""

    transfers: dict[str, RecordedTransfer] = field(default_factory=dict)  # by key, in the order made
    requests: dict[str, int] = field(default_factory=dict)
    money_movements: dict[str, int] = field(default_factory=dict)
    closed_accounts: set[str] = field(default_factory=set)
    fail_next: int = 0
    time_out_next: int = 0


class SandboxBankServer(ThreadedHttpService):
    """One sandbox bank. Its records outlive ``stop()``: a restarted instance remembers every key,
    like a real bank whose database survives an outage."""

    _thread_name = "sandbox-bank"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, timeout_delay_s: float = 5.0) -> None:
        super().__init__(host, port)
        self.timeout_delay_s = timeout_delay_s
        self._down = False
        self._lock = threading.Lock()
        self._state = _Accounts()

    def _app(self) -> Litestar:
        return _app_for(self)

    # -- misbehaviour --------------------------------------------------------------------------

    @property
    def down(self) -> bool:
        return self._down

    def set_down(self, down: bool) -> None:
        """While down, every request is answered 503 and nothing is recorded."""
        self._down = bool(down)

    def fail_next(self, n: int) -> None:
        """The next ``n`` transfer requests (new or replays) are answered 503 and record nothing."""
        with self._lock:
            self._state.fail_next = _count(n)

    def time_out_next(self, n: int) -> None:
        """The next ``n`` new transfers are paid and recorded, but answered only after
        ``timeout_delay_s``: a client that gives up sooner does not know the money moved."""
        with self._lock:
            self._state.time_out_next = _count(n)

    def reject_account(self, merchant_id: str) -> None:
        """From now on transfers to this merchant are refused (422 account_closed), recording nothing."""
        with self._lock:
            self._state.closed_accounts.add(merchant_id)

    def controls(self) -> dict[str, Any]:
        with self._lock:
            state = self._state
            return {"down": self.down, "fail_next": state.fail_next, "time_out_next": state.time_out_next,
                    "closed_accounts": sorted(state.closed_accounts)}

    # -- counters, for tests -------------------------------------------------------------------

    def transfers(self) -> list[RecordedTransfer]:
        """Every transfer made, in order."""
        with self._lock:
            return list(self._state.transfers.values())

    def transfer(self, idempotency_key: str) -> RecordedTransfer | None:
        with self._lock:
            return self._state.transfers.get(idempotency_key)

    def money_movements(self, idempotency_key: str) -> int:
        """How many times money moved for this key: 0 or 1, or there is a bug."""
        with self._lock:
            return self._state.money_movements.get(idempotency_key, 0)

    def paid_total(self, merchant_id: str, currency: str) -> int:
        """What the bank paid this merchant in ``currency``, in minor units."""
        with self._lock:
            return sum(t.amount_minor for t in self._state.transfers.values()
                       if t.merchant_id == merchant_id and t.currency == currency)

    def requests(self, idempotency_key: str) -> int:
        """How many well-formed transfer requests with this key reached the bank: replays,
        conflicts, refusals and fail_next's 503s count; requests answered 503 while down do not."""
        with self._lock:
            return self._state.requests.get(idempotency_key, 0)

    def counters(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {"requests": dict(self._state.requests), "money_movements": dict(self._state.money_movements)}

    # -- the bank ------------------------------------------------------------------------------

    def handle_transfer(self, key: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], bool]:
        """Decide (or replay) one POST /v1/transfers; returns (HTTP status, JSON body, replayed).
        Checked in this order: a malformed body, fail_next, the key's earlier transfer (replay
        or conflict), a closed account; only then does money move."""
        merchant_id, amount, currency, description = _transfer_fields(body)
        fingerprint = _fingerprint(body)
        with self._lock:
            state = self._state
            state.requests[key] = state.requests.get(key, 0) + 1
            if state.fail_next > 0:
                state.fail_next -= 1
                return HTTPStatus.SERVICE_UNAVAILABLE, _error(
                    "unavailable", "the sandbox bank failed this request on purpose (fail_next)"
                ), False
            recorded = state.transfers.get(key)
            if recorded is not None:
                if recorded.fingerprint != fingerprint:
                    return HTTPStatus.CONFLICT, _error(
                        "idempotency_key_reused", f"idempotency key {key!r} was first used for a different transfer"
                    ), False
                return HTTPStatus.CREATED, recorded.as_json(), True
            if merchant_id in state.closed_accounts:
                return HTTPStatus.UNPROCESSABLE_ENTITY, _error(
                    "account_closed", f"the account of merchant {merchant_id!r} is closed"
                ), False
            recorded = RecordedTransfer(key, f"bank_tr_{uuid.uuid4().hex}", merchant_id, amount, currency,
                                        description, datetime.now(UTC), fingerprint)
            state.transfers[key] = recorded
            state.money_movements[key] = state.money_movements.get(key, 0) + 1
            delayed = state.time_out_next > 0
            if delayed:
                state.time_out_next -= 1
        if delayed:  # outside the lock: a retry meanwhile gets the recorded transfer at once
            self.pause(self.timeout_delay_s)
        return HTTPStatus.CREATED, recorded.as_json(), False

    def transfer_status(self, key: str) -> tuple[int, dict[str, Any]]:
        recorded = self.transfer(key)
        if recorded is None:
            return HTTPStatus.NOT_FOUND, _error("transfer_not_found", f"no transfer with key {key!r}")
        return HTTPStatus.OK, recorded.as_json()


def _count(n: int) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a whole number of requests, not {n!r}")
    return n


def _transfer_fields(body: dict[str, Any]) -> tuple[str, int, str, str]:
    """The transfer's fields, checked; InvalidRequest names the first one that is wrong."""
    merchant_id = body.get("merchant_id")
    if not isinstance(merchant_id, str) or not merchant_id or len(merchant_id) > MAX_MERCHANT_ID_CHARS:
        raise InvalidRequest(f"merchant_id must be a non-empty string of at most {MAX_MERCHANT_ID_CHARS} characters")
    amount = body.get("amount_minor")
    if not isinstance(amount, int) or isinstance(amount, bool) or not 0 < amount <= MAX_AMOUNT_MINOR:
        raise InvalidRequest("amount_minor must be a positive integer of minor units")
    currency = body.get("currency")
    if not isinstance(currency, str) or len(currency) != 3 or not currency.isascii() or not currency.isalpha() \
            or not currency.isupper():
        raise InvalidRequest("currency must be an ISO 4217 code of three upper-case letters, such as USD")
    description = body.get("description")
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS:
        raise InvalidRequest(f"description must be a string of at most {MAX_DESCRIPTION_CHARS} characters")
    return merchant_id, amount, currency, description


def _fingerprint(body: dict[str, Any]) -> str:
    fields = {name: body.get(name) for name in FINGERPRINT_FIELDS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


class _Unavailable(Exception):
    """Down: answered 503, and nothing is recorded."""


def _app_for(bank: SandboxBankServer) -> Litestar:
    """The HTTP API of one sandbox bank. Handlers that may wait (time_out_next) or take the
    state's lock run in worker threads (``sync_to_thread=True``), never on the event loop."""

    def available() -> None:
        if bank.down:
            raise _Unavailable

    @get("/v1/sandbox/counters", sync_to_thread=False)
    def counters() -> Response[Any]:
        return _answer(HTTPStatus.OK, bank.counters())

    def control(path: str, apply: Callable[[dict[str, Any]], None]) -> HTTPRouteHandler:
        @post(path, sync_to_thread=False, name=path)
        def set_control(body: bytes) -> Response[Any]:
            try:
                apply(_json_object(body))
            except (KeyError, TypeError, ValueError) as error:
                raise InvalidRequest(f"{type(error).__name__}: {error}") from None
            return _answer(HTTPStatus.OK, bank.controls())

        return set_control

    # ``path``, not ``str``: a key with a slash arrives percent-encoded and uvicorn decodes it.
    @get("/v1/transfers/{key:path}", sync_to_thread=True)
    def transfer_status(key: str) -> Response[Any]:
        available()
        return _answer(*bank.transfer_status(key.removeprefix("/")))

    @post("/v1/transfers", sync_to_thread=True)
    def transfer(body: bytes, headers: Headers) -> Response[Any]:
        request = _json_object(body)  # a body that is not a JSON object is refused before down
        available()
        key = (headers.get("Idempotency-Key") or "").strip()
        if not key or len(key) > MAX_KEY_CHARS:
            return _answer(HTTPStatus.BAD_REQUEST, _error(
                "idempotency_key_required", f"an Idempotency-Key header (1-{MAX_KEY_CHARS} chars) is required"
            ))
        status, answer, replayed = bank.handle_transfer(key, request)
        return _answer(status, answer, {"Idempotent-Replayed": "true"} if replayed else {})

    def invalid(_: Request[Any, Any, Any], error: InvalidRequest) -> Response[Any]:
        return _answer(HTTPStatus.BAD_REQUEST, _error("invalid_request", str(error)))

    def unavailable(_: Request[Any, Any, Any], __: _Unavailable) -> Response[Any]:
        return _answer(HTTPStatus.SERVICE_UNAVAILABLE, _error("unavailable", "the sandbox bank is down"))

    def http_error(request: Request[Any, Any, Any], error: HTTPException) -> Response[Any]:
        if error.status_code == HTTPStatus.REQUEST_ENTITY_TOO_LARGE:  # as the processor does: a bad request
            return invalid(request, InvalidRequest(f"the body is larger than {MAX_BODY_BYTES} bytes"))
        if error.status_code == HTTPStatus.NOT_FOUND:
            return _answer(HTTPStatus.NOT_FOUND, _error("not_found", f"no route {request.url.path}"))
        return _answer(error.status_code, _error(HTTPStatus(error.status_code).phrase.lower().replace(" ", "_"),
                                                 str(error.detail)))

    def crashed(request: Request[Any, Any, Any], error: Exception) -> Response[Any]:
        _log.exception("sandbox bank failed on %s", request.url.path)
        return _answer(HTTPStatus.INTERNAL_SERVER_ERROR, _error("internal_error", f"{type(error).__name__}"))

    return Litestar(
        route_handlers=[
            counters,
            control("/v1/sandbox/fail-next", lambda body: bank.fail_next(body["n"])),
            control("/v1/sandbox/time-out-next", lambda body: bank.time_out_next(body["n"])),
            control("/v1/sandbox/reject-account", lambda body: bank.reject_account(_merchant_id(body))),
            control("/v1/sandbox/down", lambda body: bank.set_down(bool(body["down"]))),
            transfer_status,
            transfer,
        ],
        exception_handlers={
            InvalidRequest: invalid, _Unavailable: unavailable, HTTPException: http_error, Exception: crashed,
        },
        request_max_body_size=MAX_BODY_BYTES,
        # The host process (a test run, `echotransact run`) keeps its own logging as it is.
        logging_config=None,
        openapi_config=None,
        debug=False,
    )


def _merchant_id(body: dict[str, Any]) -> str:
    value = body["merchant_id"]
    if not isinstance(value, str) or not value:
        raise ValueError("merchant_id must be a non-empty string")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a sandbox bank over HTTP.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed at start)")
    parser.add_argument("--timeout-delay-s", type=float, default=5.0,
                        help="how late a transfer chosen by time-out-next is answered")
    args = parser.parse_args(argv)
    server = SandboxBankServer(args.host, args.port, timeout_delay_s=args.timeout_delay_s)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    url = server.start()
    print(f"sandbox bank listening on {url}", flush=True)
    try:
        stop.wait()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

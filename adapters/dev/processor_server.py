"""A sandbox payment processor running as a real local HTTP service, so the ledger's processor
client, retries, circuit breaker and failover are exercised over real sockets.

Run two of them as primary and secondary::

    python -m adapters.dev.processor_server --name primary --port 8101
    python -m adapters.dev.processor_server --name secondary --port 8102

Test cards, chosen by the card's last four digits: adapters/dev/test_cards.py (the table the
in-process adapters/dev/sandbox_processor.py uses too). Over HTTP, the 0119 card's answer comes
only after ``timeout_card_delay_s`` (longer than any sane client timeout), and the first
``server_error_attempts`` requests with a 0259 card's key are answered 500.

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
    POST /v1/sandbox/notifications   {"notify_url"?, "secret"?}: where notifications go, what signs them
    GET  /v1/sandbox/notifications   every notification sent, with the answers it got (never the secret)
    POST /v1/sandbox/disputes  {capture_reference, reason?, amount_minor?, due_in_days?}: a dispute on a
                               capture it recorded (404 if unknown), notified as dispute.opened
    POST /v1/sandbox/disputes/{dispute_id}/ruling  {"outcome": "won"|"lost"}: dispute.won or dispute.lost
    POST /v1/sandbox/early-fraud-warnings  {capture_reference}: an early_fraud_warning

Notifications (adapters/processors/notifications.py: the body, and the ``Processor-Signature``
header signed with the first of the processor's secrets) go to ``notify_url`` from a background
thread, retried with exponential backoff and the same event id until an answer of 2xx, or of
4xx other than 404 and 429 (a refusal retrying cannot change), for at most NOTIFY_ATTEMPTS
attempts. A ruling carries the dispute's reference, amount and reason too, so a receiver can
apply it even when it arrives before the dispute.opened it follows.

A small Litestar app served by uvicorn, in a thread of the calling process (tests read its
counters and stop it) or as a process of its own (the command above). Every answer says
``Connection: close``: a stopped server then refuses the next call at once, instead of leaving
clients a kept-alive connection that breaks mid-request (which reads as a timeout, not as
"refused"). Listens on loopback by default and has no authentication: a development and test
tool only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from http import HTTPStatus
from typing import Any

import httpx
from litestar import Litestar, Request, Response, get, post
from litestar.datastructures import Headers
from litestar.exceptions import HTTPException
from litestar.handlers import HTTPRouteHandler

from adapters.backoff import EQUAL_JITTER, backoff_s
from adapters.dev.http_service import ThreadedHttpService
from adapters.dev.test_cards import DECLINES, SERVER_ERROR_LAST4, TIMEOUT_LAST4
from adapters.processors.notifications import SIGNATURE_HEADER, event_body, signature_header
from application.disputes import DISPUTE_LOST, DISPUTE_OPENED, DISPUTE_WON, EARLY_FRAUD_WARNING, ProcessorEvent

_log = logging.getLogger(__name__)

AUTHORIZATION_LIFETIME = timedelta(days=7)
# The sandbox's fee on a capture, as providers charge: 1.9% plus 20 minor units.
SETTLEMENT_FEE_BPS, SETTLEMENT_FEE_FIXED_MINOR = 190, 20


def settlement_fee(gross_minor: int) -> int:
    return round(gross_minor * SETTLEMENT_FEE_BPS / 10_000) + SETTLEMENT_FEE_FIXED_MINOR

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


# Notifications: attempts before giving up, and the backoff between them (doubling from the base).
NOTIFY_ATTEMPTS = 10
NOTIFY_BACKOFF_BASE_S, NOTIFY_BACKOFF_CAP_S = 0.5, 60.0
NOTIFY_TIMEOUT_S = 10.0
RULINGS = {"won": DISPUTE_WON, "lost": DISPUTE_LOST}


class InvalidRequest(Exception):
    """The request body is malformed; answered 400."""


class UnknownTransaction(LookupError):
    """No capture (or dispute) with that reference was recorded here; answered 404."""


@dataclass
class Notification:
    """One delivery of a notification: the event, every answer (an HTTP status, or the name of
    the error that stood for one) and how it ended: pending, delivered, refused (a 4xx retrying
    cannot change), gave_up (NOTIFY_ATTEMPTS tried), stopped (the sandbox stopped first)."""

    event_id: str
    type: str
    body: bytes
    answers: list[int | str] = field(default_factory=list)
    outcome: str = "pending"

    def as_json(self) -> dict[str, Any]:
        return {"event_id": self.event_id, "type": self.type, "body": json.loads(self.body),
                "answers": list(self.answers), "outcome": self.outcome}


@dataclass
class _Dispute:
    dispute_id: str
    capture_reference: str
    amount_minor: int
    currency: str
    reason: str
    due_by: datetime
    status: str = "open"  # open, won or lost
    evidence: dict[str, str] | None = None  # what the merchant submitted (the first time: by key)


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


@dataclass(frozen=True)
class _Transaction:
    """A capture or refund, as its day's settlement report lists it (gross signed: money back
    to the card holder is negative)."""

    reference: str
    kind: str
    gross_minor: int
    currency: str
    day: date


@dataclass
class _Misbehaviour:
    """What a test told the settlement reports to get wrong."""

    dropped: set[str] = field(default_factory=set)
    changed: set[str] = field(default_factory=set)
    moved: set[str] = field(default_factory=set)
    unknown_lines: int = 0
    deposit_off_by: int = 0
    # Days closed early (a day is closed anyway once it is over, by this machine's UTC clock).
    closed_days: set[date] = field(default_factory=set)


@dataclass
class _Ledger:
    """The sandbox's in-memory state; every access holds ``SandboxProcessorServer._lock``."""

    transactions: list[_Transaction] = field(default_factory=list)
    misbehaviour: _Misbehaviour = field(default_factory=_Misbehaviour)
    answers: dict[str, _Answer] = field(default_factory=dict)
    authorizations: dict[str, _Authorization] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)
    money_movements: dict[str, int] = field(default_factory=dict)
    disputes: dict[str, _Dispute] = field(default_factory=dict)
    events: dict[str, ProcessorEvent] = field(default_factory=dict)  # every notification's event, by id
    notifications: list[Notification] = field(default_factory=list)


class SandboxProcessorServer(ThreadedHttpService):
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
        notify_url: str | None = None,
        secret: str | None = None,
        notify_backoff_base_s: float = NOTIFY_BACKOFF_BASE_S,
    ) -> None:
        self.name = name
        self.notify_url = notify_url
        self._secret = secret
        self.notify_backoff_base_s = notify_backoff_base_s
        self._senders: list[threading.Thread] = []
        super().__init__(host, port)
        self.timeout_card_delay_s = timeout_card_delay_s
        self.server_error_attempts = server_error_attempts
        self._latency_ms = max(0, int(latency_ms))
        self._down = False
        self._lock = threading.Lock()
        self._state = _Ledger()
        self._closed = threading.Event()  # set by stop(): notifications still retrying give up

    # -- lifecycle (adapters/dev/http_service.py) ------------------------------------------------

    @property
    def _thread_name(self) -> str:  # type: ignore[override]
        return f"sandbox-processor-{self.name}"

    def _app(self) -> Litestar:
        return _app_for(self)

    def start(self) -> str:
        self._closed.clear()
        return super().start()

    def stop(self) -> None:
        """Also ends the retries of notifications still being sent."""
        self._closed.set()
        super().stop()

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

    # -- notifications: disputes and early fraud warnings ----------------------------------------

    def configure_notifications(self, *, notify_url: str | None = None, secret: str | None = None) -> None:
        """Where notifications go from now on (retries in flight included), and what signs them."""
        if notify_url is not None:
            self.notify_url = notify_url
        if secret is not None:
            self._secret = secret

    @property
    def secret(self) -> str | None:
        return self._secret

    def open_dispute(self, capture_reference: str, *, reason: str = "fraudulent", amount_minor: int | None = None,
                     due_in_days: int = 7, send: bool = True) -> dict[str, Any]:
        """The card holder disputes a capture recorded here (all of it, or ``amount_minor``):
        notified as dispute.opened. ``send=False`` records the event without sending it (a test
        then ``deliver``s it when it likes, e.g. after the ruling)."""
        if not reason or not isinstance(reason, str):
            raise InvalidRequest("reason must be a non-empty string")
        if isinstance(due_in_days, bool) or not isinstance(due_in_days, int) or due_in_days < 0:
            raise InvalidRequest("due_in_days must be a whole number of days, 0 or more")
        now = datetime.now(UTC)
        with self._lock:
            capture = self._capture(capture_reference)
            amount = capture.gross_minor if amount_minor is None else amount_minor
            if isinstance(amount, bool) or not isinstance(amount, int) or not 0 < amount <= capture.gross_minor:
                raise InvalidRequest(f"amount_minor must be between 1 and the capture's {capture.gross_minor}")
            dispute = _Dispute(f"{self.name}_dp_{uuid.uuid4().hex[:16]}", capture_reference, amount,
                               capture.currency, reason, now + timedelta(days=due_in_days))
            self._state.disputes[dispute.dispute_id] = dispute
            event = self._record_event(DISPUTE_OPENED, now, dispute)
        if send:
            self.deliver(event.event_id)
        return {**self._dispute_json(dispute), "event_id": event.event_id}

    def take_evidence(self, dispute_id: str, evidence: Any) -> dict[str, Any]:
        """The merchant's evidence for a dispute (the first submission counts: a repeat with the
        same idempotency key is answered the same; the ruling is the test's to make)."""
        if not isinstance(evidence, dict) or not all(isinstance(v, str) for v in evidence.values()):
            raise InvalidRequest("evidence must be an object of text fields")
        with self._lock:
            dispute = self._state.disputes.get(dispute_id)
            if dispute is None:
                raise UnknownTransaction(f"no dispute {dispute_id!r} at processor {self.name}")
            if dispute.evidence is None:
                dispute.evidence = dict(evidence)
            return self._dispute_json(dispute)

    def evidence_of(self, dispute_id: str) -> dict[str, str] | None:
        with self._lock:
            dispute = self._state.disputes.get(dispute_id)
            return None if dispute is None or dispute.evidence is None else dict(dispute.evidence)

    def rule_dispute(self, dispute_id: str, outcome: str, *, send: bool = True) -> dict[str, Any]:
        """The card network's ruling on a dispute: ``won`` (the merchant keeps the money) or ``lost``."""
        if outcome not in RULINGS:
            raise InvalidRequest(f"outcome must be one of {', '.join(RULINGS)}")
        with self._lock:
            dispute = self._state.disputes.get(dispute_id)
            if dispute is None:
                raise UnknownTransaction(f"no dispute {dispute_id!r} at processor {self.name}")
            if dispute.status != "open":
                raise InvalidRequest(f"dispute {dispute_id!r} was already {dispute.status}")
            dispute.status = outcome
            event = self._record_event(RULINGS[outcome], datetime.now(UTC), dispute)
        if send:
            self.deliver(event.event_id)
        return {**self._dispute_json(dispute), "event_id": event.event_id}

    def early_fraud_warning(self, capture_reference: str, *, send: bool = True) -> dict[str, Any]:
        """The card issuer reports the capture as likely fraud (a dispute may follow)."""
        with self._lock:
            capture = self._capture(capture_reference)
            event = ProcessorEvent(
                event_id=f"evt_{uuid.uuid4().hex}", type=EARLY_FRAUD_WARNING, created_at=datetime.now(UTC),
                payment_reference=capture_reference, reason="fraudulent", amount_minor=capture.gross_minor,
                currency=capture.currency)
            self._state.events[event.event_id] = event
        if send:
            self.deliver(event.event_id)
        return {"event_id": event.event_id, "capture_reference": capture_reference}

    def deliver(self, event_id: str) -> Notification:
        """Send a recorded event (again: the same id and body, signed anew) from a background
        thread, retried until answered; the returned record fills in as it goes."""
        with self._lock:
            event = self._state.events.get(event_id)
            if event is None:
                raise UnknownTransaction(f"no event {event_id!r} at processor {self.name}")
            record = Notification(event.event_id, event.type, event_body(event))
            self._state.notifications.append(record)
            sender = threading.Thread(target=self._send, args=(record,), daemon=True,
                                      name=f"sandbox-processor-{self.name}-notify")
            self._senders.append(sender)
        sender.start()
        return record

    def notifications(self) -> list[dict[str, Any]]:
        """Every delivery so far, oldest first, with its answers (for tests)."""
        with self._lock:
            return [n.as_json() for n in self._state.notifications]

    def wait_for_notifications(self, timeout_s: float = 30.0) -> bool:
        """Wait until every delivery started so far has ended; False if some still run."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            senders = list(self._senders)
        for sender in senders:
            sender.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._senders = [s for s in self._senders if s.is_alive()]
            return not self._senders

    def _capture(self, reference: str) -> _Transaction:
        capture = next((t for t in self._state.transactions if t.kind == "capture" and t.reference == reference),
                       None)
        if capture is None:
            raise UnknownTransaction(f"no capture {reference!r} at processor {self.name}")
        return capture

    def _record_event(self, kind: str, created_at: datetime, dispute: _Dispute) -> ProcessorEvent:
        """Every dispute event carries the whole dispute, so it can be applied in any order."""
        event = ProcessorEvent(
            event_id=f"evt_{uuid.uuid4().hex}", type=kind, created_at=created_at,
            payment_reference=dispute.capture_reference, dispute_id=dispute.dispute_id, reason=dispute.reason,
            amount_minor=dispute.amount_minor, currency=dispute.currency, due_by=dispute.due_by)
        self._state.events[event.event_id] = event
        return event

    @staticmethod
    def _dispute_json(dispute: _Dispute) -> dict[str, Any]:
        return {"dispute_id": dispute.dispute_id, "capture_reference": dispute.capture_reference,
                "amount_minor": dispute.amount_minor, "currency": dispute.currency, "reason": dispute.reason,
                "due_by": dispute.due_by.isoformat(), "status": dispute.status}

    def _send(self, record: Notification) -> None:
        """One delivery: POST until a 2xx, or a 4xx other than 404/429, or NOTIFY_ATTEMPTS."""
        with httpx.Client(timeout=NOTIFY_TIMEOUT_S, follow_redirects=False) as client:
            for attempt in range(NOTIFY_ATTEMPTS):
                if attempt and self._closed.wait(backoff_s(attempt - 1, base_s=self.notify_backoff_base_s,
                                                           cap_s=NOTIFY_BACKOFF_CAP_S, jitter=EQUAL_JITTER)):
                    self._noted(record, outcome="stopped")
                    return
                url, secret = self.notify_url, self._secret
                if not url or not secret:
                    self._noted(record, "not_configured")
                    continue
                try:
                    response = client.post(url, content=record.body, headers={
                        "Content-Type": "application/json", SIGNATURE_HEADER: signature_header(secret, record.body)})
                except httpx.HTTPError as error:
                    self._noted(record, type(error).__name__)
                    continue
                status = response.status_code
                if 200 <= status < 300:
                    self._noted(record, status, "delivered")
                    return
                if 400 <= status < 500 and status not in (404, 429):
                    self._noted(record, status, "refused")
                    return
                self._noted(record, status)
        self._noted(record, outcome="gave_up")

    def _noted(self, record: Notification, answer: int | str | None = None, outcome: str | None = None) -> None:
        with self._lock:
            if answer is not None:
                record.answers.append(answer)
            if outcome is not None:
                record.outcome = outcome

    # -- the processor -------------------------------------------------------------------------

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

    # -- settlement reports ----------------------------------------------------------------------

    def misbehave(self, *, drop: tuple[str, ...] = (), change: tuple[str, ...] = (), move: tuple[str, ...] = (),
                  unknown_lines: int = 0, deposit_off_by: int = 0) -> None:
        """From now on the settlement reports leave out the lines of ``drop``, report ``change``
        100 minor units too high, list ``move`` on the next day, add ``unknown_lines`` lines of
        transactions nobody sent, and give each deposit a total ``deposit_off_by`` wrong."""
        with self._lock:
            wrong = self._state.misbehaviour
            wrong.dropped.update(drop)
            wrong.changed.update(change)
            wrong.moved.update(move)
            wrong.unknown_lines += unknown_lines
            wrong.deposit_off_by += deposit_off_by

    def close_day(self, day: date) -> None:
        """Close ``day`` now, as a processor does at its cut-off: its reports become final."""
        with self._lock:
            self._state.misbehaviour.closed_days.add(day)

    def settlement_report(self, day: date, currency: str) -> dict[str, Any]:
        """The day's settlement report in one currency, as providers serve them: one line per
        capture and refund with gross, fee (SETTLEMENT_FEE on captures) and net, and the deposit
        that pays the day's net."""
        with self._lock:
            transactions = list(self._state.transactions)
            wrong = self._state.misbehaviour
            dropped, changed, moved = set(wrong.dropped), set(wrong.changed), set(wrong.moved)
            unknown_lines, deposit_off_by = wrong.unknown_lines, wrong.deposit_off_by
            final = day < datetime.now(UTC).date() or day in wrong.closed_days
        deposit_id = f"{self.name}-deposit-{day.isoformat()}-{currency}"
        listed = [(t.reference, t.kind, t.gross_minor + (100 if t.reference in changed else 0), t.day)
                  for t in transactions
                  if t.currency == currency and t.reference not in dropped
                  and t.day + timedelta(days=1 if t.reference in moved else 0) == day]
        listed += [(f"{self.name}_capt_stranger{n}", "capture", 1_000 + n, day) for n in range(unknown_lines)]
        lines: list[dict[str, Any]] = []
        total = deposit_off_by
        for reference, kind, gross, happened in listed:
            fee = settlement_fee(gross) if kind == "capture" else 0
            total += gross - fee
            lines.append({"reference": reference, "type": kind, "gross": gross, "fee": fee, "net": gross - fee,
                          "deposit_id": deposit_id, "transaction_date": happened.isoformat()})
        return {"processor": self.name, "date": day.isoformat(), "currency": currency, "final": final, "lines": lines,
                "deposits": [{"deposit_id": deposit_id, "total": total}] if lines else []}

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
        answer = self._approved(operation, key, fingerprint, amount_minor=amount, currency=currency)
        self._state.transactions.append(_Transaction(
            answer.body["reference"], operation, amount if operation == "capture" else -amount, currency,
            datetime.now(UTC).date()))
        return answer

    def _authorize(self, key: str, body: dict[str, Any], fingerprint: str) -> _Answer:
        amount, currency = _amount(body), _currency(body)
        _text(body, "card_token")
        _text(body, "merchant_id")
        last4 = _text(body, "card_last4")
        if len(last4) != 4 or not last4.isdigit():
            raise InvalidRequest("card_last4 must be four digits")
        if last4 in DECLINES:
            code, message = DECLINES[last4]
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


class _Unavailable(Exception):
    """Down (after the latency): answered 503, and nothing is recorded."""


def _answer(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response[Any]:
    # Connection: close on every answer: see the module docstring.
    return Response(body, status_code=status, headers={"Connection": "close", **(headers or {})})


def _json_object(body: bytes) -> dict[str, Any]:
    if len(body) > MAX_BODY_BYTES:
        raise InvalidRequest(f"the body is larger than {MAX_BODY_BYTES} bytes")
    try:
        value = json.loads(body or b"{}")
    except ValueError:
        raise InvalidRequest("the body is not JSON") from None
    if not isinstance(value, dict):
        raise InvalidRequest("the body must be a JSON object")
    return value


def _app_for(sandbox: SandboxProcessorServer) -> Litestar:
    """The HTTP API of one sandbox. Handlers that may wait (latency, the timeout card) or take
    the state's lock run in worker threads (``sync_to_thread=True``), never on the event loop."""

    def available() -> None:
        sandbox.pause(sandbox.latency_ms / 1000)
        if sandbox.down:
            raise _Unavailable

    @get("/v1/sandbox/counters", sync_to_thread=False)
    def counters() -> Response[Any]:
        return _answer(HTTPStatus.OK, sandbox.counters())

    def control(path: str, apply: Callable[[dict[str, Any]], None]) -> HTTPRouteHandler:
        @post(path, sync_to_thread=False, name=path)
        def set_control(body: bytes) -> Response[Any]:
            try:
                apply(_json_object(body))
            except (KeyError, TypeError, ValueError) as error:
                raise InvalidRequest(str(error)) from None
            return _answer(HTTPStatus.OK, {"latency_ms": sandbox.latency_ms, "down": sandbox.down})

        return set_control

    @get("/v1/settlements/{day:str}", sync_to_thread=True)
    def settlements(day: str, currency: str) -> Response[Any]:
        available()
        try:
            when = date.fromisoformat(day)
        except ValueError:
            raise InvalidRequest(f"the day must be YYYY-MM-DD, not {day!r}") from None
        return _answer(HTTPStatus.OK, sandbox.settlement_report(when, _currency({"currency": currency})))

    # ``path``, not ``str``: a key with a slash arrives percent-encoded and uvicorn decodes it.
    @get("/v1/operations/{key:path}", sync_to_thread=True)
    def operation_status(key: str) -> Response[Any]:
        available()
        return _answer(*sandbox.operation_status(key.removeprefix("/")))

    def operation(path: str, name: str) -> HTTPRouteHandler:
        @post(path, sync_to_thread=True, name=name)
        def handle(body: bytes, headers: Headers) -> Response[Any]:
            request = _json_object(body)  # a malformed body is refused before latency or down
            available()
            key = (headers.get("Idempotency-Key") or "").strip()
            if not key or len(key) > 255:
                return _answer(HTTPStatus.BAD_REQUEST, _error(
                    "idempotency_key_required", "an Idempotency-Key header (1-255 chars) is required"
                ))
            status, answer = sandbox.handle_operation(name, key, request)
            replayed = {"Idempotent-Replayed": "true"} if answer.pop("replayed", False) else {}
            return _answer(status, answer, replayed)

        return handle

    @get("/v1/sandbox/notifications", sync_to_thread=False)
    def notifications() -> Response[Any]:
        return _answer(HTTPStatus.OK, {"notify_url": sandbox.notify_url, "secret_set": sandbox.secret is not None,
                                       "data": sandbox.notifications()})

    @post("/v1/sandbox/notifications", sync_to_thread=False)
    def configure_notifications(body: bytes) -> Response[Any]:
        request = _json_object(body)
        url, secret = request.get("notify_url"), request.get("secret")
        if url is not None and (not isinstance(url, str) or not url.startswith(("http://", "https://"))):
            raise InvalidRequest("notify_url must be an http(s):// URL")
        if secret is not None and (not isinstance(secret, str) or not secret):
            raise InvalidRequest("secret must be a non-empty string")
        sandbox.configure_notifications(notify_url=url, secret=secret)
        return _answer(HTTPStatus.OK, {"notify_url": sandbox.notify_url, "secret_set": sandbox.secret is not None})

    @post("/v1/sandbox/disputes", sync_to_thread=True)
    def open_dispute(body: bytes) -> Response[Any]:
        request = _json_object(body)
        options = {name: request[name] for name in ("reason", "amount_minor", "due_in_days") if name in request}
        return _answer(HTTPStatus.OK, sandbox.open_dispute(_text(request, "capture_reference"), **options))

    @post("/v1/sandbox/disputes/{dispute_id:str}/ruling", sync_to_thread=True)
    def rule_dispute(dispute_id: str, body: bytes) -> Response[Any]:
        return _answer(HTTPStatus.OK, sandbox.rule_dispute(dispute_id, _text(_json_object(body), "outcome")))

    # The processor's API for a merchant's answer (adapters/processors/client.py submit_dispute_evidence).
    @post("/v1/disputes/{dispute_id:str}/evidence", sync_to_thread=True)
    def dispute_evidence(dispute_id: str, body: bytes) -> Response[Any]:
        available()
        return _answer(HTTPStatus.OK, sandbox.take_evidence(dispute_id, _json_object(body).get("evidence")))

    @post("/v1/sandbox/early-fraud-warnings", sync_to_thread=True)
    def early_fraud_warning(body: bytes) -> Response[Any]:
        return _answer(HTTPStatus.OK, sandbox.early_fraud_warning(_text(_json_object(body), "capture_reference")))

    def unknown(_: Request[Any, Any, Any], error: UnknownTransaction) -> Response[Any]:
        return _answer(HTTPStatus.NOT_FOUND, _error("not_found", str(error.args[0])))

    def invalid(_: Request[Any, Any, Any], error: InvalidRequest) -> Response[Any]:
        return _answer(HTTPStatus.BAD_REQUEST, _error("invalid_request", str(error)))

    def unavailable(_: Request[Any, Any, Any], __: _Unavailable) -> Response[Any]:
        return _answer(HTTPStatus.SERVICE_UNAVAILABLE, _error("unavailable", f"{sandbox.name} is down"))

    def http_error(request: Request[Any, Any, Any], error: HTTPException) -> Response[Any]:
        if error.status_code == HTTPStatus.REQUEST_ENTITY_TOO_LARGE:  # as it always was: a bad request
            return invalid(request, InvalidRequest(f"the body is larger than {MAX_BODY_BYTES} bytes"))
        if error.status_code == HTTPStatus.NOT_FOUND:
            return _answer(HTTPStatus.NOT_FOUND, _error("not_found", f"no route {request.url.path}"))
        return _answer(error.status_code, _error(HTTPStatus(error.status_code).phrase.lower().replace(" ", "_"),
                                                 str(error.detail)))

    def crashed(request: Request[Any, Any, Any], error: Exception) -> Response[Any]:
        _log.exception("sandbox processor %s failed on %s", sandbox.name, request.url.path)
        return _answer(HTTPStatus.INTERNAL_SERVER_ERROR, _error("internal_error", f"{type(error).__name__}"))

    return Litestar(
        route_handlers=[
            counters,
            control("/v1/sandbox/latency", lambda body: sandbox.set_latency(int(body["latency_ms"]))),
            control("/v1/sandbox/down", lambda body: sandbox.set_down(bool(body["down"]))),
            control("/v1/sandbox/close-day", lambda body: sandbox.close_day(date.fromisoformat(str(body["day"])))),
            operation_status,
            settlements,
            notifications,
            configure_notifications,
            open_dispute,
            rule_dispute,
            dispute_evidence,
            early_fraud_warning,
            *(operation(path, name) for path, name in OPERATIONS.items()),
        ],
        exception_handlers={
            InvalidRequest: invalid, UnknownTransaction: unknown, _Unavailable: unavailable, HTTPException: http_error,
            Exception: crashed,
        },
        request_max_body_size=MAX_BODY_BYTES,
        # The host process (a test run, `echotransact run`) keeps its own logging as it is.
        logging_config=None,
        openapi_config=None,
        debug=False,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a sandbox payment processor over HTTP.")
    parser.add_argument("--name", default="sandbox", help="the processor's name (primary, secondary)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed at start)")
    parser.add_argument("--latency-ms", type=int, default=0)
    parser.add_argument("--timeout-card-delay-s", type=float, default=5.0)
    parser.add_argument("--notify-url", help="where notifications go, e.g. http://127.0.0.1:8000/v1/processor-events/"
                        "primary (or later: POST /v1/sandbox/notifications)")
    args = parser.parse_args(argv)
    # The signing secret from the environment, not the command line (which other users can read).
    server = SandboxProcessorServer(
        args.name, args.host, args.port, args.latency_ms, timeout_card_delay_s=args.timeout_card_delay_s,
        notify_url=args.notify_url, secret=os.environ.get("SANDBOX_PROCESSOR_SECRET") or None,
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

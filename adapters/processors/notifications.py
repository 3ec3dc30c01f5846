"""Processors' signed notifications (disputes, early fraud warnings): the signature scheme, both
sides of it, and the body read into the ledger's ``ProcessorEvent``.

A processor signs each notification with a secret it shares with us, one or more per processor
(more while a secret rotates: any current one verifies, a sender signs with the first)::

    Processor-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>

with several ``v1`` while the processor itself rotates. We refuse a ``t`` more than
``TOLERANCE_S`` from our clock either way, so a captured request cannot be replayed later (a
replay inside the window is the same event id, which the ledger answers once). The scheme is
the processors' contract, not ours: it looks like our outgoing webhooks' today
(adapters/notifications/webhooks.py) but each side follows its own party, so they do not share code.

The body (times ISO 8601 with a zone, amounts integer minor units)::

    {"id": "evt_...", "type": "dispute.opened", "created": "2026-01-02T03:04:05Z",
     "data": {"payment_reference": "primary_capt_...", "dispute_id": "dp_...", "reason": "fraudulent",
              "amount": 2500, "currency": "USD", "due_by": "2026-01-09T03:04:05Z"}}
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets as _secrets
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from application.disputes import DISPUTE_OPENED, PROCESSOR_EVENT_TYPES, ProcessorEvent

__all__ = [
    "SIGNATURE_HEADER", "TOLERANCE_S", "InvalidSignature", "MalformedNotification", "event_body", "parse_event",
    "sign", "signature_header", "verify",
]

SIGNATURE_HEADER = "Processor-Signature"
TOLERANCE_S = 300
# A header longer than this, or with more signatures, is not one a processor sends: refused
# before any MAC is computed.
MAX_HEADER_CHARS = 2_048
MAX_SIGNATURES = 8
MAX_TEXT_CHARS = 255
_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")
_CURRENCY = re.compile(r"[A-Z]{3}")
DISPUTE_TYPES = tuple(t for t in PROCESSOR_EVENT_TYPES if t.startswith("dispute."))


class InvalidSignature(Exception):
    """The notification's signature is missing, malformed, stale or matches no secret. ``reason``
    is for our log only: the sender is told nothing more than "invalid signature"."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MalformedNotification(ValueError):
    """A signed body that is not a notification we can read; ``field`` names the first bad one."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


# -- signatures -----------------------------------------------------------------------------------


def _mac(secret: str, timestamp: int, body: bytes) -> bytes:
    return hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest().encode()


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The hex HMAC of one body at one unix time under one secret (a ``v1`` value)."""
    return _mac(secret, timestamp, body).decode()


def signature_header(secrets: str | Sequence[str], body: bytes, *, now: float | None = None) -> str:
    """The ``Processor-Signature`` value a sender puts on ``body``: signed now, with the first
    secret (the current one while a rotation is under way)."""
    secret = secrets if isinstance(secrets, str) else secrets[0]
    timestamp = int(time.time() if now is None else now)
    return f"t={timestamp},v1={sign(secret, body, timestamp)}"


def _parse_header(header: str | None) -> tuple[int, list[bytes]]:
    if not header:
        raise InvalidSignature("missing")
    if len(header) > MAX_HEADER_CHARS:
        raise InvalidSignature("header too long")
    timestamps: list[str] = []
    candidates: list[bytes] = []
    for part in header.split(","):
        key, sep, value = (x.strip() for x in part.partition("="))
        if not sep:
            raise InvalidSignature("malformed")
        if key == "t":
            timestamps.append(value)
        elif key == "v1":
            # Only well-formed MACs are compared: anything else (and anything not ASCII, which
            # compare_digest refuses) cannot be one of ours.
            if not _HEX_SHA256.fullmatch(value):
                raise InvalidSignature("malformed v1")
            candidates.append(value.encode())
        # Other schemes (v0, a future v2) are ignored, as senders expect.
    if len(timestamps) != 1 or not timestamps[0].isascii() or not timestamps[0].isdigit() \
            or len(timestamps[0]) > 12:
        raise InvalidSignature("malformed t")
    if not candidates:
        raise InvalidSignature("no v1")
    if len(candidates) > MAX_SIGNATURES:
        raise InvalidSignature("too many signatures")
    return int(timestamps[0]), candidates


def verify(header: str | None, body: bytes, secrets: Sequence[str], *, now: float | None = None,
           tolerance_s: int = TOLERANCE_S) -> None:
    """Returns if ``header`` signs ``body`` with one of ``secrets`` (any current secret of the
    processor) at a time within ``tolerance_s`` of ``now``; raises InvalidSignature otherwise.

    An unknown processor (no secrets) is refused after the same work as a wrong secret, so the
    time of the answer does not tell which processor names exist."""
    timestamp, candidates = _parse_header(header)
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        raise InvalidSignature("stale timestamp")
    keys = list(secrets) or [_secrets.token_hex(32)]
    matched = False
    for secret in keys:
        expected = _mac(secret, timestamp, body)
        for candidate in candidates:
            matched |= hmac.compare_digest(expected, candidate)
    if not secrets:
        raise InvalidSignature("unknown processor")
    if not matched:
        raise InvalidSignature("no signature matches")


# -- bodies ---------------------------------------------------------------------------------------


def _iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def event_body(event: ProcessorEvent) -> bytes:
    """The JSON body a processor sends for ``event`` (the sandbox's sender; ``parse_event``'s inverse)."""
    data: dict[str, Any] = {"payment_reference": event.payment_reference, "dispute_id": event.dispute_id,
                            "reason": event.reason, "amount": event.amount_minor, "currency": event.currency,
                            "due_by": _iso(event.due_by) if event.due_by else None}
    body = {"id": event.event_id, "type": event.type, "created": _iso(event.created_at), "data": data}
    return json.dumps(body, separators=(",", ":")).encode()


def _text(values: dict[str, Any], name: str, where: str, *, required: bool) -> str | None:
    value = values.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_TEXT_CHARS or "\x00" in value:
        raise MalformedNotification(where + name, f"a non-empty string of at most {MAX_TEXT_CHARS} characters")
    return value


def _time(values: dict[str, Any], name: str, where: str, *, required: bool) -> datetime | None:
    value = values.get(name)
    if value is None and not required:
        return None
    try:
        when = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise MalformedNotification(where + name, "an ISO 8601 time with a zone, e.g. 2026-01-02T03:04:05Z")
    return when


def parse_event(body: bytes) -> ProcessorEvent:
    """The notification in a (verified) body; MalformedNotification names the first bad field."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested too deeply
        raise MalformedNotification("body", "not a JSON object") from None
    if not isinstance(document, dict):
        raise MalformedNotification("body", "not a JSON object")
    event_id = _text(document, "id", "", required=True)
    kind = document.get("type")
    if kind not in PROCESSOR_EVENT_TYPES:
        raise MalformedNotification("type", "one of " + ", ".join(PROCESSOR_EVENT_TYPES))
    created_at = _time(document, "created", "", required=True)
    data = document.get("data")
    if not isinstance(data, dict):
        raise MalformedNotification("data", "a JSON object")
    payment_reference = _text(data, "payment_reference", "data.", required=True)
    dispute_id = _text(data, "dispute_id", "data.", required=kind in DISPUTE_TYPES)
    opened = kind == DISPUTE_OPENED
    reason = _text(data, "reason", "data.", required=opened)
    amount = data.get("amount")
    if amount is not None or opened:
        if not isinstance(amount, int) or isinstance(amount, bool) or not 0 < amount < 2**63:
            raise MalformedNotification("data.amount", "a positive whole number of minor units")
    currency = data.get("currency")
    if currency is not None or amount is not None:
        if not isinstance(currency, str) or not _CURRENCY.fullmatch(currency):
            raise MalformedNotification("data.currency", "an ISO 4217 code such as USD, with the amount")
    due_by = _time(data, "due_by", "data.", required=False)
    assert event_id is not None and created_at is not None and payment_reference is not None
    return ProcessorEvent(event_id=event_id, type=kind, created_at=created_at, payment_reference=payment_reference,
                          dispute_id=dispute_id, reason=reason, amount_minor=amount, currency=currency,
                          due_by=due_by)

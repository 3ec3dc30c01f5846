"""Webhooks: ledger events to the merchant's webhook URL and the session's callback URL, and the
platform's own events to the platform's webhook URL, signed, retried with exponential backoff,
dead-lettered past a horizon; and the order of a completed session into the merchant's commerce
backend (adapters/notifications/commerce.py).

Which events go where is one table, ``WEBHOOK_RULES``, by aggregate type: an aggregate type it has
no rule for is never delivered. A merchant's events (sessions, payments, payouts) go to the
merchant's webhook URL, and those of sessions and payments also to the session's callback URL. A
``reconciliation.reconciled`` with at least one discrepancy (domain/reconciliation.py
DISCREPANCIES) goes to ``ECHOTRANSACT_PLATFORM_WEBHOOK_URL``, as the same body as every webhook:
``{"id", "type", "created", "data"}``, ``data`` holding ``aggregate_id`` (the reconciliation),
``aggregate_type`` ("reconciliation"), ``merchant_id`` (null), ``processor``, ``day``, ``currency``,
``findings`` (every one, each with its ``outcome``) and ``deposits``. It is signed with the
platform's secret, ``webhook_secret(hash_key, PLATFORM_ID)``.

Two steps, each crash-safe:

* ``WebhookPlanner`` reads the outbox past its checkpoint (like ``ProjectionStore.catch_up``),
  remembers what later events need (merchant endpoints, sessions' orders, payments' sessions)
  and writes one ``webhook_deliveries`` row per event and endpoint, in the same transaction as
  its checkpoint. Rows are unique on (event_id, endpoint_url, kind): planning again is a no-op.
* ``WebhookDispatcher`` claims one due delivery at a time (``FOR UPDATE SKIP LOCKED``), POSTs it
  while holding the row lock, and records the outcome and the attempt in the same transaction.
  Two dispatchers never send one delivery at once. A crash after the POST and before the commit
  sends it again later, with the same ``EchoTransact-Event-Id`` (and, for an order, the same
  ``Idempotency-Key``), so the receiver drops the duplicate. Delivery is at least once, in no
  guaranteed order.

Every request is signed: ``EchoTransact-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret,
"<t>.<body>")>`` with the merchant's secret ``webhook_secret(hash_key, merchant_id, version)`` (the
platform's: ``platform_webhook_secret(hash_key)``). Secrets are derived, never stored, per version
of the merchant's secret (``Merchant.rotate_webhook_secret``; version 1 is the secret merchants had
before rotation existed). After a rotation, until the previous version's overlap ends, a request
carries two ``v1=`` signatures, the new secret's first, so a receiver verifies with either; the
dispatcher reads the version at each attempt from what the planner remembers of the merchant.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import httpx
import msgspec
import psycopg
import structlog
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import Counter
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from adapters import tracing
from adapters.backoff import backoff_s
from adapters.clock import SystemClock
from adapters.notifications.commerce import (
    CommerceBackend,
    CommerceOrder,
    HttpCommerceBackend,
    MissingIdempotencyKey,
    encode_order,
    post,
)
from adapters.notifications.destinations import UnsafeDestination, check_destination
from adapters.postgres.connection import ReconnectingConnection, listen_for_commits, wait_for_commit
from application.envelope import EventEnvelope
from application.hashing import keyed_hash
from application.masking import SECRET_FIELDS, mask_event_data
from application.ports import Clock
from domain.reconciliation import DISCREPANCIES

__all__ = [
    "EVENT_ID_HEADER", "PLATFORM_ID", "SIGNATURE_HEADER", "WEBHOOK_EVENT_TYPES", "WEBHOOK_RULES", "AttemptResult",
    "Delivery", "DeliveryKind", "DeliveryStatus", "DispatchOutcome", "PlanResult", "WebhookAdmin",
    "WebhookDispatcher", "WebhookPlanner", "WebhookRule", "event_body", "platform_webhook_secret", "run_webhooks",
    "sign", "signing_secrets", "verify_signature", "webhook_secret",
]

log = structlog.get_logger(__name__)

# Prometheus counters of this process (api/metrics.py); the queue's depth is a scrape-time gauge
# (adapters/postgres/metrics.py). Result: delivered, retry (failed, to be sent again), dead.
ATTEMPTS = Counter("echotransact_webhook_attempts_total", "Webhook and commerce-order delivery attempts, by kind "
                   "and result (delivered, retry, dead: a dead letter)", ["kind", "result"])

OpenEnvelope = Callable[[bytes], EventEnvelope]

# After a commit wakes the planner, it waits this long for more before it plans (a receiver
# hears of an event at most this much later).
PLAN_GATHER_S = 0.05


def _has_discrepancies(e: EventEnvelope) -> bool:
    return any(finding.get("outcome") in DISCREPANCIES for finding in e.data.get("findings") or ())


@dataclass(frozen=True)
class WebhookRule:
    """Which events of one aggregate type are delivered, and where: to the platform's webhook
    URL, or to the webhook URL of the merchant the event names (and, with ``session_callback``,
    to the callback URL of the session it belongs to, and a completed session's order to the
    merchant's commerce backend). ``when`` narrows the events further."""

    events: frozenset[str]
    to_platform: bool = False
    session_callback: bool = False
    when: Callable[[EventEnvelope], bool] | None = None

    def delivers(self, e: EventEnvelope) -> bool:
        return e.event_type in self.events and (self.when is None or self.when(e))


WEBHOOK_RULES: Mapping[str, WebhookRule] = {
    "payment_session": WebhookRule(frozenset({
        "payment_session.link_sent",
        "payment_session.code_verified",
        "payment_session.identity_verified",
        "payment_session.completed",
        "payment_session.expired",
        "payment_session.cancelled",
        "payment_session.sms_failed",
    }), session_callback=True),
    "payment": WebhookRule(frozenset({
        "payment.authorized",
        "payment.captured",
        "payment.refunded",
        "payment.voided",
        "payment.failed",
        "payment.fraud_warned",  # the issuer's early fraud warning: a dispute may follow
    }), session_callback=True),
    # A merchant's disputes: opened, updated (evidence, a reminder before the due date: change
    # "due_soon"), closed (won, lost, accepted, expired).
    "dispute": WebhookRule(frozenset({"dispute.opened", "dispute.updated", "dispute.closed"})),
    # A merchant's payouts: to its webhook URL like its payments, with no session to call back.
    "payout": WebhookRule(frozenset({"payout.paid", "payout.failed"})),
    # The platform's: a processor's day that did not match, for the people who chase it.
    "reconciliation": WebhookRule(frozenset({"reconciliation.reconciled"}), to_platform=True,
                                  when=_has_discrepancies),
}
WEBHOOK_EVENT_TYPES = frozenset(event_type for rule in WEBHOOK_RULES.values() for event_type in rule.events)

SIGNATURE_HEADER = "EchoTransact-Signature"
EVENT_ID_HEADER = "EchoTransact-Event-Id"
EVENT_TYPE_HEADER = "EchoTransact-Event-Type"
USER_AGENT = "EchoTransact-Webhooks/1"

# Keyed hashes are masked to "***" by mask_event_data; a receiver has no use for even that.
# Card tokens never reach a merchant: they are the platform's handle on the customer's card.
# A created event's originator_topic is the event library's name for our class: nobody's business.
# ``personal``: data sealed under the customer's key, of no use to a receiver (who gets the
# pseudonymous ``customer_id``), and never to be copied out of the event store.
_NEVER_SENT = SECRET_FIELDS | {"card_token", "originator_topic", "personal"}


class DeliveryKind:
    MERCHANT_WEBHOOK = "merchant_webhook"
    SESSION_CALLBACK = "session_callback"
    COMMERCE_ORDER = "commerce_order"
    PLATFORM_WEBHOOK = "platform_webhook"


class DeliveryStatus:
    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD = "dead"


# -- signing ------------------------------------------------------------------------------------


# The platform's own id where a delivery names whose secret signs it (webhook_deliveries.merchant_id):
# no merchant has it. `echotransact webhooks secret --merchant 00000000-0000-0000-0000-000000000000`
# prints the platform's secret.
PLATFORM_ID = UUID(int=0)


def webhook_secret(hash_key: bytes, merchant_id: UUID | str, version: int = 1) -> str:
    """The merchant's signing secret of this version, derived (never stored): the rotation's
    answer shows it once, and every dispatcher computes the same one from the hash key. Version
    1 is the secret of before rotation existed (its message has no version), so receivers that
    have it keep verifying; later versions add the version to the message."""
    if version < 1:
        raise ValueError(f"webhook secret versions start at 1, not {version}")
    if version == 1:
        return keyed_hash(hash_key, "webhook-secret", merchant_id)
    return keyed_hash(hash_key, "webhook-secret", merchant_id, version)


def signing_secrets(
    hash_key: bytes, merchant_id: UUID | str, version: int, previous_valid_until: datetime | None, now: datetime,
) -> list[str]:
    """The secrets a delivery is signed with now: the current version's, and the previous
    version's while its overlap lasts (``previous_valid_until`` is in the future)."""
    secrets = [webhook_secret(hash_key, merchant_id, version)]
    if version > 1 and previous_valid_until is not None and now < previous_valid_until:
        secrets.append(webhook_secret(hash_key, merchant_id, version - 1))
    return secrets


def platform_webhook_secret(hash_key: bytes) -> str:
    """The secret signing the platform's webhooks, derived like a merchant's."""
    return webhook_secret(hash_key, PLATFORM_ID)


def _mac(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def sign(secret: str | Sequence[str], body: bytes, timestamp: int) -> str:
    """The ``EchoTransact-Signature`` header value for this body at this unix time: one ``v1``
    per secret given, in that order (during a rotation's overlap, the new one's first)."""
    secrets = [secret] if isinstance(secret, str) else list(secret)
    assert secrets, "a signature needs a secret"
    return f"t={timestamp}," + ",".join(f"v1={_mac(s, timestamp, body)}" for s in secrets)


def verify_signature(
    secret: str, header: str | None, body: bytes, *, tolerance_s: int = 300, now: float | None = None
) -> bool:
    """What a receiver does: the header names a time within ``tolerance_s`` of now (replays of
    an old request fail) and one ``v1`` equal to our MAC of "<t>.<body>" (any of several: during
    a rotation's overlap the dispatcher sends the new and the previous secret's)."""
    if not header:
        return False
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and value.isdigit():
            timestamp = int(value)
        elif key == "v1" and value:
            candidates.append(value)
    if timestamp is None or not candidates:
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = _mac(secret, timestamp, body)
    return any(hmac.compare_digest(expected, candidate) for candidate in candidates)


# -- bodies -------------------------------------------------------------------------------------

_json = msgspec.json.Encoder()


def event_body(envelope: EventEnvelope, *, session_id: UUID | None = None) -> bytes:
    """The JSON a receiver gets: the event's id, type and time, and its data with personal
    data masked and secrets dropped. ``session_id`` ties a payment's events to its session."""
    data: dict[str, Any] = {
        "aggregate_id": envelope.aggregate_id,
        "aggregate_type": envelope.aggregate_type,
        "merchant_id": envelope.merchant_id,
    }
    if session_id is not None:
        data["session_id"] = session_id
    data.update((k, v) for k, v in mask_event_data(envelope.data).items() if k not in _NEVER_SENT)
    return _json.encode({
        "id": envelope.event_id, "type": envelope.event_type, "created": envelope.occurred_at, "data": data,
    })


# -- planning -----------------------------------------------------------------------------------


@dataclass
class PlanResult:
    events: int = 0
    deliveries: int = 0


class WebhookPlanner:
    """Outbox feed -> ``webhook_deliveries``, exactly once per (event, endpoint, kind)."""

    name = "webhooks"

    def __init__(
        self, database_url: str, open_envelope: OpenEnvelope, *, clock: Clock | None = None,
        batch_size: int = 500, platform_webhook_url: str | None = None,
    ) -> None:
        self.database_url = database_url
        self.open_envelope = open_envelope
        self.clock = clock or SystemClock()
        self.batch_size = batch_size
        # Where the platform's events go (ECHOTRANSACT_PLATFORM_WEBHOOK_URL); None: nowhere.
        self.platform_webhook_url = platform_webhook_url
        self._conn = ReconnectingConnection(database_url, on_connect=listen_for_commits)

    def connection(self) -> psycopg.Connection[Any]:
        return self._conn.get()

    def close(self) -> None:
        self._conn.close()

    def checkpoint(self) -> int:
        row = self.connection().execute(
            "SELECT position FROM webhook_checkpoint WHERE name = %s", (self.name,)
        ).fetchone()
        return int(row[0]) if row else 0

    def plan(self) -> PlanResult:
        """Plan every event past the checkpoint; returns what this call did."""
        result = PlanResult()
        while self._plan_batch(result) == self.batch_size:
            pass
        return result

    def _plan_batch(self, result: PlanResult) -> int:
        conn = self.connection()
        with conn.transaction(), conn.cursor() as cur:
            # The row lock serializes planners: a second one waits, then reads the new position.
            checkpoint = self._lock_checkpoint(cur)
            position, deliver_after = checkpoint
            # Positions are issued in commit order (the event store's table lock), so nothing
            # can appear later below a position we have seen.
            cur.execute(
                "SELECT position, envelope FROM outbox WHERE position > %s ORDER BY position LIMIT %s",
                (position, self.batch_size),
            )
            rows = cur.fetchall()
            envelopes = []
            for row_position, payload in rows:
                envelope = self.open_envelope(bytes(payload))
                if envelope.position != row_position:
                    envelope = msgspec.structs.replace(envelope, position=row_position)
                envelopes.append(envelope)
            batch = _PlanBatch.read(cur, envelopes)
            now = self.clock.now()
            for envelope in envelopes:
                batch.remember(envelope)
                rule = WEBHOOK_RULES.get(envelope.aggregate_type)
                if envelope.position is not None and envelope.position > deliver_after \
                        and rule is not None and rule.delivers(envelope):
                    self._plan_deliveries(batch, envelope, rule)
                result.events += 1
            result.deliveries += batch.write(cur, now)
            if rows:
                cur.execute(
                    "UPDATE webhook_checkpoint SET position = %s WHERE name = %s", (rows[-1][0], self.name)
                )
        return len(rows)

    def _lock_checkpoint(self, cur: psycopg.Cursor[Any]) -> tuple[int, int]:
        query = "SELECT position, deliver_after FROM webhook_checkpoint WHERE name = %s FOR UPDATE"
        row = cur.execute(query, (self.name,)).fetchone()
        if row is None:
            # The migration seeds the row; without it, deliver nothing of the history that is
            # already there rather than flood the merchants with it.
            cur.execute(
                "INSERT INTO webhook_checkpoint (name, position, deliver_after)"
                " SELECT %s, 0, COALESCE(max(position), 0) FROM outbox ON CONFLICT (name) DO NOTHING",
                (self.name,),
            )
            row = cur.execute(query, (self.name,)).fetchone()
            assert row is not None
        return int(row[0]), int(row[1])

    def _plan_deliveries(self, batch: _PlanBatch, e: EventEnvelope, rule: WebhookRule) -> None:
        """One delivery per endpoint the rule sends this event to."""
        signer: UUID | None  # whose secret signs them, kept with each delivery
        targets: list[tuple[str, str, bytes, str | None]]
        if rule.to_platform:
            signer = PLATFORM_ID
            url = self.platform_webhook_url
            targets = [(DeliveryKind.PLATFORM_WEBHOOK, url, event_body(e), None)] if url else []
        else:
            signer = e.merchant_id
            if signer is None:
                # A rule for merchants' events, and an event of that type that names none: there
                # is nobody to send it to (and a bug to look at, not a reason to stop planning).
                log.warning("webhook_event_without_merchant", event_id=e.event_id, event_type=e.event_type)
                return
            targets = self._merchant_targets(batch, e, signer, rule)
        for kind, endpoint_url, payload, idempotency_key in targets:
            batch.deliveries.append(
                (e.event_id, e.event_type, e.position, signer, kind, endpoint_url, payload, idempotency_key))

    def _merchant_targets(
        self, batch: _PlanBatch, e: EventEnvelope, merchant_id: UUID, rule: WebhookRule,
    ) -> list[tuple[str, str, bytes, str | None]]:
        """(kind, URL, body, idempotency key) of each delivery of a merchant's event."""
        webhook_url, commerce_uri = batch.merchants.get(merchant_id, (None, None))
        session_id: UUID | None = None
        session = None
        if rule.session_callback:
            if e.aggregate_type == "payment_session":
                session_id = e.aggregate_id
            else:
                session_id = batch.payments.get(e.aggregate_id)
            if session_id is not None:
                session = batch.sessions.get(session_id)

        body = event_body(e, session_id=session_id if e.aggregate_type != "payment_session" else None)
        targets: list[tuple[str, str, bytes, str | None]] = []
        if webhook_url:
            targets.append((DeliveryKind.MERCHANT_WEBHOOK, webhook_url, body, None))
        callback_url = session[0] if session else None
        # One URL serving as both gets the event once.
        if callback_url and callback_url != webhook_url:
            targets.append((DeliveryKind.SESSION_CALLBACK, callback_url, body, None))
        if e.event_type == "payment_session.completed" and commerce_uri and session is not None:
            order = CommerceOrder(
                reference=session[1], items=list(session[2]), amount_minor=int(session[3]),
                currency=session[4], payment_id=UUID(str(e.data["payment_id"])),
                session_id=e.aggregate_id, merchant_id=merchant_id,
            )
            targets.append(
                (DeliveryKind.COMMERCE_ORDER, commerce_uri, encode_order(order), str(e.aggregate_id))
            )
        return targets


_Session = tuple[str | None, str, list[Any], int, str]  # callback URL, order reference, items, amount, currency


@dataclass
class _PlanBatch:
    """What one batch of the planner needs from earlier events, read with one query per table
    before the batch, kept up to date in memory as its events are remembered in order, and
    written back with a few statements after it (a statement per event and a query per target
    once cost this process more CPU than the relay). Writes are upserts: planning again from
    zero writes the same rows."""

    merchants: dict[UUID, tuple[str | None, str | None]]  # webhook URL, commerce backend URI
    sessions: dict[UUID, _Session]
    payments: dict[UUID, UUID | None]  # payment -> its session
    touched_merchants: set[UUID]
    rotations: dict[UUID, tuple[int, str | None]]  # merchant -> secret version, previous one valid until
    new_sessions: dict[UUID, tuple[UUID, _Session]]
    new_payments: dict[UUID, tuple[UUID, UUID | None]]
    deliveries: list[tuple[UUID, str, int | None, UUID | None, str, str, bytes, str | None]]

    @classmethod
    def read(cls, cur: psycopg.Cursor[Any], envelopes: list[EventEnvelope]) -> _PlanBatch:
        merchant_ids = {e.merchant_id for e in envelopes if e.merchant_id is not None}
        merchant_ids |= {e.aggregate_id for e in envelopes if e.aggregate_type == "merchant"}
        payment_ids = [e.aggregate_id for e in envelopes if e.aggregate_type == "payment"]
        payments: dict[UUID, UUID | None] = {}
        if payment_ids:
            cur.execute("SELECT payment_id, session_id FROM webhook_payments WHERE payment_id = ANY(%s)",
                        (payment_ids,))
            payments = {r[0]: r[1] for r in cur.fetchall()}
        session_ids = {e.aggregate_id for e in envelopes if e.aggregate_type == "payment_session"}
        session_ids |= {s for s in payments.values() if s is not None}
        session_ids |= {UUID(str(e.data["session_id"])) for e in envelopes
                        if e.event_type == "payment.initiated" and e.data.get("session_id")}
        sessions: dict[UUID, _Session] = {}
        if session_ids:
            cur.execute("SELECT session_id, callback_url, order_reference, line_items, amount_minor, currency"
                        " FROM webhook_sessions WHERE session_id = ANY(%s)", (list(session_ids),))
            sessions = {r[0]: (r[1], r[2], r[3], int(r[4]), r[5]) for r in cur.fetchall()}
        merchants: dict[UUID, tuple[str | None, str | None]] = {}
        if merchant_ids:
            cur.execute("SELECT merchant_id, webhook_url, commerce_backend_uri FROM webhook_merchants"
                        " WHERE merchant_id = ANY(%s)", (list(merchant_ids),))
            merchants = {r[0]: (r[1], r[2]) for r in cur.fetchall()}
        return cls(merchants, sessions, payments, set(), {}, {}, {}, [])

    def remember(self, e: EventEnvelope) -> None:
        """What later events need from this one (the rows the old statements wrote, in memory)."""
        data = e.data
        if e.event_type == "merchant.registered":
            self.merchants[e.aggregate_id] = (data.get("webhook_url"), data.get("commerce_backend_uri"))
            self.touched_merchants.add(e.aggregate_id)
        elif e.event_type == "merchant.settings_changed" and e.aggregate_id in self.merchants:
            changes = data.get("changes") or {}
            webhook_url, commerce_uri = self.merchants[e.aggregate_id]
            self.merchants[e.aggregate_id] = (changes.get("webhook_url", webhook_url),
                                              changes.get("commerce_backend_uri", commerce_uri))
            self.touched_merchants.add(e.aggregate_id)
        elif e.event_type == "merchant.webhook_secret_rotated":
            # The version, and until when the previous one still signs: what the dispatcher needs
            # to derive the secrets (never the secret itself, which no row holds).
            self.rotations[e.aggregate_id] = (int(data["version"]), data["previous_valid_until"])
        elif e.event_type == "payment_session.opened" and e.aggregate_id not in self.sessions:
            session: _Session = (data.get("callback_url"), data["order_reference"], list(data["line_items"]),
                                 int(data["amount_minor"]), data["currency"])
            self.sessions[e.aggregate_id] = session
            self.new_sessions[e.aggregate_id] = (UUID(str(data["merchant_id"])), session)
        elif e.event_type == "payment.initiated" and e.aggregate_id not in self.payments:
            session_id = UUID(str(data["session_id"])) if data.get("session_id") else None
            self.payments[e.aggregate_id] = session_id
            self.new_payments[e.aggregate_id] = (UUID(str(data["merchant_id"])), session_id)

    def write(self, cur: psycopg.Cursor[Any], now: datetime) -> int:
        """Write what the batch remembered and planned; returns how many deliveries are new."""
        if self.touched_merchants:
            cur.executemany(
                "INSERT INTO webhook_merchants (merchant_id, webhook_url, commerce_backend_uri)"
                " VALUES (%s, %s, %s) ON CONFLICT (merchant_id) DO UPDATE"
                " SET webhook_url = excluded.webhook_url, commerce_backend_uri = excluded.commerce_backend_uri",
                [(m, *self.merchants[m]) for m in self.touched_merchants],
            )
        if self.rotations:  # after the merchants' rows: a merchant registered in this batch has one
            cur.executemany(
                "UPDATE webhook_merchants SET secret_version = %s, previous_secret_valid_until = %s::timestamptz"
                " WHERE merchant_id = %s",
                [(version, until, m) for m, (version, until) in self.rotations.items()],
            )
        if self.new_sessions:
            cur.executemany(
                "INSERT INTO webhook_sessions (session_id, merchant_id, callback_url, order_reference,"
                " line_items, amount_minor, currency) VALUES (%s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (session_id) DO NOTHING",
                [(s, m, c, ref, Jsonb(items), amount, currency)
                 for s, (m, (c, ref, items, amount, currency)) in self.new_sessions.items()],
            )
        if self.new_payments:
            cur.executemany(
                "INSERT INTO webhook_payments (payment_id, merchant_id, session_id) VALUES (%s, %s, %s)"
                " ON CONFLICT (payment_id) DO NOTHING",
                [(p, m, s) for p, (m, s) in self.new_payments.items()],
            )
        if not self.deliveries:
            return 0
        columns = list(zip(*self.deliveries, strict=True))
        cur.execute(
            "INSERT INTO webhook_deliveries (event_id, event_type, position, merchant_id, kind,"
            " endpoint_url, body, idempotency_key, next_attempt_at, created_at)"
            " SELECT d.*, %s, %s FROM unnest(%s::uuid[], %s::text[], %s::bigint[], %s::uuid[], %s::text[],"
            " %s::text[], %s::bytea[], %s::text[]) AS d"
            " ON CONFLICT (event_id, endpoint_url, kind) DO NOTHING",
            (now, now, *(list(c) for c in columns)),
        )
        return cur.rowcount


# -- dispatching --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    delivery_id: int
    event_id: UUID
    event_type: str
    merchant_id: UUID
    kind: str
    endpoint_url: str
    body: bytes
    idempotency_key: str | None
    attempts: int
    first_attempt_at: datetime | None
    # The signer's secret version when the delivery was claimed, and the end of the previous
    # version's overlap (the platform, and merchants never rotated: 1 and None).
    secret_version: int = 1
    previous_secret_valid_until: datetime | None = None


@dataclass(frozen=True)
class AttemptResult:
    status_code: int | None
    error: str | None
    duration_ms: int

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


@dataclass(frozen=True)
class DispatchOutcome:
    delivery_id: int
    event_id: UUID
    kind: str
    endpoint_url: str
    attempt: int
    status: str
    status_code: int | None
    error: str | None
    next_attempt_at: datetime | None


_DELIVERY_COLUMNS = (
    "delivery_id, event_id, event_type, merchant_id, kind, endpoint_url, body, idempotency_key,"
    " attempts, first_attempt_at"
)

# The signer's secret version is read at each attempt, so a retry after a rotation carries the
# new secret's signature. Only the delivery's row is locked (OF d), never the merchant's.
_CLAIM = (
    f"SELECT {_DELIVERY_COLUMNS},"
    " COALESCE((SELECT m.secret_version FROM webhook_merchants m WHERE m.merchant_id = d.merchant_id), 1),"
    " (SELECT m.previous_secret_valid_until FROM webhook_merchants m WHERE m.merchant_id = d.merchant_id)"
    " FROM webhook_deliveries d"
    " WHERE status = 'pending' AND next_attempt_at <= %s"
    " ORDER BY next_attempt_at, delivery_id LIMIT 1 FOR UPDATE OF d SKIP LOCKED"
)


class WebhookDispatcher:
    """Sends due deliveries, one per transaction, holding the row lock while it sends.

    Not thread-safe: run one per thread (each has its own connection)."""

    def __init__(
        self,
        database_url: str,
        hash_key: bytes,
        *,
        clock: Clock | None = None,
        commerce: CommerceBackend | None = None,
        timeout_s: float = 5.0,
        backoff_base: timedelta = timedelta(seconds=30),
        backoff_cap: timedelta = timedelta(hours=1),
        retry_horizon: timedelta = timedelta(hours=24),
        jitter: float = 0.2,
        rng: random.Random | None = None,
        allow_private_destinations: bool = False,
        on_order_delivered: Callable[[Delivery, AttemptResult], object] | None = None,
        open_envelope: OpenEnvelope | None = None,
    ) -> None:
        """``on_order_delivered``: told, after the commit, of each commerce order the merchant's
        backend accepted (the session records it: evidence in a dispute). ``open_envelope``: with
        tracing on, each attempt is a span in the trace of the event it tells of."""
        assert hash_key, "webhook secrets are derived from the hash key"
        assert 0 <= jitter < 1, "jitter is the fraction of a delay that may be taken off"
        self.database_url = database_url
        self.hash_key = hash_key
        self.clock = clock or SystemClock()
        self.http = httpx.Client(timeout=timeout_s, follow_redirects=False)
        self.commerce = commerce or HttpCommerceBackend(client=self.http)
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.retry_horizon = retry_horizon
        self.jitter = jitter
        self.rng = rng or random.Random()
        self.allow_private_destinations = allow_private_destinations
        self.on_order_delivered = on_order_delivered
        self.open_envelope = open_envelope
        self._conn = ReconnectingConnection(database_url)

    def connection(self) -> psycopg.Connection[Any]:
        return self._conn.get()

    def close(self) -> None:
        self._conn.close()
        self.http.close()

    # -- the pure parts -----------------------------------------------------------------------

    def retry_delay(self, attempts: int) -> timedelta:
        """The pause after the ``attempts``-th failed attempt: base * 2^(attempts - 1), at most
        the cap, less up to ``jitter`` of it so receivers coming back are not hit all at once."""
        return timedelta(seconds=backoff_s(attempts - 1, base_s=self.backoff_base.total_seconds(),
                                           cap_s=self.backoff_cap.total_seconds(), jitter=(1 - self.jitter, 1.0),
                                           rng=self.rng))

    def secrets_for(self, delivery: Delivery) -> list[str]:
        """The secrets this delivery is signed with now: whether the previous version's overlap
        is over is the business clock's to say (self.clock), like every deadline here."""
        return signing_secrets(self.hash_key, delivery.merchant_id, delivery.secret_version,
                               delivery.previous_secret_valid_until, self.clock.now())

    def headers_for(self, delivery: Delivery, *, timestamp: int | None = None) -> dict[str, str]:
        # Wall-clock time, not self.clock: the receiver checks it against its own clock.
        t = int(time.time()) if timestamp is None else timestamp
        return {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            SIGNATURE_HEADER: sign(self.secrets_for(delivery), delivery.body, t),
            EVENT_ID_HEADER: str(delivery.event_id),
            EVENT_TYPE_HEADER: delivery.event_type,
        }

    def send(self, delivery: Delivery) -> AttemptResult:
        """The HTTP call alone, no bookkeeping: calling it twice sends twice (what a crash
        between the call and the commit does), with the same event id and idempotency key."""
        headers = self.headers_for(delivery)
        if delivery.kind == DeliveryKind.COMMERCE_ORDER:
            response = self.commerce.create_order(
                delivery.endpoint_url, delivery.body, idempotency_key=delivery.idempotency_key or "",
                headers=headers,
            )
            return AttemptResult(response.status_code, response.error, response.duration_ms)
        started = time.perf_counter()
        status_code, error = post(self.http, delivery.endpoint_url, delivery.body, headers)
        return AttemptResult(status_code, error, round((time.perf_counter() - started) * 1000))

    # -- claiming and recording ------------------------------------------------------------------

    def dispatch_one(self) -> DispatchOutcome | None:
        """Send the next due delivery, if any, and record the attempt."""
        outcome, delivery, result = self._dispatch_one()
        if (outcome is not None and delivery is not None and result is not None and self.on_order_delivered
                and outcome.status == DeliveryStatus.DELIVERED and delivery.kind == DeliveryKind.COMMERCE_ORDER):
            try:  # after the commit; a crash in between leaves the delivery log as the record
                self.on_order_delivered(delivery, result)
            except Exception as failure:
                log.info("order_delivery_not_recorded", delivery_id=delivery.delivery_id, error=str(failure))
        return outcome

    def _dispatch_one(self) -> tuple[DispatchOutcome | None, Delivery | None, AttemptResult | None]:
        conn = self.connection()
        with conn.transaction(), conn.cursor() as cur:
            row = cur.execute(_CLAIM, (self.clock.now(),)).fetchone()
            if row is None:
                return None, None, None
            (delivery_id, event_id, event_type, merchant_id, kind, endpoint_url, body, key, attempts, first,
             secret_version, previous_valid_until) = row
            delivery = Delivery(delivery_id, event_id, event_type, merchant_id, kind, endpoint_url, bytes(body),
                                key, attempts, first, int(secret_version), previous_valid_until)
            attempted_at = self.clock.now()
            permanent = False
            try:
                # A merchant-chosen URL into our own network is never called (SSRF); it is a
                # dead letter at once, for an operator to see, not something a retry fixes.
                check_destination(delivery.endpoint_url, allow_private=self.allow_private_destinations)
                context = self._trace_context(cur, delivery) if self.open_envelope and tracing.active() else None
                if context is None:
                    result = self.send(delivery)
                else:
                    result = self._traced_send(delivery, context)
            except UnsafeDestination as error:
                result, permanent = AttemptResult(None, f"unsafe_destination: {error}"[:500], 0), True
            except MissingIdempotencyKey as error:
                # The table's check makes this impossible; if it happens, never send it.
                result, permanent = AttemptResult(None, str(error), 0), True
            return self._record(cur, delivery, attempted_at, result, permanent=permanent), delivery, result

    def _trace_context(self, cur: psycopg.Cursor[Any], delivery: Delivery) -> str | None:
        """The trace context the delivery's event was saved with (one query, with tracing on)."""
        assert self.open_envelope is not None
        row = cur.execute("SELECT envelope FROM outbox WHERE event_id = %s", (delivery.event_id,)).fetchone()
        return self.open_envelope(bytes(row[0])).trace_context if row else None

    def _traced_send(self, delivery: Delivery, context: str) -> AttemptResult:
        with tracing.tracer().start_as_current_span(
            f"deliver {delivery.kind}", context=tracing.parent(context), kind=SpanKind.CLIENT,
            attributes={"echotransact.delivery_kind": delivery.kind, "echotransact.event_type": delivery.event_type,
                        "echotransact.attempt": delivery.attempts + 1},
        ) as span:
            result = self.send(delivery)
            if result.status_code is not None:
                span.set_attribute("http.response.status_code", result.status_code)
            if not result.ok:
                span.set_status(Status(StatusCode.ERROR, result.error or f"status {result.status_code}"))
            return result

    def dispatch_due(self, limit: int | None = None) -> list[DispatchOutcome]:
        outcomes: list[DispatchOutcome] = []
        while limit is None or len(outcomes) < limit:
            outcome = self.dispatch_one()
            if outcome is None:
                break
            outcomes.append(outcome)
        return outcomes

    def _record(
        self, cur: psycopg.Cursor[Any], delivery: Delivery, attempted_at: datetime, result: AttemptResult,
        *, permanent: bool = False,
    ) -> DispatchOutcome:
        attempt = delivery.attempts + 1
        first = delivery.first_attempt_at or attempted_at
        cur.execute(
            "INSERT INTO webhook_attempts (delivery_id, merchant_id, endpoint_url, attempt, attempted_at,"
            " status_code, error, duration_ms) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            (delivery.delivery_id, delivery.merchant_id, delivery.endpoint_url, attempt, attempted_at,
             result.status_code, result.error, result.duration_ms),
        )
        next_at: datetime | None = None
        if result.ok:
            status = DeliveryStatus.DELIVERED
        else:
            next_at = attempted_at + self.retry_delay(attempt)
            past_horizon = next_at > first + self.retry_horizon
            status = DeliveryStatus.DEAD if permanent or past_horizon else DeliveryStatus.PENDING
        now = self.clock.now()
        cur.execute(
            "UPDATE webhook_deliveries SET status = %s, attempts = %s, first_attempt_at = %s,"
            " last_attempt_at = %s, last_status_code = %s, last_error = %s,"
            " next_attempt_at = COALESCE(%s, next_attempt_at),"
            " delivered_at = CASE WHEN %s = 'delivered' THEN %s::timestamptz END,"
            " dead_at = CASE WHEN %s = 'dead' THEN %s::timestamptz END"
            " WHERE delivery_id = %s",
            (status, attempt, first, attempted_at, result.status_code, result.error, next_at,
             status, now, status, now, delivery.delivery_id),
        )
        ATTEMPTS.labels(delivery.kind, "delivered" if result.ok else "dead" if status == DeliveryStatus.DEAD
                        else "retry").inc()
        log_call = log.warning if status == DeliveryStatus.DEAD else log.info
        log_call("webhook_" + ("delivered" if result.ok else "dead_letter" if status == "dead" else "retry"),
                 delivery_id=delivery.delivery_id, kind=delivery.kind, event_type=delivery.event_type,
                 attempt=attempt, status_code=result.status_code, error=result.error,
                 next_attempt_at=next_at if status == DeliveryStatus.PENDING else None)
        return DispatchOutcome(
            delivery.delivery_id, delivery.event_id, delivery.kind, delivery.endpoint_url, attempt, status,
            result.status_code, result.error, next_at if status == DeliveryStatus.PENDING else None,
        )


# -- operators ----------------------------------------------------------------------------------


class WebhookAdmin:
    """Redelivery and the delivery log, for the CLI and the admin API."""

    def __init__(self, database_url: str, *, clock: Clock | None = None) -> None:
        self.database_url = database_url
        self.clock = clock or SystemClock()

    def redeliver(
        self, delivery_ids: Iterable[int] | None = None, *, endpoint: str | None = None,
        since: datetime | None = None, include_delivered: bool = False,
    ) -> int:
        """Send again, from a fresh retry horizon and with the same event id, the dead
        deliveries that match every filter given (no filter: all dead ones). Named deliveries,
        or ``include_delivered``, also take delivered ones. Pending ones named by id or endpoint
        are made due now (an endpoint that is back need not sit out its backoff). Returns how
        many deliveries were touched."""
        ids = list(delivery_ids) if delivery_ids is not None else None
        statuses = [DeliveryStatus.DEAD]
        if ids is not None or include_delivered:
            statuses.append(DeliveryStatus.DELIVERED)
        match = (
            " AND (%(ids)s::bigint[] IS NULL OR delivery_id = ANY(%(ids)s::bigint[]))"
            " AND (%(endpoint)s::text IS NULL OR endpoint_url = %(endpoint)s::text)"
            " AND (%(since)s::timestamptz IS NULL OR created_at >= %(since)s::timestamptz)"
        )
        params = {
            "ids": ids, "endpoint": endpoint, "since": since, "statuses": statuses, "now": self.clock.now(),
        }
        with psycopg.connect(self.database_url) as conn, conn.transaction():
            reset = conn.execute(
                "UPDATE webhook_deliveries SET status = 'pending', attempts = 0, first_attempt_at = NULL,"
                " next_attempt_at = %(now)s, delivered_at = NULL, dead_at = NULL,"
                " redeliveries = redeliveries + 1"
                " WHERE status = ANY(%(statuses)s::text[])" + match,
                params,
            ).rowcount
            hurried = 0
            if ids is not None or endpoint is not None:
                hurried = conn.execute(
                    "UPDATE webhook_deliveries SET next_attempt_at = %(now)s"
                    " WHERE status = 'pending' AND next_attempt_at > %(now)s" + match,
                    params,
                ).rowcount
        log.info("webhooks_redelivered", reset=reset, made_due=hurried, ids=ids, endpoint=endpoint,
                 since=since)
        return reset + hurried

    def deliveries(
        self, *, endpoint: str | None = None, status: str | None = None, merchant_id: UUID | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        with psycopg.connect(self.database_url) as conn, conn.cursor(row_factory=dict_row) as cur:
            return cur.execute(
                "SELECT delivery_id, event_id, event_type, kind, endpoint_url, status, attempts,"
                " next_attempt_at, first_attempt_at, last_attempt_at, last_status_code, last_error,"
                " delivered_at, dead_at, redeliveries, created_at FROM webhook_deliveries"
                " WHERE (%(endpoint)s::text IS NULL OR endpoint_url = %(endpoint)s::text)"
                " AND (%(status)s::text IS NULL OR status = %(status)s::text)"
                " AND (%(merchant)s::uuid IS NULL OR merchant_id = %(merchant)s::uuid)"
                " ORDER BY delivery_id DESC LIMIT %(limit)s",
                {"endpoint": endpoint, "status": status, "merchant": merchant_id, "limit": limit},
            ).fetchall()

    def attempts(
        self, *, endpoint: str | None = None, delivery_id: int | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """The delivery log: newest attempts first, for one endpoint or one delivery."""
        with psycopg.connect(self.database_url) as conn, conn.cursor(row_factory=dict_row) as cur:
            return cur.execute(
                "SELECT a.attempt_id, a.delivery_id, d.event_id, d.event_type, d.kind, a.endpoint_url,"
                " a.attempt, a.attempted_at, a.status_code, a.error, a.duration_ms"
                " FROM webhook_attempts a JOIN webhook_deliveries d USING (delivery_id)"
                " WHERE (%(endpoint)s::text IS NULL OR a.endpoint_url = %(endpoint)s::text)"
                " AND (%(delivery)s::bigint IS NULL OR a.delivery_id = %(delivery)s::bigint)"
                " ORDER BY a.attempt_id DESC LIMIT %(limit)s",
                {"endpoint": endpoint, "delivery": delivery_id, "limit": limit},
            ).fetchall()


# -- the long-running process ---------------------------------------------------------------------


def run_webhooks(
    database_url: str,
    open_envelope: OpenEnvelope,
    hash_key: bytes,
    stop: threading.Event,
    *,
    concurrency: int = 4,
    poll_interval_s: float = 1.0,
    clock: Clock | None = None,
    platform_webhook_url: str | None = None,
    **dispatcher_options: Any,
) -> None:
    """Plan and dispatch until ``stop`` is set: one planner loop, ``concurrency`` dispatchers.
    A step that fails (a database restart, say) is logged and tried again with a growing pause."""

    def guarded(name: str, step: Callable[[], bool], close: Callable[[], None],
                idle: Callable[[float], object] = stop.wait) -> None:
        pause = poll_interval_s
        try:
            while not stop.is_set():
                try:
                    busy = step()
                    pause = poll_interval_s
                    if not busy:
                        idle(pause)
                except Exception:
                    pause = min(pause * 2, 30.0)
                    log.exception("webhooks_step_failed", step=name, retry_in_s=pause)
                    stop.wait(pause)
        finally:
            close()

    planner = WebhookPlanner(database_url, open_envelope, clock=clock, platform_webhook_url=platform_webhook_url)

    def planner_idle(timeout_s: float) -> None:
        # Woken by the commit of any save (its connection LISTENs), so deliveries are planned
        # as soon as their events are in the outbox; then a moment for the commits that follow
        # it to join the batch: woken at each commit, it once planned one or two events per
        # transaction, and that cost more CPU per payment than the relay.
        if wait_for_commit(planner.connection(), stop, timeout_s):
            stop.wait(PLAN_GATHER_S)

    def plan() -> bool:
        planner.plan()  # up to the end of the feed
        return False

    threads = [
        threading.Thread(target=guarded, args=("planner", plan, planner.close, planner_idle),
                         name="webhooks-planner")
    ]
    for index in range(concurrency):
        dispatcher = WebhookDispatcher(database_url, hash_key, clock=clock, open_envelope=open_envelope,
                                       **dispatcher_options)
        threads.append(threading.Thread(
            target=guarded, args=(f"dispatcher-{index}", lambda d=dispatcher: bool(d.dispatch_due(limit=50)),
                                  dispatcher.close),
            name=f"webhooks-dispatcher-{index}",
        ))
    log.info("webhooks_started", concurrency=concurrency)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.info("webhooks_stopped")

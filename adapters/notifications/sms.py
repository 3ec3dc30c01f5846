"""Sending the outbox's messages (SMS) to the outside world, at least once, each with an id the
provider uses to drop a duplicate.

The dispatcher claims due messages (``FOR UPDATE SKIP LOCKED``, so several dispatchers share
the work), decrypts them, sends them through the ``SmsSender`` port, and records the outcome:
sent; retry later with exponential backoff and jitter; or, after ``max_attempts`` or a
permanent refusal, failed, which becomes a ``payment_session.sms_failed`` event so the voice
platform can re-prompt. A crash between sending and marking sends again with the same id.

Senders: ``DevSmsSender`` keeps every message in ``dev_sms_inbox`` for a developer to read
(``echotransact sms list``); ``HttpSmsSender`` speaks a common SMS provider's messages API
(form POST to ``/2010-04-01/Accounts/{account}/Messages.json`` with basic auth and an
idempotency token header).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from uuid import UUID

import httpx
import psycopg
import structlog

from adapters.backoff import backoff_s
from adapters.postgres.connection import ReconnectingConnection, listen_for_commits, wait_for_commit
from application.ports import SmsResult, SmsSender

log = structlog.get_logger(__name__)


class DevSmsSender:
    """The development provider: a mailbox table, idempotent by message id, written on one
    connection kept open (opened again after it was lost)."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self._conn = ReconnectingConnection(database_url)
        self._lock = threading.Lock()

    def send(self, *, message_id: str, to: str, body: str) -> SmsResult:
        with self._lock:
            for attempt in range(2):
                try:
                    self._conn.get().execute(
                        "INSERT INTO dev_sms_inbox (message_id, to_phone, body) VALUES (%s, %s, %s)"
                        " ON CONFLICT (message_id) DO NOTHING",
                        (message_id, to, body),
                    )
                    break
                except psycopg.OperationalError:  # the kept connection died (a restart): once more
                    self._conn.close()
                    if attempt:
                        raise
        return SmsResult(True, provider_reference=f"dev_{message_id}")

    def send_many(self, messages: list[tuple[str, str, str]]) -> list[SmsResult]:
        """A batch of ``(message id, to, body)`` with one statement."""
        with self._lock:
            for attempt in range(2):
                try:
                    self._conn.get().execute(
                        # received_at per row, in the batch's order: a phone shows the last one last.
                        "INSERT INTO dev_sms_inbox (message_id, to_phone, body, received_at)"
                        " SELECT m, t, b, clock_timestamp() FROM unnest(%s::uuid[], %s::text[], %s::text[])"
                        " WITH ORDINALITY AS u(m, t, b, n) ORDER BY n ON CONFLICT (message_id) DO NOTHING",
                        ([m for m, _, _ in messages], [t for _, t, _ in messages], [b for _, _, b in messages]),
                    )
                    break
                except psycopg.OperationalError:  # the kept connection died (a restart): once more
                    self._conn.close()
                    if attempt:
                        raise
        return [SmsResult(True, provider_reference=f"dev_{m}") for m, _, _ in messages]

    def close(self) -> None:
        self._conn.close()


def dev_inbox(database_url: str, to: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT message_id, to_phone, body, received_at FROM dev_sms_inbox"
            " WHERE %(to)s::text IS NULL OR to_phone = %(to)s ORDER BY received_at DESC LIMIT %(limit)s",
            {"to": to, "limit": limit},
        ).fetchall()
    return [{"message_id": str(m), "to": t, "body": b, "received_at": r} for m, t, b, r in rows]


class HttpSmsSender:
    """A provider with a Twilio-shaped messages API."""

    def __init__(self, base_url: str, account: str, token: str, sender: str, timeout_s: float = 10.0) -> None:
        self.url = f"{base_url.rstrip('/')}/2010-04-01/Accounts/{account}/Messages.json"
        self.auth = (account, token)
        self.sender = sender
        self.timeout_s = timeout_s

    def send(self, *, message_id: str, to: str, body: str) -> SmsResult:
        try:
            response = httpx.post(
                self.url, data={"To": to, "From": self.sender, "Body": body}, auth=self.auth,
                headers={"I-Twilio-Idempotency-Token": message_id}, timeout=self.timeout_s,
            )
        except httpx.HTTPError as error:
            return SmsResult(False, retryable=True, error=f"{type(error).__name__}: {error}")
        if response.is_success:
            return SmsResult(True, provider_reference=str(response.json().get("sid", "")))
        retryable = response.status_code == 429 or response.status_code >= 500
        return SmsResult(False, retryable=retryable, error=f"HTTP {response.status_code}: {response.text[:200]}")


def _listen_without_flushing(conn: psycopg.Connection[Any]) -> None:
    """The dispatcher's connection: woken by saves, and its marks not waited on to reach the disk.
    A mark that a crash of PostgreSQL forgets sends its message again, with the same id, as a
    crash between sending and marking does (the provider drops the copy; the session's record of
    the send is a save of its own, flushed, made once per message id)."""
    conn.execute("SET synchronous_commit TO off")
    listen_for_commits(conn)


@dataclass(frozen=True)
class DispatchReport:
    sent: int = 0
    retried: int = 0
    failed: int = 0


class MessageDispatcher:
    def __init__(
        self,
        database_url: str,
        sender: SmsSender,
        *,
        open_payload: Callable[[bytes], bytes],
        on_failed: Callable[[UUID, UUID, str], object],
        on_sent: Callable[[list[tuple[UUID, UUID, str]]], object] | None = None,
        max_attempts: int = 6,
        backoff_base: timedelta = timedelta(seconds=2),
        backoff_cap: timedelta = timedelta(minutes=5),
        batch_size: int = 50,
        gather_s: float = 0.02,
    ) -> None:
        if gather_s < 0:
            raise ValueError(f"gather_s must be 0 or more, not {gather_s}")
        self.database_url = database_url
        self.sender = sender
        self.open_payload = open_payload
        self.on_failed = on_failed
        self.on_sent = on_sent
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.batch_size = batch_size
        self.gather_s = gather_s
        self._conn = ReconnectingConnection(database_url, on_connect=_listen_without_flushing)

    def _backoff(self, attempts: int) -> timedelta:
        """The pause after the ``attempts``-th failed send (1-based): base, doubling up to the
        cap, give or take a fifth so messages that failed together are not retried together."""
        return timedelta(seconds=backoff_s(attempts - 1, base_s=self.backoff_base.total_seconds(),
                                           cap_s=self.backoff_cap.total_seconds(), jitter=(0.8, 1.2)))

    def run_once(self) -> DispatchReport:
        """Up to ``batch_size`` sends of due messages, in batches. A batch is one transaction:
        claimed (``FOR UPDATE SKIP LOCKED``: the row locks are held while we talk to the
        provider, so a second dispatcher skips these rows instead of sending them too), sent,
        the sends recorded on their sessions (``payment_session.sms_sent``, one save for the
        batch), the outcomes written, committed. A crash anywhere before the commit releases
        the locks and sends the batch again with the same message ids, which the provider drops
        as duplicates; the sessions record each message once."""
        sent = retried = failed = 0
        conn = self._conn.get()  # one long-lived connection, which also listens for commits (run)
        while sent + retried + failed < self.batch_size:
            final_failures: list[tuple[UUID, UUID, str]] = []
            with conn.transaction():
                rows = conn.execute(
                    "SELECT message_id, aggregate_id, payload, attempts FROM outbox_messages"
                    " WHERE state = 'pending' AND next_attempt_at <= now()"
                    " ORDER BY next_attempt_at LIMIT %s FOR UPDATE SKIP LOCKED",
                    (self.batch_size - sent - retried - failed,),
                ).fetchall()
                if not rows:
                    break
                results = self._send_all([(m, bytes(p)) for m, _, p, _ in rows])
                delivered = [(m, s, r.provider_reference) for (m, s, _, _), r in zip(rows, results, strict=True)
                             if r.sent]
                if delivered:
                    self._record_sent(delivered)
                    conn.execute(
                        "UPDATE outbox_messages SET state = 'sent', attempts = attempts + 1, sent_at = now(),"
                        " provider_reference = t.reference, last_error = NULL"
                        " FROM unnest(%s::uuid[], %s::text[]) AS t(id, reference) WHERE message_id = t.id",
                        ([m for m, _, _ in delivered], [r for _, _, r in delivered]),
                    )
                    sent += len(delivered)
                for (message_id, session_id, _, attempts), result in zip(rows, results, strict=True):
                    if result.sent:
                        continue
                    attempts += 1
                    final = not result.retryable or attempts >= self.max_attempts
                    conn.execute(
                        "UPDATE outbox_messages SET attempts = %s, last_error = %s,"
                        " state = CASE WHEN %s THEN 'failed' ELSE 'pending' END,"
                        " next_attempt_at = now() + %s WHERE message_id = %s",
                        (attempts, result.error[:500], final, self._backoff(attempts), message_id),
                    )
                    log.warning("sms_not_sent", message_id=str(message_id), attempts=attempts, final=final,
                                error=result.error[:200])
                    if final:
                        failed += 1
                        final_failures.append((message_id, session_id, result.error[:500]))
                    else:
                        retried += 1
            # After the commit, the session records the failure, once (its command id is the
            # message's). A crash in between leaves the message's own row as the record.
            for message_id, session_id, reason in final_failures:
                try:
                    self.on_failed(message_id, session_id, reason)
                except Exception as failure:  # e.g. the session has moved on
                    log.info("sms_failure_not_recorded", message_id=str(message_id), error=str(failure))
        return DispatchReport(sent, retried, failed)

    def _record_sent(self, delivered: list[tuple[UUID, UUID, str]]) -> None:
        """The sends, on their sessions, before the rows are marked sent: a crash in between
        sends again (a duplicate the provider drops) and records nothing twice. A session that
        cannot record (gone, say) does not hold its batch's messages back: they are marked sent,
        and their rows stay the record."""
        if self.on_sent is None:
            return
        try:
            self.on_sent(delivered)
        except Exception as failure:
            log.info("sms_sent_not_recorded", messages=len(delivered), error=str(failure))

    def _send_all(self, messages: list[tuple[UUID, bytes]]) -> list[SmsResult]:
        """Each message's outcome, in order: through the sender's ``send_many`` when it has one
        (the development mailbox writes a batch with one statement), else one by one."""
        opened: list[tuple[str, str, str] | SmsResult] = [self._open(m, p) for m, p in messages]
        send_many = getattr(self.sender, "send_many", None)
        if send_many is None:
            return [o if isinstance(o, SmsResult) else self._send_one(*o) for o in opened]
        ready = [o for o in opened if not isinstance(o, SmsResult)]
        try:
            answers = iter(send_many(ready) if ready else [])
        except Exception as error:
            answers = iter([SmsResult(False, retryable=True, error=f"{type(error).__name__}: {error}")] * len(ready))
        return [o if isinstance(o, SmsResult) else next(answers) for o in opened]

    def _open(self, message_id: UUID, payload: bytes) -> tuple[str, str, str] | SmsResult:
        """(message id, to, body), or the final failure of a message that cannot be opened (it
        never will be)."""
        try:
            message = json.loads(self.open_payload(payload))
            return str(message_id), message["to"], message["body"]
        except Exception as error:
            return SmsResult(False, retryable=False, error=f"{type(error).__name__}: {error}")

    def _send_one(self, message_id: str, to: str, body: str) -> SmsResult:
        """A provider that raised instead of answering (a lost connection, say) is tried again later."""
        try:
            return self.sender.send(message_id=message_id, to=to, body=body)
        except Exception as error:
            return SmsResult(False, retryable=True, error=f"{type(error).__name__}: {error}")

    def run(self, stop: threading.Event, idle_s: float = 1.0) -> None:
        """Send until ``stop``; between passes, wait for a commit (a new SMS is written with the
        events of its save) or ``idle_s``, when retries that fell due are picked up."""
        try:
            while not stop.is_set():
                try:
                    report = self.run_once()
                    if report.sent + report.retried + report.failed >= self.batch_size:
                        continue  # a full pass: more may be due at once
                    waiting_since = time.monotonic()
                    woken = wait_for_commit(self._conn.get(), stop, idle_s)
                    if report != DispatchReport() and woken and time.monotonic() - waiting_since < self.gather_s:
                        # Under load every commit (this dispatcher's own record of its sends
                        # included) woke it for a pass of one or two messages, a transaction
                        # each. Let the next pass gather what commits meanwhile; a commit
                        # after a rest is sent at once.
                        stop.wait(self.gather_s)
                except psycopg.Error as error:
                    log.warning("sms_dispatch_database_error", error=str(error))
                    self._conn.close()
                    stop.wait(2.0)
        finally:
            self._conn.close()

    def close(self) -> None:
        self._conn.close()
        close_sender = getattr(self.sender, "close", None)
        if close_sender is not None:
            close_sender()

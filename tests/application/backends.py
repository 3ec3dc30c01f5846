"""The two backends an application test can run on, and what a test may ask of each store.

PostgreSQL is built by the composition root (tests/conftest.py ``ledger``); the in-memory one is
built here, as the eventsourcing library's examples build theirs: the same Ledger over the
library's in-memory recorder with our outbox and command log (adapters/memory/).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Protocol

import msgspec
import psycopg

from adapters.clock import ManualClock
from adapters.dev.identity import DevIdentityVerifier
from adapters.dev.sandbox_processor import SandboxProcessor
from adapters.memory.customer_keys import InMemoryCustomerKeys
from adapters.memory.event_store import InMemoryOutboxRecorder
from adapters.memory.velocity import InMemoryVelocityCounter
from adapters.notifications.wording import SmsWording
from api.bootstrap import key_cipher
from api.settings import Settings
from application.envelope import EventEnvelope, decode
from application.ledger import Ledger, LedgerPolicy


def memory_ledger(settings: Settings, clock: ManualClock, processor: SandboxProcessor) -> Ledger:
    """A Ledger whose events, outbox and command log live in memory; the same secrets and risk
    policy as the PostgreSQL one the ``settings`` fixture builds."""
    env = {"PERSISTENCE_MODULE": "adapters.memory.event_store"}
    if settings.encryption_key:
        env |= {"CIPHER_TOPIC": "eventsourcing.cryptography:AESCipher",
                "CIPHER_KEY": base64.b64encode(settings.encryption_key).decode()}
    return Ledger(
        env,
        policy=LedgerPolicy(secret_key=settings.hash_key, risk=settings.risk_policy),
        clock=clock,
        processor=processor,
        wording=SmsWording(),
        identity_verifier=DevIdentityVerifier(),
        velocity=InMemoryVelocityCounter(),
        customer_keys=InMemoryCustomerKeys(key_cipher(settings)),
    )


class Store(Protocol):
    """What a test reads straight from the event store, whichever backend holds it."""

    def event_count(self) -> int: ...

    def command_count(self) -> int: ...

    def envelopes(self) -> list[EventEnvelope]:
        """The outbox's envelopes in position order, decrypted."""
        ...

    def stored_bytes(self) -> Iterator[bytes]:
        """Everything at rest: event states, outbox envelopes and command results."""
        ...

    def sms(self) -> list[dict[str, str]]:
        """The queued SMS (``to`` and ``body``), decrypted, in no particular order."""
        ...


def _decrypt(ledger: Ledger, payload: bytes) -> bytes:
    return ledger.mapper.cipher.decrypt(payload) if ledger.mapper.cipher else payload


def _open(ledger: Ledger, payload: bytes) -> EventEnvelope:
    return decode(_decrypt(ledger, payload))


class PostgresStore:
    def __init__(self, ledger: Ledger, database_url: str) -> None:
        self.ledger = ledger
        self.database_url = database_url

    def _column(self, query: str) -> list[bytes]:
        with psycopg.connect(self.database_url) as conn:
            return [bytes(value) for (value,) in conn.execute(query)]

    def event_count(self) -> int:
        with psycopg.connect(self.database_url) as conn:
            return conn.execute("SELECT count(*) FROM ledger_events").fetchone()[0]

    def command_count(self) -> int:
        with psycopg.connect(self.database_url) as conn:
            return conn.execute("SELECT count(*) FROM command_log").fetchone()[0]

    def envelopes(self) -> list[EventEnvelope]:
        payloads = self._column("SELECT envelope FROM outbox ORDER BY outbox_id")
        return [_open(self.ledger, payload) for payload in payloads]

    def stored_bytes(self) -> Iterator[bytes]:
        yield from self._column("SELECT state FROM ledger_events")
        yield from self._column("SELECT envelope FROM outbox")
        yield from self._column("SELECT result::text::bytea FROM command_log")

    def sms(self) -> list[dict[str, str]]:
        return [msgspec.json.decode(_decrypt(self.ledger, payload))
                for payload in self._column("SELECT payload FROM outbox_messages")]


class MemoryStore:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        assert isinstance(ledger.recorder, InMemoryOutboxRecorder)
        self.recorder = ledger.recorder

    def event_count(self) -> int:
        return self.recorder.max_notification_id() or 0

    def command_count(self) -> int:
        return len(self.recorder.commands)

    def envelopes(self) -> list[EventEnvelope]:
        return [_open(self.ledger, message.envelope) for _, message in sorted(self.recorder.outbox, key=lambda r: r[0])]

    def stored_bytes(self) -> Iterator[bytes]:
        for notification in self.recorder.select_notifications(None, limit=10**9):
            yield notification.state
        for _, message in self.recorder.outbox:
            yield message.envelope
        for record in self.recorder.commands.values():
            yield msgspec.json.encode(record.result)

    def sms(self) -> list[dict[str, str]]:
        return [msgspec.json.decode(_decrypt(self.ledger, m.payload)) for m in self.recorder.messages.values()]

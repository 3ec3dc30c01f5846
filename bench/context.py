"""What every benchmark shares: the servers, a migrated database of its own, settings, a ledger,
and helpers that seed sessions and read their envelopes back from the outbox.

Everything is built by the composition root (api/bootstrap.py), as the entry points do.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import msgspec
import psycopg

from adapters.dev.servers import ServerURLs
from api.bootstrap import build_ledger, envelope_opener
from api.settings import Settings
from application.envelope import EventEnvelope
from application.ledger import Ledger

PHONE = "+14155550123"


@dataclass(frozen=True)
class Sizes:
    """How much work one side does per round."""

    write_commands: int = 1_000
    relay_rows: int = 2_000
    projection_events: int = 2_000
    api_requests: int = 1_000
    api_sessions: int = 50
    cache_rows: int = 1_000
    e2e_commands: int = 2_000
    e2e_requests: int = 1_000
    e2e_journeys: int = 160
    reconcile_payments: int = 2_000
    replay_events: int = 20_000

    @classmethod
    def quick(cls) -> Sizes:
        return cls(write_commands=150, relay_rows=300, projection_events=300, api_requests=200,
                   api_sessions=20, cache_rows=200, e2e_commands=300, e2e_requests=200,
                   e2e_journeys=48, reconcile_payments=300, replay_events=3_000)

    @classmethod
    def uniform(cls, n: int) -> Sizes:
        """The same n everywhere (a smoke run)."""
        if n < 1:
            raise ValueError("n must be positive")
        return cls(write_commands=n, relay_rows=n, projection_events=n, api_requests=n,
                   api_sessions=min(n, 50), cache_rows=n, e2e_commands=n, e2e_requests=n,
                   e2e_journeys=n, reconcile_payments=n, replay_events=n)


def bench_settings(run_token: str) -> Settings:
    """Production-like settings: encryption at rest on, topics of their own, and a rate limit so
    high it never rejects but still costs its Redis round trip on every request."""
    return Settings(
        hash_key=secrets.token_bytes(32),
        encryption_key=secrets.token_bytes(32),
        vault_key=secrets.token_bytes(32),
        master_key=secrets.token_bytes(32),
        topic_prefix=f"bench-{run_token}",
        rate_limit_per_minute=1_000_000_000,
    )


@dataclass
class BenchContext:
    servers: ServerURLs
    database_url: str
    settings: Settings
    run_token: str  # in every command id and topic name, so runs never collide on shared servers
    _ledger: Ledger | None = field(default=None, repr=False)
    _merchant_id: UUID | None = field(default=None, repr=False)

    @classmethod
    def create(cls, servers: ServerURLs, database_url: str, run_token: str | None = None) -> BenchContext:
        token = run_token or secrets.token_hex(4)
        return cls(servers=servers, database_url=database_url, settings=bench_settings(token), run_token=token)

    @property
    def ledger(self) -> Ledger:
        if self._ledger is None:
            self._ledger = build_ledger(self.settings, self.database_url)
        return self._ledger

    @property
    def merchant_id(self) -> UUID:
        if self._merchant_id is None:
            self._merchant_id = self.register_merchant(self.ledger, "merchant")
        return self._merchant_id

    def command_id(self, *parts: object) -> str:
        return ":".join(["bench", self.run_token, *map(str, parts)])

    def register_merchant(self, ledger: Ledger, tag: str) -> UUID:
        result = ledger.register_merchant(self.command_id(tag), name=f"Bench merchant {tag}")
        return UUID(result.result["merchant_id"])

    def open_session(self, ledger: Ledger, merchant_id: UUID, command_id: str, amount_minor: int = 2_500) -> UUID:
        """The command a voice platform sends first (below the identity threshold)."""
        result = ledger.open_session(
            command_id,
            merchant_id=merchant_id,
            amount_minor=amount_minor,
            currency="USD",
            customer_phone=PHONE,
            order_reference="ORDER-7",
            line_items=[{"sku": "PZ-L", "name": "Large pizza", "quantity": 1, "unit_amount_minor": amount_minor}],
            voice_platform="alexa",
            conversation_id="conv-1",
            callback_url="https://voice.example/callback",
        )
        return UUID(result.result["session_id"])

    def seed_sessions(self, tag: str, count: int, *, send_link: bool = False,
                      ledger: Ledger | None = None, merchant_id: UUID | None = None) -> list[UUID]:
        """``count`` opened sessions (and their link sent, two events each, when asked)."""
        ledger = ledger or self.ledger
        merchant_id = merchant_id or self.merchant_id
        ids = []
        for i in range(count):
            session_id = self.open_session(ledger, merchant_id, self.command_id(tag, i))
            if send_link:
                ledger.send_link(self.command_id(tag, i, "send"), session_id)
            ids.append(session_id)
        return ids

    def outbox_rows(self, aggregate_ids: Sequence[UUID]) -> list[tuple[Any, ...]]:
        """(outbox_id, position, event_id, topic, message_key, envelope) of these aggregates, in
        position order."""
        with psycopg.connect(self.database_url) as conn:
            return conn.execute(
                "SELECT outbox_id, position, event_id, topic, message_key, envelope FROM outbox"
                " WHERE message_key = ANY(%s) ORDER BY position",
                ([str(i) for i in aggregate_ids],),
            ).fetchall()

    def envelopes(self, aggregate_ids: Sequence[UUID]) -> list[EventEnvelope]:
        """The envelopes of these aggregates as a consumer gets them: opened, with positions."""
        open_envelope = envelope_opener(self.settings)
        return [
            msgspec.structs.replace(open_envelope(bytes(row[5])), position=row[1])
            for row in self.outbox_rows(aggregate_ids)
        ]

    def close(self) -> None:
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None

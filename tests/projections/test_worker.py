"""The Faust projection worker against a real Kafka broker (Tansu) and PostgreSQL: delivery,
duplicates, a broker that lost everything, and two workers of which one is killed."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgspec
import psycopg
import pytest
from confluent_kafka import Producer

from adapters.dev.servers import ServerURLs
from adapters.kafka.topics import ensure_topics
from api.bootstrap import build_ledger, envelope_opener, personal_data_reader
from api.settings import Settings
from application.envelope import encode
from application.ledger import Ledger
from projections.audit import verify_chain
from projections.registry import all_projections
from projections.replay import verify
from tests.application.flows import new_merchant, open_session, pay

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def ledger(settings: Settings, database_url: str, clock, processor, prefix: str) -> Iterator[Ledger]:  # type: ignore[no-untyped-def]

    app = build_ledger(settings.replace(topic_prefix=prefix), database_url, clock=clock, processor=processor)
    yield app
    app.close()


def publish_outbox(database_url: str, servers: ServerURLs, settings: Settings, *, times: int = 1) -> int:
    """Stand-in for the relay: every outbox row to its topic, keyed by aggregate, ``times`` times."""
    open_envelope = envelope_opener(settings)
    producer = Producer({"bootstrap.servers": servers.kafka_bootstrap_servers, "enable.idempotence": True})
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT position, topic, message_key, envelope FROM outbox ORDER BY position").fetchall()
    for _ in range(times):
        for position, topic, key, payload in rows:
            envelope = msgspec.structs.replace(open_envelope(payload), position=position)
            producer.produce(topic, key=key.encode(), value=encode(envelope))
    assert producer.flush(30) == 0
    return len(rows)


class Workers:
    def __init__(self, servers: ServerURLs, database_url: str, settings: Settings, prefix: str) -> None:
        self.env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "REDIS_URL": servers.redis_url,
            "KAFKA_BOOTSTRAP_SERVERS": servers.kafka_bootstrap_servers,
            "ECHOTRANSACT_HASH_KEY": base64.b64encode(settings.hash_key).decode(),
            "ECHOTRANSACT_MASTER_KEY": base64.b64encode(settings.master_key or b"").decode(),
            "ECHOTRANSACT_ENCRYPTION_KEY": base64.b64encode(settings.encryption_key or b"").decode(),
            "ECHOTRANSACT_TOPIC_PREFIX": prefix,
            "ECHOTRANSACT_CATCH_UP_EVERY_S": "1",
            "ECHOTRANSACT_CATCH_UP_GRACE_S": "600",  # only Kafka, unless a test says otherwise
            "ECHOTRANSACT_LOG_LEVEL": "warning",
        }
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, **env: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-m", "api.cli", "worker"], cwd=REPO, env={**self.env, **env})
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def workers(servers: ServerURLs, database_url: str, settings: Settings, prefix: str) -> Iterator[Workers]:
    ensure_topics(servers.kafka_bootstrap_servers, prefix)
    w = Workers(servers, database_url, settings, prefix)
    yield w
    w.stop()


def wait_until_projected(database_url: str, timeout_s: float = 60) -> None:
    """Every projection has applied the last version of every aggregate."""
    deadline = time.monotonic() + timeout_s
    with psycopg.connect(database_url, autocommit=True) as conn:
        while True:
            behind = conn.execute(
                "SELECT count(*) FROM (SELECT originator_id, max(originator_version) v FROM ledger_events"
                " GROUP BY originator_id) e"
                " CROSS JOIN (VALUES ('status'), ('analytics'), ('audit'), ('balances')) p(name)"
                " LEFT JOIN projection_versions pv ON pv.aggregate_id = e.originator_id"
                " WHERE (pv.applied->p.name->>0)::bigint IS DISTINCT FROM e.v"
            ).fetchone()[0]
            if behind == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{behind} projection/aggregate pairs still behind")
            time.sleep(0.3)


def make_payments(ledger: Ledger, count: int, tag: str) -> None:
    merchant_id = new_merchant(ledger, f"{tag}-merchant")
    for i in range(count):
        session_id = open_session(ledger, merchant_id, f"{tag}-open-{i}", amount_minor=1_000 + i)
        payment_id = pay(ledger, session_id, prefix=f"{tag}-{i}-")
        ledger.authorize_payment(payment_id)
        if i % 2 == 0:
            ledger.capture_payment(f"{tag}-capture-{i}", payment_id)


def assert_read_side_equals_replay(owner_database_url: str, settings: Settings) -> None:
    """``replay --verify``, an owner's tool (a scratch schema), against what the workers built."""
    projections = list(all_projections(personal_data_reader(settings)).values())
    assert verify(owner_database_url, projections, envelope_opener(settings)) == []
    with psycopg.connect(owner_database_url) as conn:
        assert verify_chain(conn).ok
        assert conn.execute("SELECT count(*) FROM audit_log WHERE hash IS NULL").fetchone() == (0,)


def test_worker_builds_the_read_models_from_kafka_and_drops_duplicates(
    ledger: Ledger, workers: Workers, database_url: str, owner_database_url: str, servers: ServerURLs,
    settings: Settings,
) -> None:
    make_payments(ledger, 6, "a")
    workers.start()
    publish_outbox(database_url, servers, settings, times=2)  # every event delivered twice
    wait_until_projected(database_url)
    assert_read_side_equals_replay(owner_database_url, settings)
    # The status cache in Redis was refreshed with the latest rows.
    import redis

    from projections.status_cache import StatusCache

    cache = StatusCache(redis.Redis.from_url(servers.redis_url))
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT payment_id, status, version FROM payment_status LIMIT 1").fetchone()
    assert row is not None
    payment_id, status, version = row
    cached = cache.get("payment", payment_id)
    assert cached is not None and (cached["status"], cached["version"]) == (status, version)


def test_events_the_broker_never_delivered_are_caught_up_from_the_outbox(
    ledger: Ledger, workers: Workers, database_url: str, owner_database_url: str, settings: Settings
) -> None:
    make_payments(ledger, 4, "b")
    # Nothing is published: as if the broker had lost every message.
    workers.start(ECHOTRANSACT_CATCH_UP_GRACE_S="0")
    wait_until_projected(database_url)
    assert_read_side_equals_replay(owner_database_url, settings)


def test_two_workers_share_the_work_and_the_survivor_finishes(
    ledger: Ledger, workers: Workers, database_url: str, owner_database_url: str, servers: ServerURLs,
    settings: Settings,
) -> None:
    first = workers.start()
    workers.start()
    time.sleep(4)  # both join the group
    make_payments(ledger, 10, "c")
    publish_outbox(database_url, servers, settings)
    time.sleep(0.5)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    make_payments(ledger, 5, "d")
    publish_outbox(database_url, servers, settings)
    wait_until_projected(database_url, timeout_s=90)
    assert_read_side_equals_replay(owner_database_url, settings)

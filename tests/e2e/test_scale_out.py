"""Scale-out: ``echotransact run --relays 2 --workers 2``. The relays share the outbox's lock
partitions (advisory locks), the workers share the topics' partitions (one consumer group).
Under a workload of opened sessions, one relay and one worker are SIGKILLed: the other of each
takes over their partitions within seconds, with nobody's help, and in the end every
acknowledged session is in the read model, every event applied exactly once (the audit trail
holds each event once, the funnel counts each opening once) and ``replay --verify`` is clean."""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import psycopg
import pytest

from tests.e2e.test_chaos import System, run_system

SETTLE_S = 120.0


@pytest.fixture
def system(tmp_path: Path) -> Iterator[System]:
    yield from run_system(tmp_path, {
        "ECHOTRANSACT_LOG_LEVEL": "info", "ECHOTRANSACT_RATE_LIMIT_PER_MINUTE": "0",
        "ECHOTRANSACT_CATCH_UP_EVERY_S": "1", "ECHOTRANSACT_CATCH_UP_GRACE_S": "2",
    }, args=("--relays", "2", "--workers", "2"))


def _processes(system: System, marker: str) -> list[psutil.Process]:
    found = []
    for child in system.children():
        try:
            if marker in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.Error:
            continue
    return found


def _relays_sharing(system: System) -> bool:
    """Both relays hold lock partitions (each logged an acquisition seeing two live relays)."""
    lines = [json.loads(line) for line in system.output.read_text(errors="replace").splitlines()
             if '"outbox_relay.partitions_acquired"' in line]
    return any(line.get("live_relays") == 2 for line in lines)


def _open_sessions(system: System, stop: threading.Event, opened: list[str], problems: list[str]) -> None:
    with httpx.Client(base_url=system.url, headers={"Authorization": f"Bearer {system.merchant_key}"},
                      timeout=30) as client:
        while not stop.is_set():
            reference = uuid.uuid4().hex
            body = {"amount": 2500, "currency": "USD", "customer_phone": "+14155550123",
                    "order": {"reference": reference,
                              "items": [{"sku": "PZ", "name": "Pizza", "quantity": 1, "unit_amount": 2500}]},
                    "voice": {"platform": "scale-test", "conversation_id": reference}}
            try:
                response = client.post("/v1/payment-sessions", headers={"Idempotency-Key": reference}, json=body)
            except httpx.HTTPError as error:
                problems.append(f"{type(error).__name__}: {error}")
                continue
            if response.status_code == 201:
                opened.append(response.json()["id"])
            else:
                problems.append(f"{response.status_code} {response.text[:200]}")
            time.sleep(0.02)


def _in_read_model(system: System, ids: list[str]) -> set[str]:
    with psycopg.connect(system.owner_url, autocommit=True) as conn:
        return {str(r[0]) for r in conn.execute(
            "SELECT session_id FROM session_status WHERE session_id = ANY(%s::uuid[])", (ids,))}


def test_two_relays_and_two_workers_share_the_work_and_survive_losing_one_of_each(system: System) -> None:
    deadline = time.monotonic() + 60
    while not (_relays_sharing(system) and len(_processes(system, "api.cli worker")) == 2):
        assert time.monotonic() < deadline, "two relays and two workers never shared the work:\n" + system.tail()
        time.sleep(0.5)
    assert len(_processes(system, "api.cli relay")) == 2

    opened: list[str] = []
    problems: list[str] = []
    stop = threading.Event()
    clients = [threading.Thread(target=_open_sessions, args=(system, stop, opened, problems)) for _ in range(3)]
    for client in clients:
        client.start()
    try:
        time.sleep(4)
        relay, worker = _processes(system, "api.cli relay")[0], _processes(system, "api.cli worker")[0]
        relay.send_signal(signal.SIGKILL)
        worker.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        # Sessions opened after the kills reach the read model within seconds: the survivors (and
        # the supervisor's replacements) took the dead ones' partitions.
        time.sleep(1)
        probe = list(opened[-5:])
        while _in_read_model(system, probe) != set(probe):
            assert time.monotonic() - killed_at < 30, "the read side stalled after a relay and a worker died"
            time.sleep(0.2)
        time.sleep(4)
    finally:
        stop.set()
        for client in clients:
            client.join(60)
    assert not problems, problems[:10]
    assert len(opened) >= 50, "the workload hardly ran"

    deadline = time.monotonic() + SETTLE_S
    while _in_read_model(system, opened) != set(opened):
        assert time.monotonic() < deadline, "an acknowledged session never reached the read model"
        time.sleep(0.5)
    while (verified := system.cli("replay", "--projection", "all", "--verify")).returncode != 0:
        if time.monotonic() > deadline:
            pytest.fail(f"replay --verify never came out clean:\n{verified.stdout[-3000:]}{verified.stderr[-3000:]}")
        time.sleep(2)
    with psycopg.connect(system.owner_url, autocommit=True) as conn:
        events = conn.execute("SELECT count(*) FROM ledger_events").fetchone()
        audited = conn.execute("SELECT count(*), count(DISTINCT event_id) FROM audit_log").fetchone()
        funnel = conn.execute("SELECT COALESCE(sum(opened), 0) FROM funnel_daily"
                              " WHERE voice_platform = 'scale-test'").fetchone()
    assert events is not None and audited == (events[0], events[0]), "an event is missing from, or twice in, the audit"
    assert funnel == (len(opened),), "the funnel counted an opening twice, or missed one"

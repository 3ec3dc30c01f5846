"""`echotransact run` as a user starts it: serves health on the printed URL, stops cleanly."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import psycopg
import pytest

REPO = Path(__file__).resolve().parents[2]


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture
def run_env(tmp_path: Path) -> dict[str, str]:
    tmp_path.chmod(0o777)
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "KAFKA_BOOTSTRAP_SERVERS")}
    env.update(ECHOTRANSACT_DATA_DIR=str(tmp_path / "data"), ECHOTRANSACT_PORT="0")
    return env


def _start(env: dict[str, str], printed: list[str] | None = None) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "run"], cwd=REPO, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    assert proc.stdout is not None
    for line in proc.stdout:
        if printed is not None:
            printed.append(line)
        match = re.search(r"serving on (http://\S+)", line)
        if match:
            return proc, match.group(1)
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise AssertionError("echotransact run never printed its URL")


def test_run_serves_health_and_sigterm_leaves_no_server_behind(run_env: dict[str, str]) -> None:
    printed: list[str] = []
    proc, url = _start(run_env, printed)
    keys = dict(re.findall(r"^\s+(\w+)\s+key: (\S+)$", "".join(printed), re.MULTILINE))
    assert set(keys) == {"merchant", "analyst", "compliance", "admin"}
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                status, body = _get(f"{url}/health/ready")
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert status == 200, body
        assert {name for name, check in body["checks"].items() if check["ok"]} == {"postgres", "redis", "kafka"}
        assert _get(f"{url}/health/live") == (200, {"status": "live"})
        # The printed demo key works: a voice integrator opens a session.
        payload = json.dumps({"amount": 1200, "currency": "USD", "customer_phone": "+14155550123",
                              "order": {"reference": "demo", "items": [
                                  {"sku": "x", "name": "Pizza", "quantity": 1, "unit_amount": 1200}]},
                              "voice": {"platform": "alexa", "conversation_id": "demo"}}).encode()
        request = urllib.request.Request(f"{url}/v1/payment-sessions", data=payload, method="POST", headers={
            "Authorization": f"Bearer {keys['merchant']}", "Idempotency-Key": "demo-1",
            "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 201
            assert json.loads(response.read())["status"] == "link_sent"
        # The dispatcher run by `run` texts the customer; a developer reads it with `sms list`.
        deadline = time.monotonic() + 30
        while True:
            listed = subprocess.run([sys.executable, "-m", "api.cli", "sms", "list"], cwd=REPO, env=run_env,
                                    capture_output=True, text=True, timeout=60)
            if "+14155550123" in listed.stdout:
                break
            assert time.monotonic() < deadline, listed.stderr[-2000:]
            time.sleep(0.5)
        assert re.search(r"/pay/[0-9a-f]{32}\S+ - your code is \d{6}", listed.stdout)
        # Every process of the system (the API, relay, worker, dispatchers) logs in to PostgreSQL as
        # the application's role; the embedded server's superuser only migrated.
        state = json.loads((Path(run_env["ECHOTRANSACT_DATA_DIR"]) / "running.json").read_text())
        wanted = {"echotransact-outbox-relay", "echotransact-worker", "echotransact-dispatch",
                  "echotransact-webhooks-dispatch"}
        deadline = time.monotonic() + 30  # each process connects when it first needs to
        with psycopg.connect(state["migration_database_url"], application_name="test-roles",
                             autocommit=True) as conn:
            while True:
                logins = conn.execute(
                    "SELECT DISTINCT application_name, usename FROM pg_stat_activity"
                    " WHERE datname = current_database() AND backend_type = 'client backend'"
                    " AND pid <> pg_backend_pid()"
                ).fetchall()
                names = {name for name, _ in logins}
                if wanted <= names or time.monotonic() > deadline:
                    break
                time.sleep(0.3)
        assert wanted <= names, logins
        assert len(names) > 4, logins  # and the API's own (named after this process's PGAPPNAME, if set)
        assert {user for _, user in logins} == {"echotransact_app"}, logins
        server_pids = [
            p.pid for p in psutil.process_iter(["cmdline"])
            if run_env["ECHOTRANSACT_DATA_DIR"] in " ".join(p.info["cmdline"] or [])
            or any(c.pid == p.pid for c in children)
        ]
        assert server_pids, "expected embedded servers to be running"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    time.sleep(0.5)
    alive = [pid for pid in server_pids
             if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert alive == []
    # The development keys and PostgreSQL data are kept for the next run.
    assert (Path(run_env["ECHOTRANSACT_DATA_DIR"]) / "dev-keys.json").exists()


def test_run_rejects_a_bad_setting_with_a_readable_message(run_env: dict[str, str]) -> None:
    run_env["ECHOTRANSACT_IDENTITY_THRESHOLDS"] = "USD=lots"
    done = subprocess.run(
        [sys.executable, "-m", "api.cli", "run"], cwd=REPO, env=run_env, text=True,
        capture_output=True, timeout=60,
    )
    assert done.returncode == 2
    assert "ECHOTRANSACT_IDENTITY_THRESHOLDS" in done.stderr and "Traceback" not in done.stderr


def test_demo_drives_one_voice_payment_through_the_running_system_every_time(run_env: dict[str, str]) -> None:
    proc, _url = _start(run_env)
    try:
        # Again and again on one system: more runs than the risk rules allow one card in ten minutes.
        runs = [subprocess.run([sys.executable, "-m", "api.cli", "demo"], cwd=REPO, env=run_env,
                               capture_output=True, text=True, timeout=120) for _ in range(4)]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    for done in runs:
        assert done.returncode == 0, done.stderr[-3000:]
    done = runs[-1]
    out = done.stdout
    assert "session is completed" in out
    steps = re.findall(r"v(\d+)\s+\S+\s+(payment\.\w+)", out)
    assert steps == [("1", "payment.initiated"), ("2", "payment.risk_assessed"), ("3", "payment.processing_started"),
                     ("4", "payment.authorized"), ("5", "payment.captured")]
    assert "4242 4242 4242 4242" not in done.stderr


def test_demo_without_a_running_system_says_so(run_env: dict[str, str]) -> None:
    done = subprocess.run([sys.executable, "-m", "api.cli", "demo"], cwd=REPO, env=run_env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "start the system first" in done.stderr


def _wait_ready(url: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            status, body = _get(f"{url}/health/ready")
            if status == 200:
                return body
        except (urllib.error.URLError, ConnectionError):
            pass
        assert time.monotonic() < deadline, "the system did not become ready"
        time.sleep(0.3)


def test_a_sigkilled_broker_is_started_again_and_the_pipeline_carries_on(run_env: dict[str, str]) -> None:
    printed: list[str] = []
    proc, url = _start(run_env, printed)
    keys = dict(re.findall(r"^\s+(\w+)\s+key: (\S+)$", "".join(printed), re.MULTILINE))
    try:
        _wait_ready(url, 30)
        brokers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "--listener-url" in " ".join(p.cmdline())]
        assert len(brokers) == 1
        brokers[0].send_signal(signal.SIGKILL)
        brokers[0].wait(10)
        body = _wait_ready(url, 30)
        assert body["checks"]["kafka"]["ok"]
        revived = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "--listener-url" in " ".join(p.cmdline())]
        assert [p.pid for p in revived] != [brokers[0].pid] and len(revived) == 1
        # A session opened after the restart reaches the read model.
        payload = json.dumps({"amount": 900, "currency": "USD", "customer_phone": "+14155550124",
                              "order": {"reference": "after-broker", "items": [
                                  {"sku": "x", "name": "Pizza", "quantity": 1, "unit_amount": 900}]},
                              "voice": {"platform": "alexa", "conversation_id": "after"}}).encode()
        headers = {"Authorization": f"Bearer {keys['merchant']}", "Content-Type": "application/json"}
        request = urllib.request.Request(f"{url}/v1/payment-sessions", data=payload, method="POST",
                                         headers={**headers, "Idempotency-Key": "after-broker"})
        with urllib.request.urlopen(request, timeout=10) as response:
            created = json.loads(response.read())
        read = urllib.request.Request(
            f"{url}/v1/payment-sessions/{created['id']}?wait_for_position={created['position']}", headers=headers)
        with urllib.request.urlopen(read, timeout=30) as response:
            assert json.loads(response.read())["status"] == "link_sent"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0

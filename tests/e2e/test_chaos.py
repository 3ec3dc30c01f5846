"""The fault suite through `echotransact run`, as `make run` starts it (its own embedded
PostgreSQL, Redis and broker): under a workload of session opens and whole journeys (SMS, code,
card, authorization, capture, refund) driven over HTTP, the relay, the projection worker, both
dispatchers, the broker, Redis and PostgreSQL are SIGKILLed at random moments (each at least
once; the seed is printed, and CHAOS_SEED replays a run). Afterwards:

- no request answered 500, and none waited longer than a few seconds (during the database's
  outage the API answers 503 with Retry-After, and the clients retry with the same key);
- every acknowledged command is in the ledger and its effect on the read side; every session's
  and payment's GET (the Redis cache included) equals the read model;
- nothing is stranded: no payment initiated or processing, no unpublished outbox row, no
  SMS that is not sent;
- `echotransact replay --verify` (read model and cache against a replay of the events) and
  `echotransact audit verify` (the hash chain) are clean.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
import pytest

from tests.e2e.test_journey_faults import EXPIRY, form_fields, link_sms, new_phone, new_visa

REPO = Path(__file__).resolve().parents[2]
CHAOS_S = 36.0  # how long processes are killed; the workload runs through it
PAUSE_S = (2.0, 3.5)  # between two kills
SLOW_S = 10.0  # no request may take longer, outage or not
SETTLE_S = 120.0
TARGETS = ("relay", "worker", "dispatch", "webhooks", "broker", "redis", "postgres")
AMOUNT, REFUND = 2_500, 1_000


@dataclass
class Record:
    """What the clients saw, shared by their threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    sessions: set[str] = field(default_factory=set)  # acknowledged opens
    captured: set[str] = field(default_factory=set)  # acknowledged captures
    refunded: set[str] = field(default_factory=set)  # acknowledged refunds
    problems: list[str] = field(default_factory=list)  # 500s, slow answers, surprises
    unavailable: int = 0  # 503s answered (and retried)
    slowest_s: float = 0.0
    journeys: int = 0

    def add(self, what: set[str], item: str) -> None:
        with self.lock:
            what.add(item)

    def problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(text)


@dataclass
class System:
    proc: subprocess.Popen[bytes]
    env: dict[str, str]
    data_dir: Path
    output: Path
    url: str = ""
    merchant_key: str = ""

    @property
    def owner_url(self) -> str:
        state = json.loads((self.data_dir / "running.json").read_text())
        return str(state.get("migration_database_url") or state["database_url"])

    def tail(self, lines: int = 80) -> str:
        lines_ = self.output.read_text(errors="replace").splitlines()
        kept = [line for line in lines_ if '"event": "request"' not in line]
        return "\n".join(kept[-lines:])

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "api.cli", *args], cwd=REPO, env=self.env, capture_output=True,
                              text=True, timeout=180, check=False)

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def target(self, name: str) -> psutil.Process | None:
        """The live process playing ``name`` now."""
        if name == "postgres":
            pgdata = str(self.data_dir / "postgres")
            found = [p for p in psutil.process_iter(["name", "cmdline"])
                     if p.info["name"] == "postgres" and pgdata in (p.info["cmdline"] or [])]
        elif name == "redis":
            state = json.loads((self.data_dir / ".servers.json").read_text())
            try:
                found = [psutil.Process(state["redis"]["pid"])]
            except (KeyError, psutil.NoSuchProcess):
                found = []
        else:
            marker = {"relay": "api.cli relay", "worker": "api.cli worker", "dispatch": "api.cli dispatch",
                      "webhooks": "api.cli webhooks dispatch", "broker": "--listener-url"}[name]
            found = [p for p in self.children() if marker in " ".join(_cmdline(p))]
        alive = [p for p in found if _alive(p)]
        return alive[0] if alive else None


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def run_system(tmp_path: Path, settings: dict[str, str], args: Sequence[str] = ()) -> Iterator[System]:
    """``echotransact run`` (with ``args``) on servers of its own under ``tmp_path``, with these
    settings, for as long as the generator runs; then SIGTERM (and its log shown when the test failed)."""
    tmp_path.chmod(0o777)  # the embedded PostgreSQL runs as a user of its own
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "REDIS_URL", "KAFKA_BOOTSTRAP_SERVERS", "MIGRATION_DATABASE_URL")}
    env.update({"ECHOTRANSACT_DATA_DIR": str(data_dir), "ECHOTRANSACT_PORT": "0", **settings})
    output = tmp_path / "run.log"
    with output.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "api.cli", "run", *args], cwd=REPO, env=env, stdout=sink,
                                stderr=subprocess.STDOUT)
    running = System(proc, env, data_dir, output)
    deadline = time.monotonic() + 120
    while not (served := re.search(r"serving on (http://\S+)", output.read_text(errors="replace"))):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"echotransact run did not start:\n{running.tail()}")
        time.sleep(0.2)
    running.url = served.group(1)
    running.merchant_key = dict(re.findall(r"^\s+(\w+)\s+key: (\S+)$", output.read_text(), re.MULTILINE))["merchant"]
    yield running
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(90)
    except subprocess.TimeoutExpired:
        for child in running.children():
            child.kill()
        proc.kill()
        raise
    print(running.tail())  # shown when the test failed


@pytest.fixture
def system(tmp_path: Path) -> Iterator[System]:
    yield from run_system(tmp_path, {
        "ECHOTRANSACT_LOG_LEVEL": "info", "ECHOTRANSACT_RATE_LIMIT_PER_MINUTE": "0",
        # The resolver settles an authorization cut off by a kill after 3 s instead of 30.
        "ECHOTRANSACT_RESOLVE_AFTER_S": "3", "ECHOTRANSACT_RESOLVE_EVERY_S": "1",
        "ECHOTRANSACT_CATCH_UP_EVERY_S": "1", "ECHOTRANSACT_CATCH_UP_GRACE_S": "2",
    })


# -- the clients: every request retried with its key while the system says 503 ------------------


class Client:
    def __init__(self, system: System, record: Record, deadline: float, *, key: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=system.url, headers=headers, timeout=30, follow_redirects=False)
        self.record = record
        self.deadline = deadline

    def close(self) -> None:
        self.http.close()

    def send(self, method: str, path: str, *, retry_on: Callable[[httpx.Response], bool] = lambda _: False,
             **kwargs: Any) -> httpx.Response | None:
        """The answer, after 503s (and answers ``retry_on`` names) were retried as told."""
        while time.monotonic() < self.deadline:
            started = time.monotonic()
            try:
                response = self.http.request(method, path, **kwargs)
            except httpx.HTTPError as error:
                self.record.problem(f"{method} {path}: {type(error).__name__}: {error}")
                return None
            took = time.monotonic() - started
            with self.record.lock:
                self.record.slowest_s = max(self.record.slowest_s, took)
            if took > SLOW_S:
                self.record.problem(f"{method} {path} took {took:.1f} s ({response.status_code})")
            if response.status_code >= 500 and response.status_code != 503:
                self.record.problem(f"{method} {path}: {response.status_code} {response.text[:300]}")
                return response
            if response.status_code == 503:
                with self.record.lock:
                    self.record.unavailable += 1
                if "retry-after" not in response.headers:
                    self.record.problem(f"{method} {path}: 503 without Retry-After")
                time.sleep(min(1.0, float(response.headers.get("retry-after", 1))))
                continue
            if retry_on(response):
                time.sleep(0.5)
                continue
            return response
        return None


def open_session(client: Client, phone: str) -> str | None:
    tag = uuid.uuid4().hex[:12]
    response = client.send("POST", "/v1/payment-sessions", headers={"Idempotency-Key": f"chaos-{tag}"}, json={
        "amount": AMOUNT, "currency": "USD", "customer_phone": phone,
        "order": {"reference": f"C-{tag}", "items": [
            {"sku": "PZ-L", "name": "Large pizza", "quantity": 1, "unit_amount": AMOUNT}]},
        "voice": {"platform": "alexa", "conversation_id": f"call-{tag}"}},
        # A retry that meets the first attempt still running is told so (409); it asks again.
        retry_on=lambda r: r.status_code == 409 and "in_progress" in r.text)
    if response is None or response.status_code != 201:
        if response is not None:
            client.record.problem(f"open: {response.status_code} {response.text[:300]}")
        return None
    session_id = str(response.json()["id"])
    client.record.add(client.record.sessions, session_id)
    return session_id


def read_sms(system: System, phone: str, session_id: str, deadline: float) -> tuple[str, str] | None:
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(system.owner_url, connect_timeout=3) as conn:
                found = link_sms(conn, phone, session_id)
        except psycopg.Error:  # PostgreSQL is being started again
            found = None
        if found:
            return found
        time.sleep(0.3)
    return None


def customer_pays(system: System, record: Record, phone: str, session_id: str, deadline: float) -> bool:
    """The customer's side as a state machine over the page: whatever step the page shows (a
    retried step may already have been done), do it, until the page says the card went in."""
    sms = read_sms(system, phone, session_id, deadline)
    if sms is None:
        record.problem(f"no SMS reached {phone}")
        return False
    link, code = sms
    page = Client(system, record, deadline)
    card = new_visa()
    try:
        while time.monotonic() < deadline:
            shown = page.send("GET", link)
            if shown is None:
                return False
            text = shown.text
            if 'name="card_number"' in text:
                sent = page.send("POST", f"{link}/card", data={
                    "card_number": card, "expiry": EXPIRY, "cvv": "123", **form_fields(text)})
                if sent is not None and sent.status_code in (202, 303):
                    return True
            elif 'name="code"' in text:
                page.send("POST", f"{link}/code", data={"code": code, **form_fields(text)})
            elif shown.status_code == 200:
                return True  # paid, or being paid: nothing left for the customer
            else:
                record.problem(f"GET {link}: {shown.status_code} {text[:300]}")
                return False
        return False
    finally:
        page.close()


def wait_read(client: Client, path: str, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
    while time.monotonic() < client.deadline:
        response = client.send("GET", path)
        if response is None:
            return None
        if response.status_code == 200 and done(response.json()):
            return dict(response.json())
        time.sleep(0.3)
    return None


def journey(system: System, record: Record, deadline: float) -> None:
    """Open, pay, capture and refund part, as the voice platform, customer and merchant would."""
    merchant = Client(system, record, deadline, key=system.merchant_key)
    try:
        phone = new_phone()
        session_id = open_session(merchant, phone)
        if session_id is None or not customer_pays(system, record, phone, session_id, deadline):
            return
        session = wait_read(merchant, f"/v1/payment-sessions/{session_id}", lambda s: bool(s.get("payment_id")))
        if session is None:
            return
        payment_id = str(session["payment_id"])
        payment = wait_read(merchant, f"/v1/payments/{payment_id}",
                            lambda p: p["status"] not in ("initiated", "processing"))
        if payment is None or payment["status"] != "authorized":
            return  # declined (risk, processor): a journey that ends there
        busy = lambda r: r.status_code == 409 and "in_progress" in r.text  # noqa: E731
        captured = merchant.send("POST", f"/v1/payments/{payment_id}/capture", retry_on=busy,
                                 headers={"Idempotency-Key": f"capture-{payment_id}"})
        if captured is None or captured.status_code != 200:
            if captured is not None:
                record.problem(f"capture: {captured.status_code} {captured.text[:300]}")
            return
        record.add(record.captured, payment_id)
        refunded = merchant.send("POST", f"/v1/payments/{payment_id}/refunds", retry_on=busy,
                                 headers={"Idempotency-Key": f"refund-{payment_id}"},
                                 json={"amount": REFUND, "reason": "one pizza short"})
        if refunded is None or refunded.status_code != 201:
            if refunded is not None:
                record.problem(f"refund: {refunded.status_code} {refunded.text[:300]}")
            return
        record.add(record.refunded, payment_id)
        with record.lock:
            record.journeys += 1
    finally:
        merchant.close()


# -- the test --------------------------------------------------------------------------------------


def test_sigkills_of_every_process_and_server_lose_nothing_strand_nothing_and_answer_no_500(
    system: System,
) -> None:
    seed = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(10**6))
    print(f"CHAOS_SEED={seed}")
    rng = random.Random(seed)
    record = Record()
    chaos_ends = time.monotonic() + CHAOS_S
    stop_starting = threading.Event()

    def journeys() -> None:
        while not stop_starting.is_set():
            journey(system, record, time.monotonic() + SETTLE_S)

    def opens() -> None:
        client = Client(system, record, time.monotonic() + CHAOS_S + SETTLE_S, key=system.merchant_key)
        try:
            while not stop_starting.is_set():
                open_session(client, new_phone())
                time.sleep(0.05)
        finally:
            client.close()

    threads = [threading.Thread(target=journeys, daemon=True) for _ in range(4)]
    threads.append(threading.Thread(target=opens, daemon=True))
    for thread in threads:
        thread.start()

    kills: list[str] = []
    plan = [*rng.sample(TARGETS, len(TARGETS)), *rng.choices(TARGETS[:5], k=3)]
    for name in plan:
        if time.monotonic() > chaos_ends:
            break
        time.sleep(rng.uniform(*PAUSE_S))
        landed = time.monotonic() + 15
        while (victim := system.target(name)) is None and time.monotonic() < landed:
            time.sleep(0.2)  # not back yet from an earlier kill (or in the supervisor's pause)
        if victim is not None:
            victim.send_signal(signal.SIGKILL)
            kills.append(name)
    stop_starting.set()
    for thread in threads:
        thread.join(SETTLE_S + 30)
    print(f"kills: {kills}; journeys: {record.journeys}; sessions: {len(record.sessions)}; "
          f"503s: {record.unavailable}; slowest answer: {record.slowest_s:.2f} s")
    assert set(kills) == set(TARGETS), f"not every target was killed: {kills}"
    assert not record.problems, "\n".join(record.problems[:20])
    assert record.journeys >= 4 and len(record.sessions) >= 20, "the workload hardly ran"

    # The read side settles: replay --verify compares read model and cache with a fresh replay.
    deadline = time.monotonic() + SETTLE_S
    while (verified := system.cli("replay", "--projection", "all", "--verify")).returncode != 0:
        if time.monotonic() > deadline:
            pytest.fail(f"replay --verify never came out clean:\n{verified.stdout[-3000:]}{verified.stderr[-3000:]}")
        time.sleep(3)
    # Every SMS went out in the end (none left pending in a retry's backoff, none failed).
    while True:
        with psycopg.connect(system.owner_url, autocommit=True) as conn:
            unsent = conn.execute("SELECT state, count(*) FROM outbox_messages WHERE state <> 'sent'"
                                  " GROUP BY state").fetchall()
        if not unsent or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert unsent == [], f"SMS not sent: {unsent}"
    # Each send is recorded on its session just after (payment_session.sms_sent): those events
    # too reach Kafka, within the settle time.
    while True:
        with psycopg.connect(system.owner_url, autocommit=True) as conn:
            pending = conn.execute("SELECT count(*) FROM outbox_pending").fetchone()
        if pending == (0,) or time.monotonic() > deadline:
            break
        time.sleep(1)
    audit = system.cli("audit", "verify")
    assert audit.returncode == 0, audit.stdout[-2000:] + audit.stderr[-2000:]

    with psycopg.connect(system.owner_url, autocommit=True) as conn:
        sessions = {str(r[0]): r[1] for r in conn.execute("SELECT session_id, status FROM session_status")}
        payments = {str(r[0]): r[1:] for r in conn.execute(
            "SELECT payment_id, status, captured_minor, refunded_minor FROM payment_status")}
        in_ledger = {str(r[0]) for r in conn.execute(
            "SELECT DISTINCT originator_id FROM ledger_events WHERE originator_id = ANY(%s::uuid[])",
            (list(record.sessions),))}
        stranded = conn.execute("SELECT payment_id, status FROM payment_status"
                                " WHERE status IN ('initiated', 'processing')").fetchall()
        unpublished = conn.execute("SELECT count(*) FROM outbox_pending").fetchone()
        texted = conn.execute("SELECT count(DISTINCT aggregate_id) FROM outbox_messages WHERE state = 'sent'"
                              " AND aggregate_id = ANY(%s::uuid[])", (list(record.sessions),)).fetchone()
    assert in_ledger == record.sessions, "an acknowledged session is not in the ledger"
    assert record.sessions <= set(sessions), "an acknowledged session is not in the read model"
    assert stranded == [] and unpublished == (0,)
    assert texted == (len(record.sessions),), "an acknowledged session's link was never texted"
    for payment_id in record.captured:
        assert payments[payment_id][1] == AMOUNT, payments[payment_id]
    for payment_id in record.refunded:
        assert payments[payment_id][2] == REFUND, payments[payment_id]

    # What a client reads (the cache in front of the read model) is what the read model says.
    with httpx.Client(base_url=system.url, headers={"Authorization": f"Bearer {system.merchant_key}"},
                      timeout=30) as merchant:
        for session_id in sorted(record.sessions):
            shown = merchant.get(f"/v1/payment-sessions/{session_id}")
            assert shown.status_code == 200 and shown.json()["status"] == sessions[session_id], (
                session_id, shown.text, sessions[session_id])
        for payment_id in sorted(record.captured):
            shown = merchant.get(f"/v1/payments/{payment_id}").json()
            assert (shown["status"], shown["captured_amount"], shown["refunded_amount"]) == payments[payment_id]

"""End to end, as a user meets it: the whole system started exactly as ``make run`` starts it
(``echotransact run``, a child process, on the bench's servers given by URL), loaded over HTTP
with keep-alive clients, against baselines run side by side.

- ``e2e.open_session_http``: ``POST /v1/payment-sessions`` (opens the session and queues its
  SMS), 8 clients, against the eventsourcing library used plainly (one aggregate created and
  saved per command, 8 threads) on the same PostgreSQL.
- ``e2e.open_session_http.vs_insert``: the same load against single-row INSERT + COMMIT, 8
  connections.
- ``e2e.journey``: full voice journeys over HTTP, 16 at once, no think time, against the
  library's plain 3-save lifecycle of one aggregate, 16 threads.
- ``e2e.get_session``: ``GET /v1/payment-sessions/{id}`` (cached) against a trivial Litestar
  endpoint with the same path and body, served the same way (uvicorn on a socket made as
  ``echotransact run`` makes it), 1 keep-alive client.

The open-session benchmark also reports, as absolute figures beside their conditions (in
``details``, printed under the table): the time from a POST's response to the session's row in
the read model, at half the write rate it measured, and the PostgreSQL connections the whole
system holds at rest after the load.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import secrets
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg

from api.bootstrap import app_database_url
from bench.context import BenchContext
from bench.harness import Benchmark, Metric, Sample

REPO = Path(__file__).resolve().parents[1]
CLIENTS = 8
_START_TIMEOUT_S = 180


def _session_body(reference: str) -> dict[str, Any]:
    return {"amount": 2500, "currency": "USD", "customer_phone": "+14155550123",
            "order": {"reference": reference,
                      "items": [{"sku": "PZ-L", "name": "Large pizza", "quantity": 1, "unit_amount": 2500}]},
            "voice": {"platform": "bench", "conversation_id": reference}}


class RunningSystem:
    """``echotransact run`` in a data directory of its own, on the bench's servers."""

    def __init__(self, ctx: BenchContext, tag: str, extra_env: dict[str, str] | None = None) -> None:
        self.ctx = ctx
        self.tag = tag
        self.extra_env = extra_env or {}
        self.data_dir = Path(tempfile.mkdtemp(prefix=f"echotransact-bench-{tag}-"))
        self.process: subprocess.Popen[str] | None = None
        self.url = ""
        self.merchant_key = ""
        self.application_prefix = "echotransact-"

    def start(self) -> None:
        env = {
            **os.environ,
            # As make run connects: migrations as the owner, everything else as echotransact_app.
            "MIGRATION_DATABASE_URL": self.ctx.database_url,
            "DATABASE_URL": app_database_url(self.ctx.database_url),
            "REDIS_URL": self.ctx.servers.redis_url,
            "KAFKA_BOOTSTRAP_SERVERS": self.ctx.servers.kafka_bootstrap_servers,
            "ECHOTRANSACT_DATA_DIR": str(self.data_dir),
            "ECHOTRANSACT_PORT": "0",
            "ECHOTRANSACT_TOPIC_PREFIX": f"bench-{self.ctx.run_token}-{self.tag}",
            # A load test is not a client to throttle (600 per minute per key by default).
            "ECHOTRANSACT_RATE_LIMIT_PER_MINUTE": "0",
            # The keys of the bench's database (each system here is one more deployment of it).
            **_keys(self.ctx),
            **self.extra_env,
        }
        env.pop("PGAPPNAME", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "run"], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        assert self.process.stdout is not None
        deadline = time.monotonic() + _START_TIMEOUT_S
        lines: list[str] = []
        for line in self.process.stdout:
            lines.append(line)
            if "merchant   key:" in line:
                self.merchant_key = line.split("key:")[1].strip()
            if "serving on " in line:
                self.url = line.split("serving on ")[1].strip()
                break
            if time.monotonic() > deadline:
                break
        if not self.url or not self.merchant_key:
            self.stop()
            raise RuntimeError("echotransact run did not start:\n" + "".join(lines[-30:]))
        # Keep reading, so a full pipe never blocks the system.
        threading.Thread(target=lambda: [None for _ in self.process.stdout], daemon=True).start()  # type: ignore[union-attr]
        self._wait_for_read_side()

    def _wait_for_read_side(self) -> None:
        """Until one session opened over HTTP shows in the read model (the worker has joined)."""
        with httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.merchant_key}"},
                          timeout=30) as client:
            created = client.post("/v1/payment-sessions", headers={"Idempotency-Key": uuid.uuid4().hex},
                                  json=_session_body("warm-up"))
            created.raise_for_status()
            session_id = created.json()["id"]
        deadline = time.monotonic() + _START_TIMEOUT_S
        with psycopg.connect(self.ctx.database_url, autocommit=True) as conn:
            while not conn.execute("SELECT 1 FROM session_status WHERE session_id = %s", (session_id,)).fetchone():
                if time.monotonic() > deadline:
                    raise RuntimeError("the read side did not catch up with the system's first session")
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self.process = None

    def connections(self) -> int:
        with psycopg.connect(self.ctx.database_url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
                " AND datname = current_database() AND application_name LIKE 'echotransact-%%'"
                " AND pid <> pg_backend_pid()"
            ).fetchone()
        return int(row[0]) if row else 0


def _keys(ctx: BenchContext) -> dict[str, str]:
    import base64

    keys = {"ECHOTRANSACT_HASH_KEY": ctx.settings.hash_key, "ECHOTRANSACT_ENCRYPTION_KEY": ctx.settings.encryption_key,
            "ECHOTRANSACT_VAULT_KEY": ctx.settings.vault_key, "ECHOTRANSACT_MASTER_KEY": ctx.settings.master_key}
    return {name: base64.b64encode(key).decode() for name, key in keys.items() if key}


class _KeepAliveClient:
    """One keep-alive HTTP/1.1 connection (the standard library's http.client, TCP_NODELAY, head
    and body in one send): a load generator that takes about a fifth of httpx's CPU per request,
    so that on a machine of 2 cores the load does not take the CPU from the system it measures."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        parsed = urllib.parse.urlsplit(url)
        self._conn = http.client.HTTPConnection(parsed.hostname or "127.0.0.1", parsed.port, timeout=60)
        self._headers = headers

    def post_json(self, path: str, body: Any, headers: dict[str, str]) -> tuple[int, bytes]:
        encoded = json.dumps(body).encode()
        self._conn.request("POST", path, body=encoded,
                           headers={**self._headers, "Content-Type": "application/json", **headers})
        response = self._conn.getresponse()
        return response.status, response.read()

    def close(self) -> None:
        self._conn.close()


def _post_load(url: str, key: str, commands: int, clients: int) -> tuple[float, list[float]]:
    """POST ``commands`` sessions with ``clients`` keep-alive clients: (commands/s, latencies)."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    shares = [commands // clients + (1 if c < commands % clients else 0) for c in range(clients)]

    def work(share: int) -> None:
        client = _KeepAliveClient(url, {"Authorization": f"Bearer {key}"})
        try:
            for _ in range(share):
                reference = uuid.uuid4().hex
                started = time.perf_counter()
                status, body = client.post_json("/v1/payment-sessions", _session_body(reference),
                                                {"Idempotency-Key": reference})
                took = time.perf_counter() - started
                with lock:
                    if status == 201:
                        latencies.append(took)
                    else:
                        errors.append(f"{status} {body[:200].decode(errors='replace')}")
        finally:
            client.close()

    threads = [threading.Thread(target=work, args=(s,)) for s in shares]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} POSTs failed, e.g. {errors[0]}")
    return len(latencies) / elapsed, latencies


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def projection_lag(system: RunningSystem, rate_per_s: float, commands: int) -> dict[str, float | str]:
    """Paced POSTs at ``rate_per_s``; for each, the time from its response to its row in
    ``session_status`` (polled every 2 ms on one connection)."""
    pending: dict[str, float] = {}
    lags: list[float] = []
    lock = threading.Lock()
    done = threading.Event()

    def watch() -> None:
        with psycopg.connect(system.ctx.database_url, autocommit=True) as conn:
            deadline = None
            while not done.is_set() or pending:
                if done.is_set():
                    deadline = deadline or time.monotonic() + 30
                    if time.monotonic() > deadline:
                        return
                with lock:
                    ids = list(pending)
                if ids:
                    seen = [r[0] for r in conn.execute(
                        "SELECT session_id::text FROM session_status WHERE session_id = ANY(%s::uuid[])", (ids,))]
                    now = time.perf_counter()
                    with lock:
                        lags.extend(now - pending.pop(i) for i in seen)
                time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with httpx.Client(base_url=system.url, headers={"Authorization": f"Bearer {system.merchant_key}"},
                      timeout=60) as client:
        next_at = time.perf_counter()
        for _ in range(commands):
            reference = uuid.uuid4().hex
            response = client.post("/v1/payment-sessions", headers={"Idempotency-Key": reference},
                                   json=_session_body(reference))
            response.raise_for_status()
            with lock:
                pending[response.json()["id"]] = time.perf_counter()
            next_at += 1 / rate_per_s
            time.sleep(max(0.0, next_at - time.perf_counter()))
    done.set()
    watcher.join(60)
    if not lags:
        raise RuntimeError("no session reached the read model")
    return {"rate_per_s": round(rate_per_s, 1), "sessions": len(lags), "never_seen": len(pending),
            "p50_ms": round(_percentile(lags, 0.5) * 1000, 1), "p99_ms": round(_percentile(lags, 0.99) * 1000, 1),
            "max_ms": round(max(lags) * 1000, 1), "target": "p99 <= 250 ms, max <= 500 ms"}


# -- baselines --------------------------------------------------------------------------------

_PLAIN_APP = textwrap.dedent('''
    from eventsourcing.application import Application
    from eventsourcing.domain import Aggregate, event

    class Order(Aggregate):
        @event("Opened")
        def __init__(self, reference: str, amount_minor: int) -> None:
            self.reference, self.amount_minor = reference, amount_minor

        class Paid(Aggregate.Event):
            pass

        class Captured(Aggregate.Event):
            pass

    class BenchPlain(Application):
        pass
''')


_PLAIN_NAMESPACE: dict[str, Any] = {}


def _plain_application(database_url: str) -> Any:
    """The eventsourcing library used plainly: its own recorder and table, no outbox."""
    from api.bootstrap import eventsourcing_env

    if not _PLAIN_NAMESPACE:  # once per process: the library refuses a second class for one topic
        exec(compile(_PLAIN_APP, "bench_plain", "exec"), _PLAIN_NAMESPACE)
    namespace = _PLAIN_NAMESPACE
    env = {**eventsourcing_env(database_url), "CREATE_TABLE": "y", "PERSISTENCE_MODULE": "eventsourcing.postgres",
           "POSTGRES_POOL_SIZE": str(CLIENTS), "POSTGRES_PRE_PING": "n"}
    app = namespace["BenchPlain"](env)
    return app, namespace["Order"]


def _threads(clients: int, count: int, work: Any) -> float:
    shares = [count // clients + (1 if c < count % clients else 0) for c in range(clients)]
    threads = [threading.Thread(target=work, args=(c, s)) for c, s in enumerate(shares)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


class E2eOpenSession(Benchmark):
    def __init__(self, ctx: BenchContext, commands: int, *, versus: str = "library") -> None:
        self.ctx = ctx
        self.commands = commands
        self.versus = versus
        self.name = "e2e.open_session_http" + ("" if versus == "library" else ".vs_insert")
        self.ours = f"POST /v1/payment-sessions to `echotransact run`, {CLIENTS} keep-alive clients"
        if versus == "library":
            self.baseline = f"the eventsourcing library's plain save of a new aggregate, {CLIENTS} threads"
            target, why = 1.0, "issue 8: at least the library's plain saves/s over HTTP"
        else:
            self.baseline = f"single-row INSERT + COMMIT with psycopg, {CLIENTS} connections"
            target, why = 10.0, "issue 8: at least 0.1x raw single-row commits"
        self.metrics = (Metric("commands_per_s", "commands/s", higher_is_better=True, target_ratio=target,
                               target_why=why),)
        self.system: RunningSystem | None = None
        self._details: dict[str, Any] = {}
        self._rates: list[float] = []

    def setup(self) -> None:
        self.system = RunningSystem(self.ctx, "open" if self.versus == "library" else "openins")
        self.system.start()
        if self.versus == "library":
            self._app, self._order = _plain_application(self.ctx.database_url)
        else:
            with psycopg.connect(self.ctx.database_url, autocommit=True) as conn:
                conn.execute("CREATE TABLE IF NOT EXISTS bench_e2e_inserts"
                             " (id bigserial PRIMARY KEY, reference text NOT NULL, payload bytea NOT NULL)")

    def run_ours(self, round_no: int) -> Sample:
        assert self.system is not None
        rate, latencies = _post_load(self.system.url, self.system.merchant_key, self.commands, CLIENTS)
        self._rates.append(rate)
        return {"commands_per_s": rate, "p50_ms": statistics.median(latencies) * 1000}

    def run_baseline(self, round_no: int) -> Sample:
        if self.versus == "library":
            app, order = self._app, self._order

            def work(client: int, share: int) -> None:  # every client saves through the one app
                for _ in range(share):
                    app.save(order(reference=uuid.uuid4().hex, amount_minor=2500))
        else:
            payload = secrets.token_bytes(600)
            connections = [psycopg.connect(self.ctx.database_url) for _ in range(CLIENTS)]

            def work(client: int, share: int) -> None:
                conn = connections[client]
                for _ in range(share):
                    conn.execute("INSERT INTO bench_e2e_inserts (reference, payload) VALUES (%s, %s)",
                                 (uuid.uuid4().hex, payload))
                    conn.commit()
        try:
            elapsed = _threads(CLIENTS, self.commands, work)
        finally:
            if self.versus != "library":
                for conn in connections:
                    conn.close()
        return {"commands_per_s": self.commands / elapsed}

    def describe(self) -> dict[str, Any]:
        """After the rounds (open_session_http only): the read side's lag at half the write rate
        measured, and the connections at rest."""
        if self.versus != "library" or self.system is None or not self._rates:
            return {}
        rate = statistics.median(self._rates) / 2
        self._details["projection_lag"] = projection_lag(self.system, rate, max(50, min(2_000, int(rate * 10))))
        time.sleep(10)  # at rest: pools close what they do not need after 2 s
        self._details["connections_at_rest"] = {"count": self.system.connections(), "target": "<= 12",
                                                "after_idle_s": 10}
        return self._details

    def close(self) -> None:
        if self.system is not None:
            self.system.stop()
        if self.versus == "library" and hasattr(self, "_app"):
            self._app.close()


_TRIVIAL_APP = textwrap.dedent('''
    import socket, sys, uuid
    import uvicorn
    from litestar import Litestar, get

    BODY = sys.argv[2].encode()

    @get("/v1/payment-sessions/{session_id:uuid}", media_type="application/json")
    async def read(session_id: uuid.UUID) -> bytes:
        return BODY

    # The listening socket made as `echotransact run` makes it (api/cli.py _serve_api).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    print(sock.getsockname()[1], flush=True)
    uvicorn.Server(uvicorn.Config(Litestar([read]), log_config=None, access_log=False)).run(sockets=[sock])
''')


class E2eGetSession(Benchmark):
    name = "e2e.get_session"
    ours = "GET /v1/payment-sessions/{id} from `echotransact run` (Redis-cached status), 1 keep-alive client"
    baseline = "a trivial Litestar endpoint, same path and body, uvicorn on a socket made the same way"
    metrics = (
        Metric("p50_ms", "p50 ms", higher_is_better=False, target_ratio=2.0, target_why="issue 8"),
        Metric("p99_ms", "p99 ms", higher_is_better=False, target_ratio=3.0, target_why="issue 8"),
    )

    def __init__(self, ctx: BenchContext, requests: int) -> None:
        self.ctx = ctx
        self.requests = requests
        self.system: RunningSystem | None = None
        self.trivial: subprocess.Popen[str] | None = None

    def setup(self) -> None:
        self.system = RunningSystem(self.ctx, "get")
        self.system.start()
        self.headers = {"Authorization": f"Bearer {self.system.merchant_key}"}
        with httpx.Client(base_url=self.system.url, headers=self.headers, timeout=30) as client:
            created = client.post("/v1/payment-sessions", headers={"Idempotency-Key": uuid.uuid4().hex},
                                  json=_session_body("get"))
            created.raise_for_status()
            self.session_id = created.json()["id"]
            deadline = time.monotonic() + 60
            while True:  # until the read model (and so the cache) has it
                read = client.get(f"/v1/payment-sessions/{self.session_id}")
                if read.status_code == 200 and read.json().get("status") == "link_sent":
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("the session never reached the read model")
                time.sleep(0.05)
            self.body = client.get(f"/v1/payment-sessions/{self.session_id}").text
        self.trivial = subprocess.Popen([sys.executable, "-c", _TRIVIAL_APP, "", self.body], cwd=REPO,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.trivial.stdout is not None
        port = int(self.trivial.stdout.readline())
        self.trivial_url = f"http://127.0.0.1:{port}"
        _wait_for_port(port)

    def _latencies(self, url: str, headers: dict[str, str]) -> Sample:
        with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
            path = f"/v1/payment-sessions/{self.session_id}"
            for _ in range(20):
                client.get(path).raise_for_status()
            took = []
            for _ in range(self.requests):
                started = time.perf_counter()
                client.get(path).raise_for_status()
                took.append(time.perf_counter() - started)
        return {"p50_ms": _percentile(took, 0.5) * 1000, "p99_ms": _percentile(took, 0.99) * 1000}

    def run_ours(self, round_no: int) -> Sample:
        assert self.system is not None
        return self._latencies(self.system.url, self.headers)

    def run_baseline(self, round_no: int) -> Sample:
        return self._latencies(self.trivial_url, {})

    def close(self) -> None:
        if self.system is not None:
            self.system.stop()
        if self.trivial is not None:
            self.trivial.terminate()
            self.trivial.wait(10)


def _wait_for_port(port: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


JOURNEYS = 16


# One TLS context for every client the harness opens: httpx builds one per client otherwise,
# loading the CA store each time (about 20 ms of the harness's CPU per client, taken from the
# system it measures on the same cores). The URLs are plain http; it is never used.
_TLS = ssl.create_default_context()

# How often a journey's client looks again for what it waits on (the SMS, the session's payment),
# as a voice platform polling would; not a busy loop that takes the CPU from the system it measures.
POLL_S = 0.02


def _journey(api: httpx.Client, inbox: psycopg.Connection[Any], url: str, phone: str) -> None:
    """One voice journey with no think time: open, the SMS, the page, the code, the card (which
    authorizes), the session read until it names its payment, the capture. ``api`` is the voice
    platform's keep-alive client and ``inbox`` a connection to the development SMS mailbox, both
    kept by the harness's thread from one journey to the next (a voice platform keeps its
    connections; a PostgreSQL connection per journey cost the database a backend's start each
    time); the customer's page is a new client (another phone) every journey."""
    from api.demo import _hidden_fields, fresh_test_card

    reference = uuid.uuid4().hex
    body = {**_session_body(reference), "customer_phone": phone}
    with httpx.Client(base_url=url, timeout=60, follow_redirects=True, verify=_TLS) as page:
        created = api.post("/v1/payment-sessions", headers={"Idempotency-Key": reference}, json=body)
        created.raise_for_status()
        session_id = created.json()["id"]
        deadline = time.monotonic() + 60
        # The customer's phone: the mailbox asked every POLL_S (a connection per look, every
        # 5 ms, once cost the system more CPU than the journeys themselves).
        while not (row := inbox.execute("SELECT body FROM dev_sms_inbox WHERE to_phone = %s",
                                        (phone,)).fetchone()):
            if time.monotonic() > deadline:
                raise RuntimeError("no SMS within 60 s")
            time.sleep(POLL_S)
        link, code = row[0].split("/pay/")[1].split(" - your code is ")
        link, code = "/pay/" + link, code[:6]
        summary = page.get(link)
        summary.raise_for_status()
        card_page = page.post(f"{link}/code", data={"code": code, **_hidden_fields(summary.text)})
        if "card_number" not in card_page.text:
            raise RuntimeError(f"the code was refused ({card_page.status_code})")
        expiry = f"12/{(time.gmtime().tm_year + 3) % 100:02d}"
        # A customer per journey, each with a card of their own (one card paying every journey
        # would serialize them all on its velocity count, which no real traffic does).
        paid = page.post(f"{link}/card", data={"card_number": fresh_test_card(), "expiry": expiry, "cvv": "123",
                                               **_hidden_fields(card_page.text)})
        if paid.status_code != 200:
            text = re.sub(r"<[^>]+>", " ", paid.text)[-400:]
            raise RuntimeError(f"the card was refused ({paid.status_code}): {text}")
        while True:
            status = api.get(f"/v1/payment-sessions/{session_id}").json()
            if status.get("payment_id") and status.get("status") == "completed":
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the session never showed its payment ({status.get('status')})")
            time.sleep(POLL_S)
        captured = api.post(f"/v1/payments/{status['payment_id']}/capture",
                            headers={"Idempotency-Key": f"cap-{reference}"})
        if captured.status_code != 200:
            raise RuntimeError(f"capture failed: {captured.status_code} {captured.text[:200]}")


class E2eJourney(Benchmark):
    name = "e2e.journey"
    ours = (f"full voice journeys over HTTP to `echotransact run` (open, SMS, page, code, card + authorize, "
            f"capture), {JOURNEYS} at once, no think time")
    baseline = f"the eventsourcing library's plain 3-save lifecycle of one aggregate, {JOURNEYS} threads"
    metrics = (Metric("journeys_per_s", "journeys/s", higher_is_better=True, target_ratio=5.0,
                      target_why="issue 8: at least 0.2x the library's plain lifecycles/s"),)

    def __init__(self, ctx: BenchContext, journeys: int) -> None:
        self.ctx = ctx
        self.journeys = max(JOURNEYS, journeys)
        self.system: RunningSystem | None = None
        # From 2000000: +1 415 0xx and 1xx numbers do not exist, and the API refuses them.
        self._phones = (f"+1415{n:07d}" for n in range(2_000_000, 9_999_999))

    def setup(self) -> None:
        # As make run starts it: every journey is another customer (phone and card), so the
        # velocity rules never enter into it.
        self.system = RunningSystem(self.ctx, "journey")
        self.system.start()
        self._app, self._order = _plain_application(self.ctx.database_url)

    def run_ours(self, round_no: int) -> Sample:
        assert self.system is not None
        system = self.system
        phones = [next(self._phones) for _ in range(self.journeys)]
        errors: list[BaseException] = []

        def work(client: int, share: int) -> None:
            with httpx.Client(base_url=system.url, headers={"Authorization": f"Bearer {system.merchant_key}"},
                              timeout=60, verify=_TLS) as api, \
                    psycopg.connect(self.ctx.database_url, autocommit=True) as inbox:
                for index in range(share):
                    try:
                        _journey(api, inbox, system.url, phones[client + index * JOURNEYS])
                    except BaseException as error:
                        errors.append(error)

        elapsed = _threads(JOURNEYS, self.journeys, work)
        if errors:
            raise RuntimeError(f"{len(errors)} journeys failed, e.g. {errors[0]!r}")
        return {"journeys_per_s": self.journeys / elapsed}

    def run_baseline(self, round_no: int) -> Sample:
        app, order = self._app, self._order

        def work(_client: int, share: int) -> None:
            for _ in range(share):
                aggregate = order(reference=uuid.uuid4().hex, amount_minor=2500)
                app.save(aggregate)
                aggregate.trigger_event(order.Paid)
                app.save(aggregate)
                aggregate.trigger_event(order.Captured)
                app.save(aggregate)

        return {"journeys_per_s": self.journeys / _threads(JOURNEYS, self.journeys, work)}

    def close(self) -> None:
        if self.system is not None:
            self.system.stop()
        if hasattr(self, "_app"):
            self._app.close()

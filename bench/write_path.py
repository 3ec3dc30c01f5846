"""The command write path: ``Ledger.open_session`` against plain single-row INSERT + COMMIT.

One open_session is a whole idempotent command: look the command id up, load the merchant,
decide, then write the event, its outbox row and the command record in one transaction under
the event table's exclusive lock. The baseline is what PostgreSQL does with the least work per
transaction: one row, one commit, on the same database and with the same number of clients.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg

from bench.context import BenchContext
from bench.harness import Benchmark, Metric, Sample

_BASELINE_TABLE = """
CREATE TABLE IF NOT EXISTS bench_baseline_writes (
    id bigserial PRIMARY KEY,
    command_id text NOT NULL,
    payload bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
)
"""
# About the size of an encrypted PaymentSession.Opened: the row is not what costs, the commit is.
_PAYLOAD_BYTES = 600


class WritePath(Benchmark):
    baseline = "single-row INSERT + COMMIT with psycopg, one connection per client"

    def __init__(self, ctx: BenchContext, commands: int, clients: int = 1) -> None:
        self.ctx = ctx
        self.commands = commands
        self.clients = clients
        plural = "s" if clients > 1 else ""
        self.name = f"write.open_session.{clients}client{plural}"
        self.ours = (f"Ledger.open_session: event + outbox row + command log, one transaction "
                     f"({clients} thread{plural})")
        # Measured on this machine kind: raw single-row commits about 5,300/s (1 client) and
        # 11,400/s (8); the eventsourcing library's own one-event save about 670/s (1 client) and
        # 500/s (4 threads). The library's ratio to raw commits is the bar ("the numbers to beat").
        target = 8.0 if clients == 1 else 18.0
        self.metrics = (
            Metric("commands_per_s", "commands/s", higher_is_better=True, target_ratio=target,
                   target_why="the eventsourcing library's bare save vs raw commits"),
        )
        self._pool: ThreadPoolExecutor | None = None
        self._connections: list[psycopg.Connection[Any]] = []
        self._payload = secrets.token_bytes(_PAYLOAD_BYTES)

    def setup(self) -> None:
        ledger, merchant_id = self.ctx.ledger, self.ctx.merchant_id
        ledger.get_merchant(merchant_id)  # connections of the ledger's pool opened
        with psycopg.connect(self.ctx.database_url, autocommit=True) as conn:
            conn.execute(_BASELINE_TABLE)
        self._connections = [psycopg.connect(self.ctx.database_url) for _ in range(self.clients)]
        if self.clients > 1:
            self._pool = ThreadPoolExecutor(self.clients, thread_name_prefix="bench-write")

    def _spread(self, work: Callable[[int, range], None]) -> float:
        """Run work(client, indexes) for every client at once; return the seconds it took."""
        shares = [range(c, self.commands, self.clients) for c in range(self.clients)]
        started = time.perf_counter()
        if self._pool is None:
            work(0, shares[0])
        else:
            for future in [self._pool.submit(work, c, share) for c, share in enumerate(shares)]:
                future.result()
        return time.perf_counter() - started

    def run_ours(self, round_no: int) -> Sample:
        ledger, merchant_id = self.ctx.ledger, self.ctx.merchant_id

        def work(_client: int, indexes: range) -> None:
            for i in indexes:
                self.ctx.open_session(ledger, merchant_id,
                                      self.ctx.command_id(self.name, round_no, i), amount_minor=1_000 + i)

        return {"commands_per_s": self.commands / self._spread(work)}

    def run_baseline(self, round_no: int) -> Sample:
        def work(client: int, indexes: range) -> None:
            conn = self._connections[client]
            for i in indexes:
                conn.execute("INSERT INTO bench_baseline_writes (command_id, payload) VALUES (%s, %s)",
                             (self.ctx.command_id(self.name, round_no, i), self._payload))
                conn.commit()

        return {"commands_per_s": self.commands / self._spread(work)}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        for conn in self._connections:
            conn.close()
        self._connections = []

    def describe(self) -> dict[str, Any]:
        return {"commands_per_round": self.commands, "clients": self.clients,
                "baseline_payload_bytes": _PAYLOAD_BYTES}

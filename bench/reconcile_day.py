"""Reconciling a processor's day: ``Ledger.reconcile`` against a plain SQL join of the same report.

Ours is the whole command as the reconciler runs it: the settlement report fetched over HTTP
from a real ``SandboxProcessorServer``, checked and matched (domain/reconciliation.py) against our
captures and refunds read from the read side (audit_log and payment_status), and the
Reconciliation saved in one transaction with the settlement of every matched payment (each one
loaded from the event store first). The baseline is the least PostgreSQL does to find the same
matches: the report's lines, loaded untimed into a temporary table with COPY, joined to
audit_log and payment_status on processor reference, kind and amount, the matched rows fetched.
Both count report lines per second.

A (processor, day, currency) reconciles once (a second run is a replay), so every round has a
fresh set of payments of its own in a currency of its own, seeded untimed the first time either
side asks for the round: one merchant, N payments taken through the whole journey on a real
Ledger with the ``HttpProcessor`` (so the sandbox records the captures and refunds), every
``REFUND_EVERY``-th one partly refunded, and the read side caught up. The first timed round is
USD; the warm-up uses the last currency of the list.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any
from uuid import UUID

import psycopg

from adapters.dev.processor_server import SandboxProcessorServer
from adapters.processors.client import HttpProcessor
from adapters.processors.settlement import HttpSettlementReports
from api.bootstrap import build_ledger, envelope_opener, personal_data_reader
from application.ledger import Ledger
from bench.context import BenchContext
from bench.harness import Benchmark, Metric, Sample
from projections.engine import ProjectionStore
from projections.registry import all_projections

PROCESSOR = "primary"
# One currency per round (all with two decimals, so the same amounts stay under every identity
# threshold): timed round r uses CURRENCIES[r - 1], the warm-up (round 0) the last one.
CURRENCIES = ("USD", "EUR", "GBP", "CAD", "AUD", "NZD", "CHF", "SEK", "NOK", "DKK", "MXN", "INR", "SGD")
MAX_ROUNDS = len(CURRENCIES) - 1
REFUND_EVERY = 5  # every fifth payment is partly refunded: its report has a refund line too
SEED_THREADS = 4  # untimed seeding overlaps its HTTP and database round trips

_LINES_TABLE = """
CREATE TEMPORARY TABLE bench_report_lines (
    reference text NOT NULL,
    kind text NOT NULL,
    gross_minor bigint NOT NULL,
    fee_minor bigint NOT NULL,
    net_minor bigint NOT NULL,
    deposit_id text NOT NULL,
    transaction_day date NOT NULL
)
"""

# The matched lines: same reference, kind and amount as a capture or refund we recorded with
# this processor in this currency.
_MATCHED = """
SELECT l.reference, l.kind, a.aggregate_id, l.gross_minor, l.fee_minor, l.deposit_id
FROM bench_report_lines l
JOIN audit_log a ON a.data->>'processor_reference' = l.reference
 AND a.event_type = CASE l.kind WHEN 'capture' THEN 'payment.captured' ELSE 'payment.refunded' END
JOIN payment_status p ON p.payment_id = a.aggregate_id
WHERE p.processor = %(processor)s AND p.currency = %(currency)s
  AND (a.data->>'amount_minor')::bigint = abs(l.gross_minor)
"""


@dataclass(frozen=True)
class _Round:
    currency: str
    day: date
    captures: int
    refunds: int
    rows: list[tuple[Any, ...]]  # the report's lines, for the baseline's COPY

    @property
    def lines(self) -> int:
        return self.captures + self.refunds


def currency_of(round_no: int) -> str:
    if round_no > MAX_ROUNDS:
        raise ValueError(f"reconcile.day reconciles one currency per round: at most {MAX_ROUNDS} rounds")
    return CURRENCIES[round_no - 1] if round_no > 0 else CURRENCIES[-1]


class ReconcileDay(Benchmark):
    name = "reconcile.day"
    ours = ("Ledger.reconcile: report over HTTP from the sandbox, matched against the read side, "
            "every matched payment settled in one save")
    baseline = "report lines COPY'd to a temp table, joined to audit_log + payment_status on reference"
    metrics = (
        # Measured on this machine kind (--quick, 360 lines): the join about 80k lines/s, ours about
        # 1k (86x), three quarters of it in loading each matched payment by itself (2 queries per
        # payment). Even loaded in one query, each matched payment's events are still decoded and
        # one encrypted event + outbox row per payment written: about 40x by the same profile.
        Metric("lines_per_s", "report lines/s", higher_is_better=True, target_ratio=50.0,
               target_why="0.02x the join: payments loaded in one query, not one by one"),
    )

    def __init__(self, ctx: BenchContext, payments: int) -> None:
        self.ctx = ctx
        self.payments = payments
        self._sandbox: SandboxProcessorServer | None = None
        self._processor: HttpProcessor | None = None
        self._ledger: Ledger | None = None
        self._merchant_id: UUID | None = None
        self._store: ProjectionStore | None = None
        self._reports: HttpSettlementReports | None = None
        self._conn: psycopg.Connection[Any] | None = None
        self._rounds: dict[int, _Round] = {}
        self._seed_seconds: list[float] = []

    def setup(self) -> None:
        ctx = self.ctx
        self._sandbox = SandboxProcessorServer(PROCESSOR)
        url = self._sandbox.start()
        self._processor = HttpProcessor(PROCESSOR, url)
        self._ledger = build_ledger(ctx.settings.replace(processors={PROCESSOR: url}), ctx.database_url,
                                    processor=self._processor)
        self._merchant_id = ctx.register_merchant(self._ledger, "reconcile")
        projections = list(all_projections(personal_data_reader(ctx.settings)).values())
        self._store = ProjectionStore(ctx.database_url, projections, envelope_opener(ctx.settings))
        self._reports = HttpSettlementReports({PROCESSOR: url})
        self._conn = psycopg.connect(ctx.database_url, autocommit=True)
        self._conn.execute(_LINES_TABLE)

    # -- the round's data, seeded once for both sides ------------------------------------------

    def _pay(self, currency: str, round_no: int, i: int) -> bool:
        """One customer's payment captured (and refunded in part, every REFUND_EVERY-th); True
        when refunded."""
        ledger, merchant_id, ctx = self._ledger, self._merchant_id, self.ctx
        assert ledger is not None and merchant_id is not None
        amount = 1_000 + (i % 40) * 25

        def cid(step: str) -> str:
            return ctx.command_id("reconcile", round_no, i, step)

        # Another customer and card each time: the risk rules' velocity limits never trip.
        customer = round_no * 1_000_000 + i
        session_id = UUID(ledger.open_session(
            cid("open"), merchant_id=merchant_id, amount_minor=amount, currency=currency,
            customer_phone=f"+1999{customer:08d}", order_reference=f"REC-{round_no}-{i}",
            line_items=[{"sku": "PZ-L", "name": "Large pizza", "quantity": 1, "unit_amount_minor": amount}],
            voice_platform="alexa", conversation_id=f"rec-{round_no}-{i}",
            callback_url="https://voice.example/callback",
        ).result["session_id"])
        link = ledger.send_link(cid("send"), session_id)
        ledger.open_link(cid("link"), session_id, link.link_token)
        ledger.verify_code(cid("code"), session_id, link.code)
        payment_id = UUID(ledger.attach_payment_method(
            cid("attach"), session_id, card_token=f"tok_rec_{ctx.run_token}_{customer}", card_brand="visa",
            card_last4="4242",
        ).result["payment_id"])
        authorized = ledger.authorize_payment(payment_id)
        if authorized.result.get("status") != "authorized":
            raise RuntimeError(f"payment {i} of round {round_no} was not authorized: {authorized.result}")
        ledger.capture_payment(cid("capture"), payment_id)
        if i % REFUND_EVERY:
            return False
        ledger.refund_payment(cid("refund"), payment_id, amount_minor=amount // 4)
        return True

    def _round(self, round_no: int) -> _Round:
        prepared = self._rounds.get(round_no)
        if prepared is not None:
            return prepared
        assert self._sandbox is not None and self._store is not None and self._reports is not None
        assert self._conn is not None
        currency = currency_of(round_no)
        day = datetime.now(UTC).date()
        self._sandbox.close_day(day)  # today's report is final, as the next day's reconciler sees it
        started = time.perf_counter()
        with ThreadPoolExecutor(SEED_THREADS, thread_name_prefix="bench-reconcile-seed") as pool:
            refunds = sum(pool.map(lambda i: self._pay(currency, round_no, i), range(self.payments)))
        self._store.catch_up(grace=timedelta(0))
        self._conn.execute("ANALYZE audit_log")  # statistics as autovacuum would keep them
        self._conn.execute("ANALYZE payment_status")
        self._seed_seconds.append(time.perf_counter() - started)
        report = self._reports.fetch(PROCESSOR, day, currency)
        rows = [(line.processor_reference, line.kind, line.gross_minor, line.fee_minor, line.net_minor,
                 line.deposit_id, line.transaction_day) for line in report.lines]
        if len(rows) != self.payments + refunds:
            raise RuntimeError(f"the {day} {currency} report lists {len(rows)} lines, not "
                               f"{self.payments + refunds} (did the seeding cross midnight UTC?)")
        prepared = self._rounds[round_no] = _Round(currency, day, self.payments, refunds, rows)
        return prepared

    # -- the two sides ----------------------------------------------------------------------------

    def run_ours(self, round_no: int) -> Sample:
        prepared = self._round(round_no)
        assert self._ledger is not None
        started = time.perf_counter()
        result = self._ledger.reconcile(PROCESSOR, prepared.day, prepared.currency)
        elapsed = time.perf_counter() - started
        done = result.result
        if (result.replayed or done["counts"]["matched"] != prepared.lines or done["settled"] != prepared.captures
                or done["refunds_settled"] != prepared.refunds):
            raise RuntimeError(f"round {round_no} ({prepared.currency}) reconciled as {done['counts']}, "
                               f"{done['settled']} settled, {done['refunds_settled']} refunds settled "
                               f"(replayed: {result.replayed}); expected {prepared.lines} matched")
        return {"lines_per_s": prepared.lines / elapsed}

    def run_baseline(self, round_no: int) -> Sample:
        prepared = self._round(round_no)
        conn = self._conn
        assert conn is not None
        with conn.transaction():
            conn.execute("TRUNCATE bench_report_lines")
            with conn.cursor().copy(
                "COPY bench_report_lines (reference, kind, gross_minor, fee_minor, net_minor, deposit_id,"
                " transaction_day) FROM STDIN"
            ) as copy:
                for row in prepared.rows:
                    copy.write_row(row)
        conn.execute("ANALYZE bench_report_lines")
        started = time.perf_counter()
        matched = conn.execute(_MATCHED, {"processor": PROCESSOR, "currency": prepared.currency}).fetchall()
        elapsed = time.perf_counter() - started
        if len(matched) != prepared.lines:
            raise RuntimeError(f"the join matched {len(matched)} of {prepared.lines} lines")
        return {"lines_per_s": prepared.lines / elapsed}

    def close(self) -> None:
        for part in (self._conn, self._reports, self._store, self._ledger, self._processor):
            if part is not None:
                part.close()
        self._conn = self._reports = self._store = self._ledger = self._processor = None
        if self._sandbox is not None:
            self._sandbox.stop()
            self._sandbox = None

    def describe(self) -> dict[str, Any]:
        rounds = sorted(self._rounds.items())
        return {"payments_per_round": self.payments, "refund_every": REFUND_EVERY,
                "lines_per_round": {r.currency: r.lines for _, r in rounds},
                "seed_seconds_per_round": [round(s, 1) for s in self._seed_seconds]}

"""Read views for the HTTP API: straight SQL over the read tables, in a transaction in which
PostgreSQL's row-level security (migrations/0004) shows only what the caller's scope may see.

Every query filters by merchant in SQL as well; the policies are the second wall, so a wrong or
missing filter here still cannot show one merchant another's rows. The compliance reports (the
audit chain's verification and the audit export) read the same way, on a connection of their own
because they run long.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal, Self
from uuid import UUID

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from application.masking import PersonalDataReader
from projections.audit import COLUMNS as AUDIT_COLUMNS
from projections.audit import ChainReport, verify_chain
from projections.evidence import opened_personal
from projections.reconciliations import OUTCOMES as RECONCILIATION_OUTCOMES

READER_ROLE = "echotransact_reader"
ROLES = ("merchant", "analyst", "compliance", "admin")
GRANULARITIES = ("day", "week", "month")
MAX_PAGE = 100
MAX_AUDIT_PAGE = 1_000
# The hash chain runs through every audit row: only a scope that sees them all can check it.
WHOLE_AUDIT_ROLES = ("compliance", "admin")
# Who sees the platform's own rows, which belong to no merchant (reconciliations: migrations/0016).
PLATFORM_ROLES = ("compliance", "admin")
_RECONCILIATION_COLUMNS = (
    "reconciliation_id, processor, day, currency, matched_count, amount_mismatch_count, missing_from_report_count,"
    " unknown_to_us_count, late_count, discrepancy_count, deposits, reconciled_at, version, position"
)

_DISPUTE_COLUMNS = (
    "dispute_id, merchant_id, payment_id, processor, status, reason, amount_minor, currency, fee_minor, due_by,"
    " evidence_submitted_at, reminded, opened_at, closed_at, updated_at"
)
_PAYOUT_COLUMNS = (
    "payout_id, merchant_id, currency, cutoff, status, amount_minor, carried_in_minor, reserve_held_minor,"
    " reserve_released_minor, line_count, bank_reference, failure_reason, created_at, updated_at"
)

Granularity = Literal["day", "week", "month"]
HistoryGranularity = Literal["hour", "day"]
HISTORY_STEPS = {"hour": timedelta(hours=1), "day": timedelta(days=1)}
# A balance history's points at most: a chart's worth (41 days by the hour, 2.7 years by the day).
MAX_HISTORY_POINTS = 1_000
Row = dict[str, Any]


@dataclass(frozen=True)
class Scope:
    """Who is reading: a merchant sees its own rows; analyst, compliance and admin see rows of
    every merchant, each in the tables the policies give it."""

    role: str
    merchant_id: UUID | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {self.role!r}")
        if (self.role == "merchant") != (self.merchant_id is not None):
            raise ValueError("a merchant scope needs a merchant id, and only a merchant scope has one")


class OutOfRange(ValueError):
    """A time a read cannot answer for (no time zone, in the future, before what it asks about
    existed, a range too long), naming the parameter it came in."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def check_moment(field: str, moment: datetime) -> None:
    if moment.tzinfo is None:
        raise OutOfRange(field, f"{field} needs a time zone offset (RFC 3339), e.g. 2026-11-23T10:00:00Z")
    try:
        moment.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00: no instant in UTC
        raise OutOfRange(field, f"{field} {moment.isoformat()} is out of range") from None
    if moment > datetime.now(UTC):
        raise OutOfRange(field, f"{field} {moment.isoformat()} is in the future")


def _plain(row: Mapping[str, Any]) -> Row:
    return {k: str(v) if isinstance(v, UUID) else v for k, v in row.items()}


def _check_dates(date_from: date, date_to: date) -> None:
    if date_from > date_to:
        raise ValueError(f"date_from {date_from} is after date_to {date_to}")


def _check_limit(limit: int, maximum: int) -> None:
    if not 1 <= limit <= maximum:
        raise ValueError(f"limit must be between 1 and {maximum}, not {limit}")


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


class ReadViews:
    def __init__(
        self, database: str | ConnectionPool[Any], *, max_size: int = 8, statement_timeout_ms: int = 5_000,
        open_timeout_s: float = 10.0, report_statement_timeout_ms: int = 300_000, connection_wait_s: float = 30.0,
        personal: PersonalDataReader | None = None,
    ) -> None:
        """``database``: the process's pool (the API's), or a URL to open a pool of its own.
        ``personal``: opens data sealed under customers' keys (the evidence pack); without it
        the pack says ``withheld`` where that data would be."""
        self._personal = personal
        self.statement_timeout_ms = statement_timeout_ms
        # A report's cursor fetches in batches; each fetch is one statement under this bound.
        self.report_statement_timeout_ms = report_statement_timeout_ms
        self._owns_pool = isinstance(database, str)
        if isinstance(database, str):
            self._pool: ConnectionPool[Any] = ConnectionPool(
                database, min_size=1, max_size=max_size, open=True, check=ConnectionPool.check_connection,
                name="read-views", max_idle=2.0, timeout=connection_wait_s,
                kwargs={"connect_timeout": max(1, int(connection_wait_s))},
            )
            self._pool.wait(timeout=open_timeout_s)
        else:
            self._pool = database
        conninfo = self._pool.conninfo
        self._database_url = conninfo if isinstance(conninfo, str) else conninfo()

    @staticmethod
    def _configure(conn: psycopg.Connection[Any]) -> None:
        # Read-only snapshots: a payment and its timeline come from the same moment. Set for this
        # checkout only (a pool shared with the writers puts both back when it gets it again).
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True

    def close(self) -> None:
        if self._owns_pool:
            self._pool.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @staticmethod
    def _become_reader(conn: psycopg.Connection[Any], scope: Scope, statement_timeout_ms: int) -> None:
        """Inside a transaction: run as the reader role with the scope's settings. Everything is
        transaction-local (SET LOCAL, set_config(..., true)), so nothing outlives the transaction
        on a pooled connection."""
        conn.execute(f"SET LOCAL ROLE {READER_ROLE}")
        conn.execute(
            "SELECT set_config('app.role', %s, true), set_config('app.merchant_id', %s, true),"
            " set_config('statement_timeout', %s, true)",
            (scope.role, str(scope.merchant_id or ""), str(statement_timeout_ms)),
        )

    @contextmanager
    def _scoped(self, scope: Scope) -> Iterator[psycopg.Cursor[Row]]:
        """A cursor in a transaction running as the reader role with the scope's settings."""
        with self._pool.connection() as conn:
            self._configure(conn)
            with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
                self._become_reader(conn, scope, self.statement_timeout_ms)
                yield cur

    @contextmanager
    def _report(self, scope: Scope) -> Iterator[psycopg.Connection[Any]]:
        """A connection of its own, in one read-only snapshot as the reader role with the
        scope's settings: a report can stream for minutes, and must not hold one of the pool's
        connections that answer the API's short reads meanwhile."""
        with psycopg.connect(self._database_url, connect_timeout=10) as conn:
            self._configure(conn)
            with conn.transaction():
                self._become_reader(conn, scope, self.report_statement_timeout_ms)
                yield conn

    def _all(self, scope: Scope, query: str, params: Sequence[Any] | Mapping[str, Any]) -> list[Row]:
        with self._scoped(scope) as cur:
            cur.execute(query, params)
            return [_plain(r) for r in cur.fetchall()]

    @staticmethod
    def _where(scope: Scope, conditions: list[tuple[str, Any]]) -> tuple[str, list[Any]]:
        """``WHERE`` from (clause, value) pairs whose value is not None, plus the scope's merchant."""
        if scope.merchant_id is not None:
            conditions = [("merchant_id = %s", scope.merchant_id), *conditions]
        return ReadViews._conditions(conditions)

    @staticmethod
    def _conditions(conditions: list[tuple[str, Any]]) -> tuple[str, list[Any]]:
        """``WHERE`` from (clause, value) pairs whose value is not None."""
        used = [(clause, value) for clause, value in conditions if value is not None]
        if not used:
            return "", []
        params: list[Any] = []
        for _, value in used:  # a tuple fills several placeholders, as in a row comparison
            params.extend(value if isinstance(value, tuple) else (value,))
        return " WHERE " + " AND ".join(clause for clause, _ in used), params

    # -- status ---------------------------------------------------------------------------------

    def session(self, scope: Scope, session_id: UUID) -> Row | None:
        where, params = self._where(scope, [("session_id = %s", session_id)])
        rows = self._all(
            scope,
            "SELECT session_id, merchant_id, status, amount_minor, currency, customer_phone_masked,"
            " order_reference, voice_platform, conversation_id, identity_required, payment_id,"
            " code_attempts, end_reason, expires_at, opened_at, updated_at, version, position"
            " FROM session_status" + where,
            params,
        )
        return rows[0] if rows else None

    def payment(self, scope: Scope, payment_id: UUID) -> Row | None:
        """The payment's status and its timeline (masked events, oldest first)."""
        where, params = self._where(scope, [("payment_id = %s", payment_id)])
        timeline_where, timeline_params = self._where(scope, [("aggregate_id = %s", payment_id)])
        with self._scoped(scope) as cur:
            cur.execute(
                "SELECT payment_id, merchant_id, session_id, status, amount_minor, currency, card_brand,"
                " card_last4, processor, authorized_minor, captured_minor, fee_minor, refunded_minor,"
                " failure_code, risk_decision, risk_score, created_at, updated_at, version, position"
                " FROM payment_status" + where,
                params,
            )
            row = cur.fetchone()
            if row is None:
                return None
            cur.execute(
                "SELECT event_type, occurred_at, version, data FROM audit_log" + timeline_where
                + " ORDER BY version",
                timeline_params,
            )
            # The words of a void or refund, sealed under the customer's key, opened (``erased``
            # once the key is gone); the sealed form itself is of no use to a reader.
            timeline = [_plain({**r, "data": {k: v for k, v in (r["data"] or {}).items() if k != "personal"}})
                        for r in opened_personal(cur, cur.fetchall(), self._personal)]
        return {**_plain(row), "timeline": timeline}

    def payments(
        self, scope: Scope, *, status: str | None = None, created_from: datetime | None = None,
        created_to: datetime | None = None, limit: int = 50, starting_after: UUID | None = None,
    ) -> tuple[list[Row], bool]:
        """(payments newest first, whether more follow). ``created_from`` is inclusive and
        ``created_to`` exclusive; ``starting_after`` is the last payment id of the previous page,
        and one this scope cannot see is a ValueError, the same as one that does not exist."""
        if created_from is not None and created_to is not None and created_from > created_to:
            raise ValueError(f"created_from {created_from} is after created_to {created_to}")
        return self._newest_first(
            scope, table="payment_status", what="payment", key="payment_id", time="created_at",
            columns="payment_id, merchant_id, session_id, status, amount_minor, currency, card_brand, card_last4,"
                    " processor, authorized_minor, captured_minor, fee_minor, refunded_minor, failure_code,"
                    " risk_decision, risk_score, created_at, updated_at, version, position",
            conditions=[("status = %s", status), ("created_at >= %s", created_from), ("created_at < %s", created_to)],
            limit=limit, starting_after=starting_after)

    def _newest_first(
        self, scope: Scope, *, table: str, columns: str, key: str, time: str, what: str,
        conditions: list[tuple[str, Any]], limit: int, starting_after: UUID | None,
    ) -> tuple[list[Row], bool]:
        """A page of ``table`` newest first by (``time``, ``key``), and whether more follow.
        ``starting_after`` is the last ``key`` of the previous page; one this scope cannot see is
        a ValueError, the same as one that does not exist."""
        _check_limit(limit, MAX_PAGE)
        with self._scoped(scope) as cur:
            after: tuple[datetime, UUID] | None = None
            if starting_after is not None:
                where, params = self._where(scope, [(f"{key} = %s", starting_after)])
                cur.execute(f"SELECT {time}, {key} FROM {table}" + where, params)
                cursor_row = cur.fetchone()
                if cursor_row is None:
                    raise ValueError(f"starting_after {starting_after} is not a {what} you can see")
                after = (cursor_row[time], cursor_row[key])
            where, params = self._where(scope, [*conditions, (f"({time}, {key}) < (%s, %s)", after)])
            cur.execute(f"SELECT {columns} FROM {table}" + where + f" ORDER BY {time} DESC, {key} DESC LIMIT %s",
                        [*params, limit + 1])
            rows = [_plain(r) for r in cur.fetchall()]
        return rows[:limit], len(rows) > limit

    # -- disputes --------------------------------------------------------------------------------

    def disputes(
        self, scope: Scope, *, status: str | None = None, reason: str | None = None,
        opened_from: datetime | None = None, opened_to: datetime | None = None, limit: int = 50,
        starting_after: UUID | None = None,
    ) -> tuple[list[Row], bool]:
        """(disputes newest first, whether more follow); ``starting_after`` as for payments."""
        return self._newest_first(
            scope, table="disputes", columns=_DISPUTE_COLUMNS, key="dispute_id", time="opened_at", what="dispute",
            conditions=[("status = %s", status), ("reason = %s", reason), ("opened_at >= %s", opened_from),
                        ("opened_at < %s", opened_to)],
            limit=limit, starting_after=starting_after)

    def dispute(self, scope: Scope, dispute_id: UUID) -> Row | None:
        where, params = self._where(scope, [("dispute_id = %s", dispute_id)])
        rows = self._all(scope, f"SELECT {_DISPUTE_COLUMNS} FROM disputes" + where, params)
        return rows[0] if rows else None

    def evidence_pack(self, scope: Scope, dispute_id: UUID) -> dict[str, Any] | None:
        """The evidence pack of a dispute's payment (projections/evidence.py), read in the scope:
        None when the scope sees no such dispute (or not its payment)."""
        from projections.evidence import build_pack

        with self._scoped(scope) as cur:
            where, params = self._where(scope, [("dispute_id = %s", dispute_id)])
            cur.execute("SELECT payment_id, merchant_id FROM disputes" + where, params)
            found = cur.fetchone()
            if found is None:
                return None
            cur.execute("SELECT DISTINCT payment_id FROM disputes WHERE merchant_id = %s", (found["merchant_id"],))
            disputed = {r["payment_id"] for r in cur.fetchall()}
            pack = build_pack(cur, found["payment_id"], disputed=disputed, now=datetime.now(UTC),
                              merchant_id=scope.merchant_id, personal=self._personal)
        return None if pack is None else {"dispute_id": str(dispute_id), **pack}

    def dispute_rates(self, scope: Scope, *, date_from: date, date_to: date,
                      merchant_id: UUID | None = None) -> list[Row]:
        """Per merchant and currency: disputes opened in the window against payments captured in
        it (the dispute rate), and of the decided ones, how many were won (the win rate); by
        count and by amount."""
        _check_dates(date_from, date_to)
        where, params = self._where(scope, [("day >= %s", date_from), ("day <= %s", date_to),
                                            ("merchant_id = %s", merchant_id)])
        dispute_where, dispute_params = self._where(scope, [
            ("opened_at >= %s", date_from), ("opened_at < (%s::date + 1)", date_to), ("merchant_id = %s", merchant_id)])
        rows = self._all(
            scope,
            "WITH captured AS (SELECT merchant_id, currency, sum(captured_count)::bigint AS captured_count,"
            "   sum(gross_captured_minor)::bigint AS captured_minor FROM volume_daily" + where
            + "   GROUP BY 1, 2),"
            " disputed AS (SELECT merchant_id, currency, count(*)::bigint AS disputes,"
            "   sum(amount_minor)::bigint AS disputed_minor,"
            "   count(*) FILTER (WHERE status = 'won')::bigint AS won,"
            "   coalesce(sum(amount_minor) FILTER (WHERE status = 'won'), 0)::bigint AS won_minor,"
            "   count(*) FILTER (WHERE status IN ('lost', 'accepted', 'expired'))::bigint AS lost,"
            "   coalesce(sum(amount_minor) FILTER (WHERE status IN ('lost', 'accepted', 'expired')), 0)::bigint"
            "     AS lost_minor"
            "   FROM disputes" + dispute_where + " GROUP BY 1, 2)"
            " SELECT merchant_id, currency,"
            " coalesce(c.captured_count, 0) AS captured_count, coalesce(c.captured_minor, 0) AS captured_minor,"
            " coalesce(d.disputes, 0) AS disputes, coalesce(d.disputed_minor, 0) AS disputed_minor,"
            " coalesce(d.won, 0) AS won, coalesce(d.won_minor, 0) AS won_minor,"
            " coalesce(d.lost, 0) AS lost, coalesce(d.lost_minor, 0) AS lost_minor"
            " FROM captured c FULL JOIN disputed d USING (merchant_id, currency) ORDER BY 1, 2",
            [*params, *dispute_params],
        )
        return [{
            **r,
            "dispute_rate": _ratio(r["disputes"], r["captured_count"]),
            "dispute_rate_by_amount": _ratio(r["disputed_minor"], r["captured_minor"]),
            "win_rate": _ratio(r["won"], r["won"] + r["lost"]),
            "win_rate_by_amount": _ratio(r["won_minor"], r["won_minor"] + r["lost_minor"]),
        } for r in rows]

    # -- payouts ---------------------------------------------------------------------------------

    def payouts(
        self, scope: Scope, *, status: str | None = None, currency: str | None = None, limit: int = 50,
        starting_after: UUID | None = None,
    ) -> tuple[list[Row], bool]:
        """(payouts newest first, whether more follow); ``starting_after`` as for payments."""
        return self._newest_first(
            scope, table="payouts", columns=_PAYOUT_COLUMNS, key="payout_id", time="created_at", what="payout",
            conditions=[("status = %s", status), ("currency = %s", currency)], limit=limit,
            starting_after=starting_after)

    def payout(self, scope: Scope, payout_id: UUID) -> tuple[Row, list[Row]] | None:
        """A payout and its lines in order; None when there is none this scope can see."""
        with self._scoped(scope) as cur:
            where, params = self._where(scope, [("payout_id = %s", payout_id)])
            cur.execute(f"SELECT {_PAYOUT_COLUMNS} FROM payouts" + where, params)
            row = cur.fetchone()
            if row is None:
                return None
            cur.execute("SELECT payment_id, gross_minor, fee_minor, shares_minor, refunds_minor, disputes_minor,"
                        " net_minor FROM payout_lines"
                        + where + " ORDER BY line_no", params)
            return _plain(row), [_plain(r) for r in cur.fetchall()]

    # -- balances --------------------------------------------------------------------------------

    def balances(self, scope: Scope) -> list[Row]:
        where, params = self._where(scope, [])
        return self._all(
            scope,
            "SELECT account, currency, balance_minor, merchant_id FROM ledger_balances" + where
            + " ORDER BY account, currency",
            params,
        )

    def balances_as_of(self, scope: Scope, as_of: datetime) -> list[Row]:
        """The balances as they were at ``as_of``, in ``balances``' shape: per account and currency,
        the sum of the postings of events that occurred at or before it (ledger_postings). Each
        event's postings balance, so the platform's (admin's) sum to zero per currency at any time.
        A merchant scope asking for a time before the merchant existed is OutOfRange."""
        check_moment("as_of", as_of)
        where, params = self._where(scope, [("occurred_at <= %s", as_of)])
        with self._scoped(scope) as cur:
            if scope.merchant_id is not None:
                # The merchant's first event (its registration) is its first audit row.
                cur.execute("SELECT occurred_at FROM audit_log WHERE merchant_id = %s ORDER BY position LIMIT 1",
                            (scope.merchant_id,))
                first = cur.fetchone()
                if first is None or as_of < first["occurred_at"]:
                    since = f" (registered {first['occurred_at'].isoformat()})" if first else ""
                    raise OutOfRange("as_of", f"as_of is before merchant {scope.merchant_id} existed{since}")
            cur.execute(
                "SELECT account, currency, sum(amount_minor)::bigint AS balance_minor, merchant_id"
                " FROM ledger_postings" + where + " GROUP BY account, currency, merchant_id ORDER BY account, currency",
                params,
            )
            return [_plain(r) for r in cur.fetchall()]

    def balance_history(
        self, scope: Scope, account: str, *, date_from: datetime, date_to: datetime,
        granularity: HistoryGranularity = "day",
    ) -> Row | None:
        """One account's balance per currency at the end of each hour or day (UTC) from the one
        holding ``date_from`` to the one holding ``date_to``; the last ends at ``date_to``. Each
        point is the as-of balance at its end (``balances_as_of`` of that moment), so a posting
        exactly on a boundary counts in the bucket it ends, and buckets before the account's first
        posting are 0. None when the scope sees no posting of the account (another merchant's is as
        unknown as a missing one); OutOfRange for times in the future, ``date_from`` after
        ``date_to``, a window that ends before the account's first posting, and more than
        MAX_HISTORY_POINTS buckets."""
        check_moment("from", date_from)
        check_moment("to", date_to)
        if date_from > date_to:
            raise OutOfRange("from", f"from {date_from.isoformat()} is after to {date_to.isoformat()}")
        if granularity not in HISTORY_STEPS:
            raise ValueError(f"granularity must be one of {', '.join(HISTORY_STEPS)}, not {granularity!r}")
        step = HISTORY_STEPS[granularity]
        first = date_from.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
        if granularity == "day":
            first = first.replace(hour=0)
        count = -(-(date_to - first) // step) or 1  # buckets up to the one holding date_to
        if count > MAX_HISTORY_POINTS:
            raise OutOfRange("to", f"from {date_from.isoformat()} to {date_to.isoformat()} is {count} {granularity}s;"
                             f" a history has at most {MAX_HISTORY_POINTS} points")
        starts = [first + i * step for i in range(count)]
        where, params = self._where(scope, [("account = %s", account)])
        with self._scoped(scope) as cur:
            cur.execute("SELECT min(occurred_at) AS opened FROM ledger_postings" + where, params)
            opened = cur.fetchone()["opened"]  # type: ignore[index]
            if opened is None:
                return None
            if date_to < opened:
                raise OutOfRange("to", f"to is before account {account} existed"
                                 f" (its first posting: {opened.isoformat()})")
            # The balance when the first bucket starts, then each bucket's change: a posting at t
            # belongs to the bucket ending at or after t (so t - 1 microsecond, truncated).
            cur.execute(
                "SELECT currency, NULL::timestamptz AS start, sum(amount_minor)::bigint AS change"
                " FROM ledger_postings" + where + " AND occurred_at <= %s GROUP BY currency"
                " UNION ALL SELECT currency,"
                " date_trunc(%s, occurred_at - interval '1 microsecond', 'UTC') AS start, sum(amount_minor)::bigint"
                " FROM ledger_postings" + where + " AND occurred_at > %s AND occurred_at <= %s GROUP BY 1, 2",
                [*params, first, granularity, *params, first, date_to],
            )
            changes = cur.fetchall()
        opening: dict[str, int] = {}
        by_bucket: dict[tuple[str, datetime], int] = {}
        for r in changes:
            if r["start"] is None:
                opening[r["currency"]] = r["change"]
            else:
                by_bucket[(r["currency"], r["start"])] = r["change"]
        series = []
        for currency in sorted({r["currency"] for r in changes}):
            balance = opening.get(currency, 0)
            points = []
            for start in starts:
                balance += by_bucket.get((currency, start), 0)
                points.append({"period_start": start, "as_of": min(start + step, date_to), "balance_minor": balance})
            series.append({"currency": currency, "points": points})
        return {"account": account, "granularity": granularity, "from": date_from, "to": date_to, "series": series}

    # -- analytics -------------------------------------------------------------------------------

    def funnel(
        self, scope: Scope, *, date_from: date, date_to: date, merchant_id: UUID | None = None,
        voice_platform: str | None = None,
    ) -> list[Row]:
        """Per day (UTC, the day sessions opened; ``date_to`` inclusive) and voice platform, the
        funnel summed over the merchants in view, with conversion = paid / opened."""
        _check_dates(date_from, date_to)
        where, params = self._where(scope, [
            ("day >= %s", date_from),
            ("day <= %s", date_to),
            ("merchant_id = %s", merchant_id),
            ("voice_platform = %s", voice_platform),
        ])
        rows = self._all(
            scope,
            "SELECT day, voice_platform,"
            " sum(opened)::bigint AS opened, sum(link_sent)::bigint AS link_sent,"
            " sum(link_opened)::bigint AS link_opened, sum(code_verified)::bigint AS code_verified,"
            " sum(identity_verified)::bigint AS identity_verified, sum(card_attached)::bigint AS card_attached,"
            " sum(paid)::bigint AS paid,"
            " sum(failed)::bigint AS failed, sum(expired)::bigint AS expired,"
            " sum(cancelled)::bigint AS cancelled, sum(locked)::bigint AS locked"
            " FROM funnel_daily" + where + " GROUP BY day, voice_platform ORDER BY day, voice_platform",
            params,
        )
        return [{**r, "conversion_rate": _ratio(r["paid"], r["opened"])} for r in rows]

    def decline_reasons(
        self, scope: Scope, *, date_from: date, date_to: date, merchant_id: UUID | None = None,
        voice_platform: str | None = None, currency: str | None = None,
    ) -> list[Row]:
        """Why payments did not go through, per day (UTC, the day of the event; ``date_to``
        inclusive), voice platform, currency, kind (``decline``: the payment's failure code;
        ``risk``: a reason the risk rules declined it for) and reason, summed over the merchants
        in view; most frequent first within a day."""
        _check_dates(date_from, date_to)
        where, params = self._where(scope, [
            ("day >= %s", date_from),
            ("day <= %s", date_to),
            ("merchant_id = %s", merchant_id),
            ("voice_platform = %s", voice_platform),
            ("currency = %s", currency),
        ])
        return self._all(
            scope,
            "SELECT day, voice_platform, currency, kind, reason, sum(payments)::bigint AS payments"
            " FROM decline_reasons_daily" + where
            + " GROUP BY day, voice_platform, currency, kind, reason"
            " ORDER BY day, kind, payments DESC, reason, voice_platform, currency",
            params,
        )

    def volume(
        self, scope: Scope, *, date_from: date, date_to: date, granularity: Granularity = "day",
        currency: str | None = None, merchant_id: UUID | None = None,
    ) -> list[Row]:
        """Money per period and currency over the merchants in view. A period is labelled by its
        first day (weeks start on Monday) and holds only days from ``date_from`` to ``date_to``
        (inclusive), so the first and last may be partial."""
        _check_dates(date_from, date_to)
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, not {granularity!r}")
        where, params = self._where(scope, [
            ("day >= %s", date_from),
            ("day <= %s", date_to),
            ("currency = %s", currency),
            ("merchant_id = %s", merchant_id),
        ])
        rows = self._all(
            scope,
            "SELECT date_trunc(%s, day::timestamp)::date AS period_start, currency,"
            " sum(authorized_count)::bigint AS authorized_count, sum(declined_count)::bigint AS declined_count,"
            " sum(captured_count)::bigint AS captured_count,"
            " sum(gross_captured_minor)::bigint AS gross_captured_minor,"
            " sum(refunded_minor)::bigint AS refunded_minor, sum(fees_minor)::bigint AS fees_minor,"
            " sum(risk_approved_count)::bigint AS risk_approved_count,"
            " sum(risk_review_count)::bigint AS risk_review_count,"
            " sum(risk_declined_count)::bigint AS risk_declined_count,"
            " sum(risk_score_total)::bigint AS risk_score_total"
            " FROM volume_daily" + where + " GROUP BY 1, 2 ORDER BY 1, 2",
            [granularity, *params],
        )
        out = []
        for r in rows:
            assessed = r["risk_approved_count"] + r["risk_review_count"] + r["risk_declined_count"]
            score_total = r.pop("risk_score_total")
            out.append({
                **r,
                # Payments the risk rules scored: what share each verdict had, and the mean score.
                "risk_decline_rate": _ratio(r["risk_declined_count"], assessed),
                "average_risk_score": round(score_total / assessed, 1) if assessed else None,
                "net_minor": r["gross_captured_minor"] - r["refunded_minor"] - r["fees_minor"],
                "approval_rate": _ratio(r["authorized_count"], r["authorized_count"] + r["declined_count"]),
                # Rounded down: integer minor units, never a float.
                "average_order_value_minor": (
                    r["gross_captured_minor"] // r["captured_count"] if r["captured_count"] else None
                ),
            })
        return out

    # -- audit -----------------------------------------------------------------------------------

    def audit_events(
        self, scope: Scope, *, aggregate_id: UUID | None = None, merchant_id: UUID | None = None,
        from_position: int = 0, limit: int = 100,
    ) -> list[Row]:
        """Audit rows after ``from_position``, in position order (pass the last position seen to
        page on). Compliance and admin see every merchant's, a merchant its own, analysts none."""
        _check_limit(limit, MAX_AUDIT_PAGE)
        where, params = self._where(scope, [
            ("position > %s", from_position),
            ("aggregate_id = %s", aggregate_id),
            ("merchant_id = %s", merchant_id),
        ])
        return self._all(
            scope,
            "SELECT position, event_id, aggregate_id, aggregate_type, version, merchant_id, event_type,"
            " occurred_at, data, prev_hash, hash FROM audit_log" + where + " ORDER BY position LIMIT %s",
            [*params, limit],
        )

    # -- reconciliations -------------------------------------------------------------------------

    def reconciliations(
        self, scope: Scope, *, processor: str | None = None, currency: str | None = None,
        date_from: date | None = None, date_to: date | None = None, has_discrepancies: bool | None = None,
        outcome: str | None = None, limit: int = 50, starting_after: UUID | None = None,
    ) -> tuple[list[Row], bool]:
        """(reconciliations newest day first, whether more follow). ``date_from`` and ``date_to``
        are inclusive days; ``outcome`` keeps those with at least one finding of it;
        ``starting_after`` is the last id of the previous page, and one this scope cannot see is a
        ValueError, the same as one that does not exist. Only compliance and admin see any."""
        _check_limit(limit, MAX_PAGE)
        if date_from is not None and date_to is not None:
            _check_dates(date_from, date_to)
        if outcome is not None and outcome not in RECONCILIATION_OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(RECONCILIATION_OUTCOMES)}, not {outcome!r}")
        # The platform's rows have no merchant to filter by: the scope's role is the filter here,
        # the policies (migrations/0016) the second wall.
        in_view = ("%s::boolean", scope.role in PLATFORM_ROLES)
        with self._scoped(scope) as cur:
            after: tuple[date, UUID] | None = None
            if starting_after is not None:
                where, params = self._conditions([in_view, ("reconciliation_id = %s", starting_after)])
                cur.execute("SELECT day, reconciliation_id FROM reconciliations" + where, params)
                cursor_row = cur.fetchone()
                if cursor_row is None:
                    raise ValueError(f"starting_after {starting_after} is not a reconciliation you can see")
                after = (cursor_row["day"], cursor_row["reconciliation_id"])
            # () fills no placeholder: the clause applies, with nothing to pass (None: it does not).
            where, params = self._conditions([
                in_view,
                ("processor = %s", processor),
                ("currency = %s", currency),
                ("day >= %s", date_from),
                ("day <= %s", date_to),
                ("discrepancy_count > 0" if has_discrepancies else "discrepancy_count = 0",
                 None if has_discrepancies is None else ()),
                # A column of the fixed list checked above, never the caller's text.
                (f"{outcome}_count > 0", None if outcome is None else ()),
                ("(day, reconciliation_id) < (%s, %s)", after),
            ])
            cur.execute(
                f"SELECT {_RECONCILIATION_COLUMNS} FROM reconciliations" + where
                + " ORDER BY day DESC, reconciliation_id DESC LIMIT %s",
                [*params, limit + 1],
            )
            rows = [_plain(r) for r in cur.fetchall()]
        return rows[:limit], len(rows) > limit

    def reconciliation(self, scope: Scope, reconciliation_id: UUID, *, outcome: str | None = None) -> Row | None:
        """A reconciliation with its findings, each flagged ``discrepancy``: discrepancies first,
        then in the report's order (``outcome``: only the findings of that outcome). None when
        there is none this scope can see."""
        if outcome is not None and outcome not in RECONCILIATION_OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(RECONCILIATION_OUTCOMES)}, not {outcome!r}")
        in_view = ("%s::boolean", scope.role in PLATFORM_ROLES)
        with self._scoped(scope) as cur:
            where, params = self._conditions([in_view, ("reconciliation_id = %s", reconciliation_id)])
            cur.execute(f"SELECT {_RECONCILIATION_COLUMNS} FROM reconciliations" + where, params)
            row = cur.fetchone()
            if row is None:
                return None
            where, params = self._conditions([
                in_view, ("reconciliation_id = %s", reconciliation_id), ("outcome = %s", outcome)])
            cur.execute(
                "SELECT finding_no, outcome, discrepancy, processor_reference, kind, payment_id, expected_minor,"
                " reported_minor, fee_minor, deposit_id FROM reconciliation_findings" + where
                + " ORDER BY discrepancy DESC, finding_no",
                params,
            )
            findings = [_plain(r) for r in cur.fetchall()]
        return {**_plain(row), "findings": findings}

    # -- compliance reports ----------------------------------------------------------------------

    def verify_audit_chain(self, scope: Scope) -> ChainReport:
        """Recompute the audit log's hash chain from its first row; the report names the first
        row that does not hold. Only for a scope that sees every row (compliance, admin): one
        merchant's rows are not a chain, and would look broken."""
        if scope.role not in WHOLE_AUDIT_ROLES:
            raise ValueError(f"verifying the audit chain needs one of {', '.join(WHOLE_AUDIT_ROLES)}, "
                             f"not {scope.role!r}")
        with self._report(scope) as conn:
            return verify_chain(conn)

    def audit_export(
        self, scope: Scope, *, aggregate_id: UUID | None = None, merchant_id: UUID | None = None,
        since: datetime | None = None, until: datetime | None = None,
    ) -> Generator[Row, None, None]:
        """Every audit row in view, in position order, with its hashes (``since`` inclusive,
        ``until`` exclusive, on ``occurred_at``): streamed from a server-side cursor, all from one
        snapshot. Close the iterator when stopping early; that ends its transaction."""
        where, params = self._where(scope, [
            ("aggregate_id = %s", aggregate_id),
            ("merchant_id = %s", merchant_id),
            ("occurred_at >= %s", since),
            ("occurred_at < %s", until),
        ])
        with self._report(scope) as conn, conn.cursor(name="audit_export", row_factory=dict_row) as cur:
            cur.execute(
                "SELECT " + ", ".join(AUDIT_COLUMNS) + ", prev_hash, hash FROM audit_log" + where
                + " ORDER BY position",
                params,
            )
            for row in cur:
                yield _plain(row)

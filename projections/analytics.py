"""Analytics: the conversion funnel per merchant, day and voice platform, and money volumes per
merchant, day and currency. No personal data.

A batch is summed in Python per session and per (payment, day) and added with one statement
per table; sessions and payments are placed in their merchant's row by the cohort and payment
tables, so events of sessions opened in an earlier batch count where they did before.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from typing import Any
from uuid import UUID

import psycopg

from application.envelope import EventEnvelope

FUNNEL_STEP = {
    "payment_session.link_sent": "link_sent",
    "payment_session.link_opened": "link_opened",
    "payment_session.code_verified": "code_verified",
    "payment_session.identity_verified": "identity_verified",
    "payment_session.completed": "paid",
    "payment_session.failed": "failed",
    "payment_session.expired": "expired",
    "payment_session.cancelled": "cancelled",
    "payment_session.locked": "locked",
}
FUNNEL_COLUMNS = ("opened", *dict.fromkeys(FUNNEL_STEP.values()))

RISK_COUNT = {"approve": "risk_approved_count", "review": "risk_review_count", "decline": "risk_declined_count"}
VOLUME_COLUMNS = (
    "authorized_count", "declined_count", "captured_count", "gross_captured_minor", "refunded_minor", "fees_minor",
    "risk_approved_count", "risk_review_count", "risk_declined_count", "risk_score_total",
)
VOLUME_EVENTS = frozenset({"payment.authorized", "payment.failed", "payment.captured", "payment.refunded",
                           "payment.risk_assessed"})


def volume_counts(event_type: str, d: dict[str, Any]) -> dict[str, int]:
    """What one payment event adds to its merchant's volume of the day."""
    counts = {
        "payment.risk_assessed": lambda: {
            RISK_COUNT.get(d.get("decision", ""), "risk_declined_count"): 1,
            "risk_score_total": d.get("score", 0),
        },
        "payment.authorized": lambda: {"authorized_count": 1},
        "payment.failed": lambda: {"declined_count": 1},
        "payment.captured": lambda: {
            "captured_count": 1, "gross_captured_minor": d.get("amount_minor", 0), "fees_minor": d.get("fee_minor", 0),
        },
        "payment.refunded": lambda: {"refunded_minor": d.get("amount_minor", 0)},
    }[event_type]()
    return {column: int(value) for column, value in counts.items()}


def _adds(columns: Sequence[str], table: str) -> str:
    return ", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in columns)


class AnalyticsProjection:
    name = "analytics"
    tables: tuple[str, ...] = ("analytics_session_cohorts", "analytics_payments", "funnel_daily", "volume_daily")

    def apply_batch(self, cur: psycopg.Cursor[Any], envelopes: Sequence[EventEnvelope]) -> None:
        cohorts: list[tuple[UUID, Any, date, Any]] = []
        payments: list[tuple[UUID, Any, Any]] = []
        funnel: dict[UUID, list[int]] = {}
        volume: dict[tuple[UUID, date], dict[str, int]] = {}
        for e in envelopes:
            d = e.data
            if e.event_type == "payment_session.opened":
                cohorts.append((e.aggregate_id, d["merchant_id"], e.occurred_at.date(), d["voice_platform"]))
                funnel.setdefault(e.aggregate_id, [0] * len(FUNNEL_COLUMNS))[0] += 1
            elif e.event_type in FUNNEL_STEP:
                step = FUNNEL_COLUMNS.index(FUNNEL_STEP[e.event_type])
                funnel.setdefault(e.aggregate_id, [0] * len(FUNNEL_COLUMNS))[step] += 1
            elif e.event_type == "payment.initiated":
                payments.append((e.aggregate_id, d["merchant_id"], d["currency"]))
            elif e.event_type in VOLUME_EVENTS:
                sums = volume.setdefault((e.aggregate_id, e.occurred_at.date()), dict.fromkeys(VOLUME_COLUMNS, 0))
                for column, value in volume_counts(e.event_type, d).items():
                    sums[column] += value
        if cohorts:
            cur.execute(
                "INSERT INTO analytics_session_cohorts (session_id, merchant_id, day, voice_platform)"
                " SELECT * FROM unnest(%b::uuid[], %b::uuid[], %b::date[], %b::text[])",
                [[str(c[0]) for c in cohorts], [str(c[1]) for c in cohorts], [c[2] for c in cohorts],
                 [c[3] for c in cohorts]], binary=True,
            )
        if funnel:
            ids = list(funnel)
            cols = ", ".join(FUNNEL_COLUMNS)
            # A session without a cohort row is not counted, as the UPDATE of old counted nothing.
            cur.execute(
                f"INSERT INTO funnel_daily (merchant_id, day, voice_platform, {cols})"
                " SELECT c.merchant_id, c.day, c.voice_platform, "
                + ", ".join(f"sum(u.{c})" for c in FUNNEL_COLUMNS)
                + f" FROM unnest(%b::uuid[], {', '.join(['%b::bigint[]'] * len(FUNNEL_COLUMNS))})"
                f" AS u(session_id, {cols})"
                " JOIN analytics_session_cohorts c ON c.session_id = u.session_id"
                " GROUP BY c.merchant_id, c.day, c.voice_platform"
                " ON CONFLICT (merchant_id, day, voice_platform)"
                f" DO UPDATE SET {_adds(FUNNEL_COLUMNS, 'funnel_daily')}",
                [ids, *([funnel[i][n] for i in ids] for n in range(len(FUNNEL_COLUMNS)))], binary=True,
            )
        if payments:
            cur.execute(
                "INSERT INTO analytics_payments (payment_id, merchant_id, currency)"
                " SELECT * FROM unnest(%b::uuid[], %b::uuid[], %b::text[])",
                [[str(p[0]) for p in payments], [str(p[1]) for p in payments], [p[2] for p in payments]],
                binary=True,
            )
        if volume:
            keys = list(volume)
            cols = ", ".join(VOLUME_COLUMNS)
            cur.execute(
                f"INSERT INTO volume_daily (merchant_id, day, currency, {cols})"
                " SELECT p.merchant_id, u.day, p.currency, "
                + ", ".join(f"sum(u.{c})" for c in VOLUME_COLUMNS)
                + f" FROM unnest(%b::uuid[], %b::date[], {', '.join(['%b::bigint[]'] * len(VOLUME_COLUMNS))})"
                f" AS u(payment_id, day, {cols})"
                " JOIN analytics_payments p ON p.payment_id = u.payment_id"
                " GROUP BY p.merchant_id, u.day, p.currency"
                f" ON CONFLICT (merchant_id, day, currency) DO UPDATE SET {_adds(VOLUME_COLUMNS, 'volume_daily')}",
                [[k[0] for k in keys], [k[1] for k in keys],
                 *([volume[k][c] for k in keys] for c in VOLUME_COLUMNS)], binary=True,
            )

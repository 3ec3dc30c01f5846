"""Analytics: the conversion funnel per merchant, day and voice platform, money volumes per
merchant, day and currency, and the reasons payments were declined (by the processor or by the
risk rules) per merchant, day, voice platform and currency. No personal data.

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
# The card step: a session that tries a second card after a decline is still one session that
# reached it, so it counts once per session (the cohort row remembers; see apply_batch).
CARD_ATTACHED = "payment_session.payment_method_attached"
FUNNEL_COLUMNS = ("opened", *dict.fromkeys(FUNNEL_STEP.values()), "card_attached")
_CARD = FUNNEL_COLUMNS.index("card_attached")

# Reasons (decline_reasons_daily.kind): a payment.failed's reason_code, or each reason of a risk
# assessment that declined.
DECLINE, RISK = "decline", "risk"

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


def decline_reasons(event_type: str, d: dict[str, Any]) -> list[tuple[str, str]]:
    """(kind, reason) of each reason one payment event gives for not going through."""
    if event_type == "payment.failed":
        return [(DECLINE, str(d.get("reason_code") or "unknown"))]
    if event_type == "payment.risk_assessed" and d.get("decision") == "decline":
        return [(RISK, str(reason)) for reason in dict.fromkeys(d.get("reasons") or ["unknown"])]
    return []


def _adds(columns: Sequence[str], table: str) -> str:
    return ", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in columns)


class AnalyticsProjection:
    name = "analytics"
    tables: tuple[str, ...] = ("analytics_session_cohorts", "analytics_payments", "funnel_daily", "volume_daily",
                               "analytics_payment_reasons", "decline_reasons_daily")

    def apply_batch(self, cur: psycopg.Cursor[Any], envelopes: Sequence[EventEnvelope]) -> None:
        cohorts: list[tuple[UUID, Any, date, Any]] = []
        payments: list[tuple[UUID, Any, Any, Any]] = []
        funnel: dict[UUID, list[int]] = {}
        volume: dict[tuple[UUID, date], dict[str, int]] = {}
        reasons: list[tuple[UUID, int, str, str, date]] = []  # (payment, version, kind, reason, day)
        card_sessions: dict[UUID, None] = {}  # in order: sessions that attached a card in this batch
        for e in envelopes:
            d = e.data
            if e.event_type == "payment_session.opened":
                cohorts.append((e.aggregate_id, d["merchant_id"], e.occurred_at.date(), d["voice_platform"]))
                funnel.setdefault(e.aggregate_id, [0] * len(FUNNEL_COLUMNS))[0] += 1
            elif e.event_type in FUNNEL_STEP:
                step = FUNNEL_COLUMNS.index(FUNNEL_STEP[e.event_type])
                funnel.setdefault(e.aggregate_id, [0] * len(FUNNEL_COLUMNS))[step] += 1
            elif e.event_type == CARD_ATTACHED:
                card_sessions[e.aggregate_id] = None
            elif e.event_type == "payment.initiated":
                payments.append((e.aggregate_id, d["merchant_id"], d["currency"], d.get("session_id")))
            elif e.event_type in VOLUME_EVENTS:
                sums = volume.setdefault((e.aggregate_id, e.occurred_at.date()), dict.fromkeys(VOLUME_COLUMNS, 0))
                for column, value in volume_counts(e.event_type, d).items():
                    sums[column] += value
                for kind, reason in decline_reasons(e.event_type, d):
                    reasons.append((e.aggregate_id, e.version, kind, reason, e.occurred_at.date()))
        if cohorts:
            cur.execute(
                "INSERT INTO analytics_session_cohorts (session_id, merchant_id, day, voice_platform)"
                " SELECT * FROM unnest(%b::uuid[], %b::uuid[], %b::date[], %b::text[])",
                [[str(c[0]) for c in cohorts], [str(c[1]) for c in cohorts], [c[2] for c in cohorts],
                 [c[3] for c in cohorts]], binary=True,
            )
        if card_sessions:
            # Only a session's first card counts: the cohort's flag turns true once, and only the
            # sessions whose flag this statement turned are counted. (A session without a cohort
            # row is not counted, as for the other steps.)
            cur.execute(
                "UPDATE analytics_session_cohorts SET card_attached = true"
                " WHERE session_id = ANY(%b::uuid[]) AND NOT card_attached RETURNING session_id",
                [list(card_sessions)], binary=True,
            )
            for (session_id,) in cur.fetchall():
                funnel.setdefault(session_id, [0] * len(FUNNEL_COLUMNS))[_CARD] += 1
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
                "INSERT INTO analytics_payments (payment_id, merchant_id, currency, session_id)"
                " SELECT * FROM unnest(%b::uuid[], %b::uuid[], %b::text[], %b::uuid[])",
                [[str(p[0]) for p in payments], [str(p[1]) for p in payments], [p[2] for p in payments],
                 [str(p[3]) if p[3] else None for p in payments]],
                binary=True,
            )
        if reasons:
            cur.execute(
                "INSERT INTO analytics_payment_reasons (payment_id, version, kind, reason, day)"
                " SELECT * FROM unnest(%b::uuid[], %b::bigint[], %b::text[], %b::text[], %b::date[])",
                [[str(r[0]) for r in reasons], [r[1] for r in reasons], [r[2] for r in reasons],
                 [r[3] for r in reasons], [r[4] for r in reasons]], binary=True,
            )
        if reasons or cohorts or payments:
            # A reason is counted under its payment's session's voice platform, which comes from
            # another aggregate (the session), so it may arrive before or after the payment's
            # events: each reason waits uncounted until both are here, and whichever comes last
            # counts it, once (the flag turns true once, under the row's lock). A reason left
            # waiting by two workers committing at once is counted by the next batch.
            cur.execute(
                "WITH ready AS ("
                " UPDATE analytics_payment_reasons r SET counted = true"
                " FROM analytics_payments p JOIN analytics_session_cohorts c ON c.session_id = p.session_id"
                " WHERE NOT r.counted AND p.payment_id = r.payment_id"
                " RETURNING p.merchant_id, r.day, c.voice_platform, p.currency, r.kind, r.reason)"
                " INSERT INTO decline_reasons_daily"
                " (merchant_id, day, voice_platform, currency, kind, reason, payments)"
                " SELECT merchant_id, day, voice_platform, currency, kind, reason, count(*) FROM ready"
                " GROUP BY 1, 2, 3, 4, 5, 6"
                " ON CONFLICT (merchant_id, day, voice_platform, currency, kind, reason)"
                " DO UPDATE SET payments = decline_reasons_daily.payments + excluded.payments",
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

"""Analytics: the conversion funnel per merchant, day and voice platform, and money volumes per
merchant, day and currency. No personal data."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

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

RISK_COUNT = {"approve": "risk_approved_count", "review": "risk_review_count", "decline": "risk_declined_count"}


class AnalyticsProjection:
    name = "analytics"
    tables = ("analytics_session_cohorts", "analytics_payments", "funnel_daily", "volume_daily")

    def apply(self, cur: psycopg.Cursor[Any], e: EventEnvelope) -> None:
        d = e.data
        if e.event_type == "payment_session.opened":
            day = e.occurred_at.date()
            cur.execute(
                "INSERT INTO analytics_session_cohorts (session_id, merchant_id, day, voice_platform)"
                " VALUES (%s, %s, %s, %s)",
                (e.aggregate_id, d["merchant_id"], day, d["voice_platform"]),
            )
            cur.execute(
                "INSERT INTO funnel_daily (merchant_id, day, voice_platform, opened) VALUES (%s, %s, %s, 1)"
                " ON CONFLICT (merchant_id, day, voice_platform) DO UPDATE SET opened = funnel_daily.opened + 1",
                (d["merchant_id"], day, d["voice_platform"]),
            )
        elif e.event_type in FUNNEL_STEP:
            column = sql.Identifier(FUNNEL_STEP[e.event_type])
            cur.execute(
                sql.SQL(
                    "UPDATE funnel_daily f SET {col} = f.{col} + 1 FROM analytics_session_cohorts c"
                    " WHERE c.session_id = %s AND f.merchant_id = c.merchant_id AND f.day = c.day"
                    " AND f.voice_platform = c.voice_platform"
                ).format(col=column),
                (e.aggregate_id,),
            )
        elif e.event_type == "payment.initiated":
            cur.execute(
                "INSERT INTO analytics_payments (payment_id, merchant_id, currency) VALUES (%s, %s, %s)",
                (e.aggregate_id, d["merchant_id"], d["currency"]),
            )
        elif e.event_type in ("payment.authorized", "payment.failed", "payment.captured", "payment.refunded",
                              "payment.risk_assessed"):
            counts = {
                "payment.risk_assessed": {
                    RISK_COUNT.get(d.get("decision", ""), "risk_declined_count"): 1,
                    "risk_score_total": d.get("score", 0),
                },
                "payment.authorized": {"authorized_count": 1},
                "payment.failed": {"declined_count": 1},
                "payment.captured": {
                    "captured_count": 1, "gross_captured_minor": d.get("amount_minor", 0),
                    "fees_minor": d.get("fee_minor", 0),
                },
                "payment.refunded": {"refunded_minor": d.get("amount_minor", 0)},
            }[e.event_type]
            columns = list(counts)
            cur.execute(
                sql.SQL(
                    "INSERT INTO volume_daily (merchant_id, day, currency, {cols})"
                    " SELECT p.merchant_id, %s, p.currency, {vals} FROM analytics_payments p"
                    " WHERE p.payment_id = %s"
                    " ON CONFLICT (merchant_id, day, currency) DO UPDATE SET {sets}"
                ).format(
                    cols=sql.SQL(", ").join(map(sql.Identifier, columns)),
                    vals=sql.SQL(", ").join(sql.Literal(int(counts[c])) for c in columns),
                    sets=sql.SQL(", ").join(
                        sql.SQL("{c} = volume_daily.{c} + excluded.{c}").format(c=sql.Identifier(c))
                        for c in columns
                    ),
                ),
                (e.occurred_at.date(), e.aggregate_id),
            )

    def after_batch(self, cur: psycopg.Cursor[Any]) -> None:
        pass

"""The projections as they were applied before they were set-based: one event at a time, a few
statements each, the audit chain hashed from the rows read back. Kept verbatim as the oracle
that test_set_based.py compares the set-based engine with; not used by the application."""

# ruff: noqa
from __future__ import annotations

from typing import Any, Protocol
from uuid import UUID

import msgspec
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from application.envelope import EventEnvelope
from application.masking import PersonalDataReader
from projections.status import phones_masked, reasons_opened
from projections.audit import COLUMNS, GENESIS_HASH, _CHAIN_LOCK_ID, row_hash
from projections.balances import merchant_of
from application.masking import mask_event_data

# Session events that only move the status.
SESSION_STATUS_AFTER = {
    "payment_session.link_sent": "link_sent",
    "payment_session.link_opened": "link_opened",
    "payment_session.code_verified": "code_verified",
    "payment_session.identity_verified": "identity_verified",
    "payment_session.completed": "completed",
    "payment_session.expired": "expired",
    "payment_session.cancelled": "cancelled",
    "payment_session.failed": "failed",
    "payment_session.locked": "locked",
}
PAYMENT_STATUS_AFTER = {
    "payment.voided": "voided",
    "payment.authorization_expired": "authorization_expired",
    "payment.settled": "settled",
}


class Status:
    name = "status"
    tables = ("session_status", "payment_status")
    personal: PersonalDataReader | None = None  # set per batch by apply_batch

    def apply(self, cur: psycopg.Cursor[Any], e: EventEnvelope) -> None:
        e = reasons_opened(cur, [e], self.personal)[0]  # a cancellation's sealed reason, opened as the projection does
        d = e.data
        stamp = {"id": e.aggregate_id, "at": e.occurred_at, "version": e.version, "position": e.position}
        if e.event_type == "payment_session.opened":
            cur.execute(
                "INSERT INTO session_status (session_id, merchant_id, status, amount_minor, currency,"
                " customer_phone_masked, order_reference, voice_platform, conversation_id,"
                " identity_required, expires_at, opened_at, updated_at, version, position, customer_id)"
                " VALUES (%(id)s, %(merchant_id)s, 'awaiting_customer', %(amount)s, %(currency)s,"
                " %(phone)s, %(reference)s, %(platform)s, %(conversation)s, %(identity)s,"
                " %(expires_at)s, %(at)s, %(at)s, %(version)s, %(position)s, %(customer_id)s)",
                {**stamp, "merchant_id": d["merchant_id"], "amount": d["amount_minor"],
                 "currency": d["currency"], "customer_id": d.get("customer_id"),
                 # The sealed phone opened with the customer's key, as the set-based projection does.
                 "phone": phones_masked(cur, [e], self.personal)[e.event_id],
                 "reference": d["order_reference"], "platform": d["voice_platform"],
                 "conversation": d["conversation_id"], "identity": d["identity_required"],
                 "expires_at": d["expires_at"]},
            )
        elif e.aggregate_type == "payment_session":
            sets, params = self._session_change(e.event_type, d)
            cur.execute(
                "UPDATE session_status SET " + ", ".join([*sets, "updated_at = %(at)s",
                "version = %(version)s", "position = %(position)s"]) + " WHERE session_id = %(id)s",
                {**stamp, **params},
            )
        elif e.event_type == "payment.initiated":
            cur.execute(
                "INSERT INTO payment_status (payment_id, merchant_id, session_id, status, amount_minor,"
                " currency, card_brand, card_last4, created_at, updated_at, version, position)"
                " VALUES (%(id)s, %(merchant_id)s, %(session_id)s, 'initiated', %(amount)s,"
                " %(currency)s, %(brand)s, %(last4)s, %(at)s, %(at)s, %(version)s, %(position)s)",
                {**stamp, "merchant_id": d["merchant_id"], "session_id": d["session_id"],
                 "amount": d["amount_minor"], "currency": d["currency"], "brand": d["card_brand"],
                 "last4": d["card_last4"]},
            )
        elif e.aggregate_type == "payment":
            sets, params = self._payment_change(e.event_type, d)
            cur.execute(
                "UPDATE payment_status SET " + ", ".join([*sets, "updated_at = %(at)s",
                "version = %(version)s", "position = %(position)s"]) + " WHERE payment_id = %(id)s",
                {**stamp, **params},
            )

    @staticmethod
    def _session_change(event_type: str, d: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
        if event_type in SESSION_STATUS_AFTER:
            sets = ["status = %(status)s"]
            params: dict[str, Any] = {"status": SESSION_STATUS_AFTER[event_type]}
            if "reason" in d:
                sets.append("end_reason = %(reason)s")
                params["reason"] = d["reason"]
            if event_type == "payment_session.locked":
                sets += ["end_reason = 'too_many_code_attempts'", "code_attempts = %(attempts)s"]
                params["attempts"] = d["attempts"]
            elif event_type == "payment_session.expired":
                sets.append("end_reason = 'link_expired'")
            return sets, params
        if event_type == "payment_session.identity_recognized":
            # A check on file stands in for a new one: the customer will not be asked.
            return ["identity_required = false"], {}
        if event_type == "payment_session.code_rejected":
            return ["code_attempts = %(attempts)s"], {"attempts": d["attempts"]}
        if event_type == "payment_session.payment_method_attached":
            return ["status = 'payment_method_attached'", "payment_id = %(payment_id)s"], {
                "payment_id": d["payment_id"]
            }
        if event_type == "payment_session.payment_declined":
            return [
                "status = CASE WHEN identity_required THEN 'identity_verified' ELSE 'code_verified' END",
                "payment_id = NULL",
            ], {}
        return [], {}  # code_resent, identity_rejected: nothing a status reader sees

    @staticmethod
    def _payment_change(event_type: str, d: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
        if event_type in PAYMENT_STATUS_AFTER:
            return ["status = %(status)s"], {"status": PAYMENT_STATUS_AFTER[event_type]}
        if event_type == "payment.processing_rerouted":
            return ["processor = %(processor)s"], {"processor": d["processor"]}
        if event_type == "payment.processing_started":
            return ["status = 'processing'", "processor = %(processor)s"], {"processor": d["processor"]}
        if event_type == "payment.authorized":
            return ["status = 'authorized'", "processor = %(processor)s", "authorized_minor = %(amount)s"], {
                "processor": d["processor"], "amount": d["amount_minor"]
            }
        if event_type == "payment.failed":
            return ["status = 'failed'", "failure_code = %(code)s"], {"code": d["reason_code"]}
        if event_type == "payment.risk_assessed":
            return ["risk_score = %(score)s", "risk_decision = %(decision)s"], {
                "score": d["score"], "decision": d["decision"]
            }
        if event_type == "payment.captured":
            return ["status = 'captured'", "captured_minor = %(amount)s", "fee_minor = %(fee)s"], {
                "amount": d["amount_minor"], "fee": d["fee_minor"]
            }
        if event_type == "payment.refunded":
            return [
                "refunded_minor = %(total)s",
                "status = CASE WHEN %(total)s = captured_minor THEN 'refunded' ELSE status END",
            ], {"total": d["refunded_total_minor"]}
        return [], {}

    def after_batch(self, cur: psycopg.Cursor[Any]) -> None:
        pass


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


class Analytics:
    name = "analytics"
    tables = ("analytics_session_cohorts", "analytics_payments", "funnel_daily", "volume_daily",
              "analytics_payment_reasons", "decline_reasons_daily")

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
        elif e.event_type == "payment_session.payment_method_attached":
            # Issue 13's card step, one event at a time: a session's first card only.
            cur.execute(
                "UPDATE analytics_session_cohorts SET card_attached = true WHERE session_id = %s"
                " AND NOT card_attached RETURNING merchant_id, day, voice_platform",
                (e.aggregate_id,),
            )
            first = cur.fetchone()
            if first is not None:
                cur.execute(
                    "UPDATE funnel_daily SET card_attached = card_attached + 1"
                    " WHERE merchant_id = %s AND day = %s AND voice_platform = %s", first,
                )
        elif e.event_type == "payment.initiated":
            cur.execute(
                "INSERT INTO analytics_payments (payment_id, merchant_id, currency, session_id)"
                " VALUES (%s, %s, %s, %s)",
                (e.aggregate_id, d["merchant_id"], d["currency"], d.get("session_id")),
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
            reasons: list[tuple[str, str]] = []
            if e.event_type == "payment.failed":
                reasons = [("decline", str(d.get("reason_code") or "unknown"))]
            elif e.event_type == "payment.risk_assessed" and d.get("decision") == "decline":
                reasons = [("risk", str(r)) for r in dict.fromkeys(d.get("reasons") or ["unknown"])]
            for kind, reason in reasons:
                cur.execute(
                    "INSERT INTO analytics_payment_reasons (payment_id, version, kind, reason, day)"
                    " VALUES (%s, %s, %s, %s, %s)", (e.aggregate_id, e.version, kind, reason, e.occurred_at.date()),
                )
        if e.event_type in ("payment_session.opened", "payment.initiated", "payment.failed",
                            "payment.risk_assessed"):
            # One reason at a time: counted once its payment and its session's cohort are both here.
            cur.execute(
                "SELECT r.payment_id, r.version, r.kind, r.reason, r.day, p.merchant_id, c.voice_platform, p.currency"
                " FROM analytics_payment_reasons r JOIN analytics_payments p ON p.payment_id = r.payment_id"
                " JOIN analytics_session_cohorts c ON c.session_id = p.session_id WHERE NOT r.counted"
            )
            for payment_id, version, kind, reason, day, merchant_id, platform, currency in cur.fetchall():
                cur.execute("UPDATE analytics_payment_reasons SET counted = true WHERE payment_id = %s"
                            " AND version = %s AND kind = %s AND reason = %s", (payment_id, version, kind, reason))
                cur.execute(
                    "INSERT INTO decline_reasons_daily (merchant_id, day, voice_platform, currency, kind, reason,"
                    " payments) VALUES (%s, %s, %s, %s, %s, %s, 1)"
                    " ON CONFLICT (merchant_id, day, voice_platform, currency, kind, reason)"
                    " DO UPDATE SET payments = decline_reasons_daily.payments + 1",
                    (merchant_id, day, platform, currency, kind, reason),
                )

    def after_batch(self, cur: psycopg.Cursor[Any]) -> None:
        pass


class Balances:
    name = "balances"
    tables = ("ledger_balances",)

    def apply(self, cur: psycopg.Cursor[Any], e: EventEnvelope) -> None:
        postings = e.data.get("postings") or []
        for p in postings:
            signed = p["amount_minor"] if p["direction"] == "debit" else -p["amount_minor"]
            cur.execute(
                "INSERT INTO ledger_balances (account, currency, balance_minor, merchant_id)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT (account, currency)"
                " DO UPDATE SET balance_minor = ledger_balances.balance_minor + excluded.balance_minor",
                (p["account"], p["currency"], signed, merchant_of(p["account"])),
            )

    def after_batch(self, cur: psycopg.Cursor[Any]) -> None:
        pass


class Audit:
    name = "audit"
    tables = ("audit_log",)

    def apply(self, cur: psycopg.Cursor[Any], e: EventEnvelope) -> None:
        data = msgspec.to_builtins(mask_event_data(e.data))
        cur.execute(
            "INSERT INTO audit_log (position, event_id, aggregate_id, aggregate_type, version,"
            " merchant_id, event_type, occurred_at, data) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (e.position, e.event_id, e.aggregate_id, e.aggregate_type, e.version, e.merchant_id,
             e.event_type, e.occurred_at, Jsonb(data)),
        )

    def after_batch(self, cur: psycopg.Cursor[Any]) -> None:
        extend_chain(cur)


def extend_chain(cur: psycopg.Cursor[Any], limit: int = 5_000) -> int:
    """Hash the unchained rows that directly follow the chained prefix; returns how many."""
    cur.execute("SELECT pg_advisory_xact_lock(%s)", (_CHAIN_LOCK_ID,))
    cur.execute("SELECT position, hash FROM audit_log WHERE hash IS NOT NULL ORDER BY position DESC LIMIT 1")
    last = cur.fetchone()
    last_position, prev = (int(last[0]), last[1]) if last else (0, GENESIS_HASH)
    chained = 0
    while True:
        cur.execute(
            "SELECT " + ", ".join(COLUMNS) + " FROM audit_log WHERE position > %s AND hash IS NULL"
            " ORDER BY position LIMIT %s",
            (last_position, limit),
        )
        names = [c.name for c in cur.description or ()]
        rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
        if not rows:
            return chained
        # The positions that really exist after the prefix; a row may only join the chain if
        # every existing position before it is already in.
        cur.execute(
            "SELECT notification_id FROM public.ledger_events WHERE notification_id > %s"
            " ORDER BY notification_id LIMIT %s",
            (last_position, limit),
        )
        expected = [r[0] for r in cur.fetchall()]
        updates = []
        for row, position in zip(rows, expected, strict=False):
            if row["position"] != position:
                break
            digest = row_hash(prev, row)
            updates.append((prev, digest, position))
            prev, last_position = digest, position
        if updates:
            cur.executemany("UPDATE audit_log SET prev_hash = %s, hash = %s WHERE position = %s", updates)
            chained += len(updates)
        if len(updates) < len(rows):
            return chained


class RowProjection(Protocol):
    def apply(self, cur: psycopg.Cursor[Any], e: EventEnvelope) -> None: ...

    def after_batch(self, cur: psycopg.Cursor[Any]) -> None: ...


PROJECTIONS: dict[str, RowProjection] = {
    "status": Status(), "analytics": Analytics(), "audit": Audit(), "balances": Balances(),
}


def _missing_versions(cur: psycopg.Cursor[Any], open_envelope: Any, aggregate_id: UUID, after: int,
                      before: int) -> list[EventEnvelope]:
    cur.execute(
        "SELECT o.position, o.envelope FROM public.outbox o"
        " JOIN public.ledger_events e ON e.notification_id = o.position"
        " WHERE e.originator_id = %s AND e.originator_version > %s AND e.originator_version < %s"
        " ORDER BY e.originator_version",
        (aggregate_id, after, before),
    )
    return [msgspec.structs.replace(open_envelope(bytes(payload)), position=position)
            for position, payload in cur.fetchall()]


def apply_batch(conn: psycopg.Connection[Any], open_envelope: Any, envelopes: list[EventEnvelope],
                personal: PersonalDataReader | None = None) -> None:
    """The engine's apply_batch as it was (without the pipeline, which changed no result);
    ``personal`` opens sealed personal data, as the status projection's reader does."""
    status = PROJECTIONS["status"]
    assert isinstance(status, Status)
    status.personal = personal
    batch = sorted(envelopes, key=lambda e: (e.position or 0, e.version))
    if not batch:
        return
    with conn.transaction(), conn.cursor() as cur:
        for name, projection in PROJECTIONS.items():
            aggregate_ids = sorted({e.aggregate_id for e in batch})
            cur.execute(
                "SELECT aggregate_id, (applied->%s->>0)::bigint FROM projection_versions"
                " WHERE aggregate_id = ANY(%s) AND applied ? %s ORDER BY aggregate_id FOR UPDATE",
                (name, aggregate_ids, name),
            )
            versions: dict[UUID, int] = {row[0]: row[1] for row in cur.fetchall()}
            last_position: dict[UUID, int | None] = {}
            for envelope in batch:
                current = versions.get(envelope.aggregate_id, 0)
                if envelope.version <= current:
                    continue
                pending = [envelope]
                if envelope.version > current + 1:
                    pending = [*_missing_versions(cur, open_envelope, envelope.aggregate_id, current,
                                                  envelope.version), envelope]
                for item in pending:
                    projection.apply(cur, item)
                    versions[item.aggregate_id] = item.version
                    last_position[item.aggregate_id] = item.position
            if last_position:
                ids = list(last_position)
                cur.execute(
                    "INSERT INTO projection_versions (aggregate_id, applied)"
                    " SELECT a, jsonb_build_object(%s::text, jsonb_build_array(v, p))"
                    " FROM unnest(%s::uuid[], %s::bigint[], %s::bigint[]) AS t(a, v, p)"
                    " ON CONFLICT (aggregate_id) DO UPDATE SET applied = projection_versions.applied || excluded.applied",
                    (name, ids, [versions[i] for i in ids], [last_position[i] for i in ids]),
                )
            projection.after_batch(cur)

"""Status: the current state of every payment session and payment, for integrators and merchants."""

from __future__ import annotations

from typing import Any

import psycopg

from application.envelope import EventEnvelope
from domain.values import mask_phone

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


class StatusProjection:
    name = "status"
    tables = ("session_status", "payment_status")

    def apply(self, cur: psycopg.Cursor[Any], e: EventEnvelope) -> None:
        d = e.data
        stamp = {"id": e.aggregate_id, "at": e.occurred_at, "version": e.version, "position": e.position}
        if e.event_type == "payment_session.opened":
            cur.execute(
                "INSERT INTO session_status (session_id, merchant_id, status, amount_minor, currency,"
                " customer_phone_masked, order_reference, voice_platform, conversation_id,"
                " identity_required, expires_at, opened_at, updated_at, version, position)"
                " VALUES (%(id)s, %(merchant_id)s, 'awaiting_customer', %(amount)s, %(currency)s,"
                " %(phone)s, %(reference)s, %(platform)s, %(conversation)s, %(identity)s,"
                " %(expires_at)s, %(at)s, %(at)s, %(version)s, %(position)s)",
                {**stamp, "merchant_id": d["merchant_id"], "amount": d["amount_minor"],
                 "currency": d["currency"], "phone": mask_phone(d["customer_phone"]),
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

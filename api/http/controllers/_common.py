"""Helpers the controllers share: mapping read rows and aggregates to response shapes."""

from __future__ import annotations

from typing import Any

from api.http import schemas
from domain.payment import Payment
from domain.payment_session import PaymentSession


def session_from_aggregate(session: PaymentSession, position: int | None, *, phone_masked: str,
                           caught_up: bool = True) -> schemas.PaymentSession:
    """``phone_masked``: the ledger's ``session_phone_masked`` (the aggregate holds the phone only
    sealed)."""
    return schemas.PaymentSession(
        id=str(session.id), merchant_id=str(session.merchant_id), status=session.status,
        amount=session.amount_minor, currency=session.currency,
        customer_phone=phone_masked, order_reference=session.order_reference,
        voice={"platform": session.voice_platform, "conversation_id": session.conversation_id},
        identity_required=session.needs_identity_check,
        payment_id=str(session.payment_id) if session.payment_id else None,
        end_reason=session.end_reason, expires_at=session.expires_at,
        created_at=session.created_on, updated_at=session.modified_on, position=position,
        links=schemas.Links(self=f"/v1/payment-sessions/{session.id}"),
        projection_caught_up=caught_up,
    )


def session_from_row(row: dict[str, Any], *, caught_up: bool = True) -> schemas.PaymentSession:
    return schemas.PaymentSession(
        id=str(row["session_id"]), merchant_id=str(row["merchant_id"]), status=row["status"],
        amount=int(row["amount_minor"]), currency=row["currency"],
        customer_phone=row["customer_phone_masked"], order_reference=row["order_reference"],
        voice={"platform": row["voice_platform"], "conversation_id": row["conversation_id"]},
        identity_required=bool(row["identity_required"]),
        payment_id=str(row["payment_id"]) if row.get("payment_id") else None,
        end_reason=row.get("end_reason"), expires_at=_dt(row["expires_at"]),
        created_at=_dt(row["opened_at"]), updated_at=_dt(row["updated_at"]), position=int(row["position"]),
        links=schemas.Links(self=f"/v1/payment-sessions/{row['session_id']}"),
        projection_caught_up=caught_up,
    )


def payment_from_aggregate(payment: Payment, position: int | None, **extra: Any) -> schemas.Payment:
    return schemas.Payment(
        id=str(payment.id), merchant_id=str(payment.merchant_id),
        session_id=str(payment.session_id) if payment.session_id else None, status=payment.status,
        amount=payment.amount_minor, currency=payment.currency, card_brand=payment.card_brand,
        card_last4=payment.card_last4, authorized_amount=payment.authorized_minor,
        captured_amount=payment.captured_minor, refunded_amount=payment.refunded_minor,
        fee=payment.fee_minor, failure_code=payment.failure_code, created_at=payment.created_on,
        updated_at=payment.modified_on, position=position,
        links=schemas.Links(self=f"/v1/payments/{payment.id}"),
        risk_decision=payment.risk_decision, risk_score=payment.risk_score, processor=payment.processor,
        **extra,
    )


def payment_from_row(row: dict[str, Any]) -> schemas.Payment:
    timeline = row.get("timeline")
    return schemas.Payment(
        id=str(row["payment_id"]), merchant_id=str(row["merchant_id"]),
        session_id=str(row["session_id"]) if row.get("session_id") else None, status=row["status"],
        amount=int(row["amount_minor"]), currency=row["currency"], card_brand=row["card_brand"],
        card_last4=row["card_last4"], authorized_amount=int(row["authorized_minor"]),
        captured_amount=int(row["captured_minor"]), refunded_amount=int(row["refunded_minor"]),
        fee=int(row["fee_minor"]), failure_code=row.get("failure_code"),
        created_at=_dt(row["created_at"]), updated_at=_dt(row["updated_at"]), position=int(row["position"]),
        links=schemas.Links(self=f"/v1/payments/{row['payment_id']}"),
        risk_decision=row.get("risk_decision"), risk_score=row.get("risk_score"), processor=row.get("processor"),
        timeline=[
            schemas.TimelineEntry(event_type=t["event_type"], version=int(t["version"]),
                                  occurred_at=_dt(t["occurred_at"]), data=t["data"])
            for t in timeline
        ] if timeline is not None else None,
    )


def _dt(value: Any) -> Any:
    from datetime import datetime

    return datetime.fromisoformat(value) if isinstance(value, str) else value


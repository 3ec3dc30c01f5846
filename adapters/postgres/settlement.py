"""Our side of a processor's settlement report: the captures and refunds we recorded with it,
read from the read side (the audit trail's payment events, and payment_status for the
processor, currency and whether the payment is settled), through the process's pool. Captures
already settled and refunds already settled are not expected again."""

from __future__ import annotations

from datetime import date
from typing import Any
from uuid import UUID

from psycopg_pool import ConnectionPool

from domain.reconciliation import Expected

# Captures of payments not yet settled, and refunds whose own settlement is not recorded yet
# (a refund is settled by its own report line, Payment.RefundSettled), up to the report's day.
_EXPECTED = """
    SELECT a.aggregate_id, a.event_type, a.data->>'processor_reference', (a.data->>'amount_minor')::bigint,
           (a.occurred_at AT TIME ZONE 'UTC')::date
    FROM payment_status p JOIN audit_log a ON a.aggregate_id = p.payment_id
    WHERE p.processor = %(processor)s AND p.currency = %(currency)s AND p.captured_minor > 0
      AND (a.occurred_at AT TIME ZONE 'UTC')::date <= %(day)s
      AND ((a.event_type = 'payment.captured' AND p.settled_at IS NULL)
           OR (a.event_type = 'payment.refunded' AND NOT EXISTS (
               SELECT FROM audit_log s WHERE s.aggregate_id = a.aggregate_id
                 AND s.event_type = 'payment.refund_settled'
                 AND s.data->>'processor_reference' = a.data->>'processor_reference')))
"""


class PostgresProcessorTransactions:
    def __init__(self, pool: ConnectionPool[Any]) -> None:
        self.pool = pool

    def expected(self, processor: str, currency: str, day: date) -> list[Expected]:
        with self.pool.connection() as conn:
            rows = conn.execute(_EXPECTED, {"processor": processor, "currency": currency, "day": day}).fetchall()
        return [
            Expected(reference, "capture" if event_type == "payment.captured" else "refund",
                     amount if event_type == "payment.captured" else -amount, currency, UUID(str(payment_id)), when)
            for payment_id, event_type, reference, amount, when in rows if reference
        ]

"""Our side of a processor's settlement report: the captures and refunds we recorded with it,
read from the read side (the audit trail's payment events, and payment_status for the
processor, currency and whether the payment is settled), through the process's pool."""

from __future__ import annotations

from datetime import date
from typing import Any
from uuid import UUID

from psycopg_pool import ConnectionPool

from domain.reconciliation import Expected

_EXPECTED = """
    SELECT a.aggregate_id, a.event_type, a.data->>'processor_reference', (a.data->>'amount_minor')::bigint,
           (a.occurred_at AT TIME ZONE 'UTC')::date
    FROM audit_log a JOIN payment_status p ON p.payment_id = a.aggregate_id
    WHERE p.processor = %s AND p.currency = %s AND p.status IN ('captured', 'refunded')
      AND a.event_type IN ('payment.captured', 'payment.refunded')
      AND (a.occurred_at AT TIME ZONE 'UTC')::date <= %s
"""


class PostgresProcessorTransactions:
    def __init__(self, pool: ConnectionPool[Any]) -> None:
        self.pool = pool

    def expected(self, processor: str, currency: str, day: date) -> list[Expected]:
        with self.pool.connection() as conn:
            rows = conn.execute(_EXPECTED, (processor, currency, day)).fetchall()
        return [
            Expected(reference, "capture" if event_type == "payment.captured" else "refund",
                     amount if event_type == "payment.captured" else -amount, currency, UUID(str(payment_id)), when)
            for payment_id, event_type, reference, amount, when in rows if reference
        ]

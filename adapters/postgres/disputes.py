"""What dispute handling asks of the read side, through the process's pool: our payment behind a
processor's capture reference (application/ports.py PaymentReferences), and the disputes the
dispute clock looks at (evidence due soon or overdue)."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg_pool import ConnectionPool

_PAYMENT = """
    SELECT a.aggregate_id FROM audit_log a JOIN payment_status p ON p.payment_id = a.aggregate_id
    WHERE a.event_type = 'payment.captured' AND a.data->>'processor_reference' = %s AND p.processor = %s
    LIMIT 1
"""
_DUE = "SELECT dispute_id FROM disputes WHERE status = 'needs_response' AND due_by <= %s ORDER BY due_by LIMIT %s"


class PostgresPaymentReferences:
    def __init__(self, pool: ConnectionPool[Any]) -> None:
        self.pool = pool

    def find(self, processor: str, reference: str) -> UUID | None:
        with self.pool.connection() as conn:
            row = conn.execute(_PAYMENT, (reference, processor)).fetchone()
        return None if row is None else UUID(str(row[0]))


def disputes_due(database_url: str, before: datetime, limit: int = 500) -> list[UUID]:
    """Disputes awaiting the merchant's answer due before ``before`` (the clock passes now plus
    the reminder's lead)."""
    with psycopg.connect(database_url, connect_timeout=10) as conn:
        return [UUID(str(d)) for (d,) in conn.execute(_DUE, (before, limit)).fetchall()]

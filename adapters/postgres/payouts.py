"""The payout loop's hints from the read side (application/ports.py PayoutCandidates), through
the process's pool: who has money available or reserved, which payments have something due,
which payouts are still with the bank."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from psycopg_pool import ConnectionPool

_BALANCES = """
    SELECT DISTINCT merchant_id, currency FROM ledger_balances
    WHERE merchant_id IS NOT NULL AND balance_minor <> 0
      AND (account LIKE 'merchant:%%:available' OR account LIKE 'merchant:%%:reserved')
    UNION
    SELECT DISTINCT merchant_id, COALESCE(payout_currency, currency) FROM payment_status WHERE payout_due_minor <> 0
    UNION
    SELECT DISTINCT merchant_id, currency FROM partner_dues WHERE due_minor <> 0
    ORDER BY 1, 2
"""
# The merchant's own payments with something due, then the shares partners' payments owe it.
_DUES = """
    (SELECT payment_id FROM payment_status
     WHERE merchant_id = %(merchant)s AND COALESCE(payout_currency, currency) = %(currency)s
       AND payout_due_minor <> 0
     ORDER BY settled_at, payment_id)
    UNION ALL
    (SELECT payment_id FROM partner_dues
     WHERE merchant_id = %(merchant)s AND currency = %(currency)s AND due_minor <> 0 ORDER BY payment_id)
"""
_UNSENT = "SELECT payout_id FROM payouts WHERE status = 'created' ORDER BY created_at"


class PostgresPayoutCandidates:
    def __init__(self, pool: ConnectionPool[Any]) -> None:
        self.pool = pool

    def balances(self) -> list[tuple[UUID, str]]:
        with self.pool.connection() as conn:
            return [(UUID(str(m)), c) for m, c in conn.execute(_BALANCES).fetchall()]

    def dues(self, merchant_id: UUID, currency: str) -> list[UUID]:
        with self.pool.connection() as conn:
            rows = conn.execute(_DUES, {"merchant": merchant_id, "currency": currency}).fetchall()
        return list(dict.fromkeys(UUID(str(p)) for (p,) in rows))

    def unsent(self) -> list[UUID]:
        with self.pool.connection() as conn:
            return [UUID(str(p)) for (p,) in conn.execute(_UNSENT).fetchall()]

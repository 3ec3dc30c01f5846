"""The reads the console needs that the JSON API has no query for: payments searched by order
reference and the last four digits of the card or the phone, audit rows by time, merchants and
API keys from the audit trail, and the operators' queue depths.

Reads of merchant data go through the read views' scoped transaction (projections/views.py): as
the reader role, with the caller's role and merchant, so row-level security holds here as in the
API. Every query filters by merchant in SQL as well. The operators' figures (outbox, SMS and
webhook queues) are counts of the platform's own side tables, read only for an admin.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg.rows import dict_row

from projections.registry import all_projections
from projections.views import MAX_PAGE, ReadViews, Scope

Row = dict[str, Any]

PAYMENT_COLUMNS = (
    "p.payment_id, p.merchant_id, p.session_id, p.status, p.amount_minor, p.currency, p.card_brand, p.card_last4,"
    " p.captured_minor, p.refunded_minor, p.authorized_minor, p.created_at, s.order_reference,"
    " s.customer_phone_masked, s.voice_platform"
)


def _plain(row: Row) -> Row:
    return {k: str(v) if isinstance(v, UUID) else v for k, v in row.items()}


def _clauses(conditions: list[tuple[str, Any]]) -> tuple[str, list[Any]]:
    used = [(clause, value) for clause, value in conditions if value is not None]
    params: list[Any] = []
    for _, value in used:
        params.extend(value if isinstance(value, tuple) else (value,))
    return (" WHERE " + " AND ".join(c for c, _ in used)) if used else "", params


def _like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class ConsoleQueries:
    def __init__(self, views: ReadViews, database_url: str) -> None:
        self.views = views
        self.database_url = database_url

    # -- merchants' payments --------------------------------------------------------------------

    def search_payments(
        self, scope: Scope, *, order_reference: str | None = None, card_last4: str | None = None,
        phone_last4: str | None = None, status: str | None = None, created_from: datetime | None = None,
        created_to: datetime | None = None, limit: int = 20, starting_after: UUID | None = None,
    ) -> tuple[list[Row], bool]:
        """(payments newest first, whether more follow), with their session's order reference and
        masked phone. ``starting_after`` is the last payment id of the previous page; one this
        scope cannot see is a ValueError, as in ReadViews.payments."""
        if not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be between 1 and {MAX_PAGE}")
        merchant = ("p.merchant_id = %s", scope.merchant_id)
        with self.views._scoped(scope) as cur:
            after: tuple[datetime, UUID] | None = None
            if starting_after is not None:
                where, params = _clauses([merchant, ("p.payment_id = %s", starting_after)])
                cur.execute("SELECT p.created_at, p.payment_id FROM payment_status p" + where, params)
                found = cur.fetchone()
                if found is None:
                    raise ValueError(f"starting_after {starting_after} is not a payment you can see")
                after = (found["created_at"], found["payment_id"])
            where, params = _clauses([
                merchant,
                ("s.order_reference ILIKE %s", f"%{_like(order_reference)}%" if order_reference else None),
                ("p.card_last4 = %s", card_last4),
                ("s.customer_phone_masked LIKE %s", f"%{phone_last4}" if phone_last4 else None),
                ("p.status = %s", status),
                ("p.created_at >= %s", created_from),
                ("p.created_at < %s", created_to),
                ("(p.created_at, p.payment_id) < (%s, %s)", after),
            ])
            cur.execute(
                f"SELECT {PAYMENT_COLUMNS} FROM payment_status p"
                " LEFT JOIN session_status s ON s.session_id = p.session_id AND s.merchant_id = p.merchant_id"
                + where + " ORDER BY p.created_at DESC, p.payment_id DESC LIMIT %s",
                [*params, limit + 1],
            )
            rows = [_plain(r) for r in cur.fetchall()]
        return rows[:limit], len(rows) > limit

    def session_of_payment(self, scope: Scope, session_id: UUID) -> Row | None:
        return self.views.session(scope, session_id)

    # -- compliance -----------------------------------------------------------------------------

    def audit_rows(
        self, scope: Scope, *, aggregate_id: UUID | None = None, merchant_id: UUID | None = None,
        since: datetime | None = None, until: datetime | None = None, from_position: int = 0, limit: int = 50,
    ) -> list[Row]:
        """Audit rows after ``from_position`` in position order, by aggregate, merchant and time."""
        if not 1 <= limit <= 1_000:
            raise ValueError("limit must be between 1 and 1000")
        where, params = _clauses([
            ("merchant_id = %s", scope.merchant_id),
            ("position > %s", from_position),
            ("aggregate_id = %s", aggregate_id),
            ("merchant_id = %s", merchant_id),
            ("occurred_at >= %s", since),
            ("occurred_at < %s", until),
        ])
        with self.views._scoped(scope) as cur:
            cur.execute(
                "SELECT position, event_id, aggregate_id, aggregate_type, version, merchant_id, event_type,"
                " occurred_at, data, hash FROM audit_log" + where + " ORDER BY position LIMIT %s",
                [*params, limit],
            )
            return [_plain(r) for r in cur.fetchall()]

    # -- admin: merchants and keys, from the audit trail ------------------------------------------

    def merchants(self, scope: Scope) -> list[Row]:
        """Every merchant with its name and whether it is active (admin: the audit trail holds
        every merchant's registration and deactivation)."""
        with self.views._scoped(scope) as cur:
            cur.execute(
                "SELECT r.aggregate_id AS merchant_id, r.data->>'name' AS name, r.occurred_at AS registered_at,"
                " EXISTS (SELECT 1 FROM audit_log d WHERE d.aggregate_id = r.aggregate_id"
                "   AND d.event_type = 'merchant.deactivated') AS deactivated"
                " FROM audit_log r WHERE r.event_type = 'merchant.registered' ORDER BY r.position DESC LIMIT 500")
            return [_plain(r) for r in cur.fetchall()]

    def api_keys(self, scope: Scope) -> list[Row]:
        """Every API key: role, merchant, label, when issued and whether revoked (no hash)."""
        with self.views._scoped(scope) as cur:
            cur.execute(
                "SELECT i.aggregate_id AS key_id, i.data->>'role' AS role, i.data->>'merchant_id' AS merchant_id,"
                " i.data->>'label' AS label, i.occurred_at AS issued_at,"
                " (SELECT min(v.occurred_at) FROM audit_log v WHERE v.aggregate_id = i.aggregate_id"
                "   AND v.event_type = 'api_key.revoked') AS revoked_at"
                " FROM audit_log i WHERE i.event_type = 'api_key.issued' ORDER BY i.position DESC LIMIT 500")
            return [_plain(r) for r in cur.fetchall()]

    # -- admin: the system's queues ---------------------------------------------------------------

    def system_health(self) -> Row:
        """Outbox backlog and age, projection positions against the outbox, SMS and webhook
        queues and dead letters: counts of the platform's tables (an admin's view only)."""
        with psycopg.connect(self.database_url, connect_timeout=5) as conn, conn.cursor(row_factory=dict_row) as cur:
            conn.read_only = True
            cur.execute("SET LOCAL statement_timeout = 5000")
            cur.execute(
                "SELECT count(*) AS unpublished, count(*) FILTER (WHERE publish_attempts > 0) AS failing,"
                " extract(epoch FROM now() - (SELECT created_at FROM outbox"
                "  WHERE outbox_id = (SELECT min(outbox_id) FROM outbox_pending)))::float AS oldest_s,"
                " (SELECT coalesce(max(position), 0) FROM outbox) AS head"
                " FROM outbox_pending")
            outbox = dict(cur.fetchone() or {})
            cur.execute(
                "SELECT p.name, coalesce(c.position, 0) AS checkpoint, c.applied_position AS applied"
                " FROM (SELECT unnest(%s::text[]) AS name UNION SELECT projection FROM projection_checkpoints) p"
                " LEFT JOIN projection_checkpoints c ON c.projection = p.name ORDER BY p.name",
                (list(all_projections()),))
            projections = [dict(r) for r in cur.fetchall()]
            cur.execute(
                "SELECT state, count(*) AS n, extract(epoch FROM now() - min(created_at))::float AS oldest_s"
                " FROM outbox_messages GROUP BY state ORDER BY state")
            sms = [dict(r) for r in cur.fetchall()]
            cur.execute(
                "SELECT status, count(*) AS n, extract(epoch FROM now() - min(created_at))::float AS oldest_s"
                " FROM webhook_deliveries GROUP BY status ORDER BY status")
            webhooks = [dict(r) for r in cur.fetchall()]
        head = int(outbox.get("head") or 0)
        for p in projections:
            p["lag_events"] = max(0, head - max(int(p["checkpoint"] or 0), int(p["applied"] or 0)))
        return {"outbox": outbox, "projections": projections, "sms": sms, "webhooks": webhooks}

    # -- merchants' webhooks ----------------------------------------------------------------------

    def webhook_deliveries(self, merchant_id: UUID | None, *, status: str | None = None,
                           limit: int = 50) -> list[Row]:
        """The delivery log of one merchant's endpoints (None: every merchant's, for an admin)."""
        where, params = _clauses([("merchant_id = %s", merchant_id), ("status = %s", status)])
        with psycopg.connect(self.database_url, connect_timeout=5) as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(
                "SELECT delivery_id, merchant_id, event_id, event_type, kind, endpoint_url, status, attempts,"
                " next_attempt_at, last_attempt_at, last_status_code, last_error, delivered_at, dead_at,"
                " redeliveries, created_at FROM webhook_deliveries" + where
                + " ORDER BY delivery_id DESC LIMIT %s", [*params, limit])
            return [_plain(r) for r in cur.fetchall()]

    def delivery_owner(self, delivery_id: int) -> UUID | None:
        with psycopg.connect(self.database_url, connect_timeout=5) as conn:
            row = conn.execute("SELECT merchant_id FROM webhook_deliveries WHERE delivery_id = %s",
                               (delivery_id,)).fetchone()
        return row[0] if row else None

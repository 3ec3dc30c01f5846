"""Status: the current state of every payment session and payment, for integrators and merchants.

A batch is folded in Python into the latest row per aggregate (the rows it does not create are
read first), then written with one INSERT for new rows and one UPDATE for changed ones per table.

A session's row keeps its customer's pseudonym (``customer_id``) and the phone masked to country
digit and last four, opened at projection time from the sealed phone with the customer's key
(``PersonalDataReader``); once the key is destroyed it reads ``erased``, live (``customer.erased``
rewrites the customer's rows) and in a rebuild alike. Without a reader (a tool that was given no
key) it reads ``withheld``. A cancelled session's ``end_reason`` is the reason given, sealed the
same way and opened the same way (``erased``, ``withheld``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec
import psycopg

from application.envelope import EventEnvelope
from application.masking import PersonalDataReader
from domain.values import ERASED, mask_phone

# The masked phone where the projection has no way to open sealed data (no reader given).
WITHHELD = "withheld"

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
}

# The columns an event after the first can change (the others are set once, at creation), with
# the SQL type each is written as.
SESSION_MUTABLE = {
    "status": "text", "end_reason": "text", "code_attempts": "integer", "identity_required": "boolean",
    "payment_id": "uuid", "updated_at": "timestamptz", "version": "bigint", "position": "bigint",
}
SESSION_CREATED = {
    "session_id": "uuid", "merchant_id": "uuid", "amount_minor": "bigint", "currency": "text",
    "customer_phone_masked": "text", "order_reference": "text", "voice_platform": "text",
    "conversation_id": "text", "expires_at": "timestamptz", "opened_at": "timestamptz", "customer_id": "uuid",
    **SESSION_MUTABLE,
}
PAYMENT_MUTABLE = {
    "status": "text", "processor": "text", "authorized_minor": "bigint", "captured_minor": "bigint",
    "fee_minor": "bigint", "refunded_minor": "bigint", "failure_code": "text", "risk_score": "integer",
    "risk_decision": "text", "settled_at": "timestamptz", "payout_due_minor": "bigint", "payout_currency": "text",
    "updated_at": "timestamptz", "version": "bigint", "position": "bigint",
}
PAYMENT_CREATED = {
    "payment_id": "uuid", "merchant_id": "uuid", "session_id": "uuid", "amount_minor": "bigint",
    "currency": "text", "card_brand": "text", "card_last4": "text", "card_fingerprint_hash": "text",
    "created_at": "timestamptz", **PAYMENT_MUTABLE,
}


def _uuid(value: Any) -> str | None:
    """UUIDs travel as text: event data has strings, rows read back have UUIDs."""
    return None if value is None else str(value)


def _text(value: Any) -> Any:
    """A time as the event carried it (ISO text once decoded); PostgreSQL parses it, as before."""
    return value.isoformat() if isinstance(value, datetime) else value


def _opened(e: EventEnvelope, phone_masked: str) -> dict[str, Any]:
    d = e.data
    return {
        "session_id": str(e.aggregate_id), "merchant_id": _uuid(d["merchant_id"]), "status": "awaiting_customer",
        "amount_minor": d["amount_minor"], "currency": d["currency"], "customer_id": _uuid(d.get("customer_id")),
        "customer_phone_masked": phone_masked, "order_reference": d["order_reference"],
        "voice_platform": d["voice_platform"], "conversation_id": d["conversation_id"],
        "identity_required": d["identity_required"], "payment_id": None, "code_attempts": 0, "end_reason": None,
        "expires_at": _text(d["expires_at"]), "opened_at": e.occurred_at,
    }


def card_fingerprint_hash(merchant_id: Any, fingerprint: str | None) -> str | None:
    """The vault's card fingerprint (already a keyed hash) hashed again with the merchant's id:
    stable within a merchant, so its evidence can find the same card's earlier payments, and
    unlinkable across merchants."""
    if not fingerprint:
        return None
    return hashlib.sha256(f"{merchant_id}:{fingerprint}".encode()).hexdigest()[:32]


def _initiated(e: EventEnvelope) -> dict[str, Any]:
    d = e.data
    return {
        "payment_id": str(e.aggregate_id), "merchant_id": _uuid(d["merchant_id"]),
        "session_id": _uuid(d["session_id"]), "status": "initiated", "amount_minor": d["amount_minor"],
        "currency": d["currency"], "card_brand": d["card_brand"], "card_last4": d["card_last4"],
        "card_fingerprint_hash": card_fingerprint_hash(d.get("merchant_id"), d.get("card_fingerprint")),
        "processor": None, "authorized_minor": 0, "captured_minor": 0, "fee_minor": 0, "refunded_minor": 0,
        "failure_code": None, "risk_score": None, "risk_decision": None, "settled_at": None, "payout_due_minor": 0,
        "payout_currency": None,
        "created_at": e.occurred_at,
    }


def change_session(row: dict[str, Any], event_type: str, d: dict[str, Any], at: datetime) -> None:
    """What one session event does to its status row (after the opening)."""
    if event_type in SESSION_STATUS_AFTER:
        row["status"] = SESSION_STATUS_AFTER[event_type]
        if "reason" in d:
            row["end_reason"] = d["reason"]
        if event_type == "payment_session.locked":
            row["end_reason"] = "too_many_code_attempts"
            row["code_attempts"] = d["attempts"]
        elif event_type == "payment_session.expired":
            row["end_reason"] = "link_expired"
    elif event_type == "payment_session.identity_recognized":
        # A check on file stands in for a new one: the customer will not be asked.
        row["identity_required"] = False
    elif event_type == "payment_session.code_rejected":
        row["code_attempts"] = d["attempts"]
    elif event_type == "payment_session.payment_method_attached":
        row["status"] = "payment_method_attached"
        row["payment_id"] = _uuid(d["payment_id"])
    elif event_type == "payment_session.payment_declined":
        row["status"] = "identity_verified" if row["identity_required"] else "code_verified"
        row["payment_id"] = None
    # code_resent, identity_rejected: nothing a status reader sees


def change_payment(row: dict[str, Any], event_type: str, d: dict[str, Any], at: datetime) -> None:
    """What one payment event does to its status row (after the initiation). ``payout_due_minor``
    follows the money the merchant has available from this payment and no payout took yet."""
    if event_type in PAYMENT_STATUS_AFTER:
        row["status"] = PAYMENT_STATUS_AFTER[event_type]
    elif event_type == "payment.processing_rerouted":
        row["processor"] = d["processor"]
    elif event_type == "payment.processing_started":
        row["status"], row["processor"] = "processing", d["processor"]
    elif event_type == "payment.authorized":
        row["status"], row["processor"], row["authorized_minor"] = "authorized", d["processor"], d["amount_minor"]
    elif event_type == "payment.failed":
        row["status"], row["failure_code"] = "failed", d["reason_code"]
    elif event_type == "payment.risk_assessed":
        row["risk_score"], row["risk_decision"] = d["score"], d["decision"]
    elif event_type == "payment.captured":
        row["status"], row["captured_minor"], row["fee_minor"] = "captured", d["amount_minor"], d["fee_minor"]
    elif event_type == "payment.refunded":
        total = d["refunded_total_minor"]
        if total == row["captured_minor"]:
            row["status"] = "refunded"
        row["refunded_minor"] = total
        if row["settled_at"] is not None:  # out of the merchant's available money, perhaps converted
            row["payout_due_minor"] -= sum(p["amount_minor"] for p in d["postings"]
                                           if p["account"].endswith(":available") and p["direction"] == "debit")
    elif event_type == "payment.settled":
        if row["status"] == "captured":  # a payment refunded in full stays refunded
            row["status"] = "settled"
        row["settled_at"] = at
        fx = d.get("fx")
        if fx:  # the merchant settles in another currency: its share there
            row["payout_currency"] = fx["to_currency"]
            row["payout_due_minor"] += fx["share_minor"]
        else:
            row["payout_due_minor"] += d.get("merchant_share_minor", 0)  # none before payouts existed
    elif event_type == "payment.included_in_payout" and not d.get("party"):  # a partner's: partner_dues
        row["payout_due_minor"] -= (d["gross_minor"] - d["fee_minor"] - d.get("shares_minor", 0) - d["refunds_minor"]
                                    - d.get("disputes_minor", 0))
    elif event_type in ("payment.dispute_opened", "payment.dispute_closed") and row["settled_at"] is not None:
        # Out of (or back to) the merchant's available money, perhaps converted: what it is due.
        row["payout_due_minor"] += sum((p["amount_minor"] if p["direction"] == "credit" else -p["amount_minor"])
                                       for p in d["postings"] if p["account"].endswith(":available"))


class _Table:
    """One status table: its rows folded over a batch, then written set-based."""

    def __init__(self, table: str, key: str, created: dict[str, str], mutable: dict[str, str]) -> None:
        self.table, self.key, self.created, self.mutable = table, key, created, mutable

    def write(
        self, cur: psycopg.Cursor[Any], events: list[EventEnvelope], creation: str,
        create: Callable[[EventEnvelope], dict[str, Any]],
        change: Callable[[dict[str, Any], str, dict[str, Any], datetime], None],
    ) -> None:
        if not events:
            return
        # Rows this batch does not create are read first; a creation event for a row that exists
        # is written as an INSERT, so it fails as before instead of overwriting.
        firsts: dict[UUID, str] = {}
        for e in events:
            firsts.setdefault(e.aggregate_id, e.event_type)
        existing_ids = [a for a, first in firsts.items() if first != creation]
        rows: dict[UUID, dict[str, Any]] = {}
        if existing_ids:
            columns = [c for c in self.mutable if c not in ("updated_at", "version", "position")]
            cur.execute(
                f"SELECT {self.key}, {', '.join(columns)} FROM {self.table} WHERE {self.key} = ANY(%s)",
                (existing_ids,), binary=True,
            )
            for values in cur.fetchall():
                row = dict(zip(columns, values[1:], strict=True))
                if "payment_id" in row:
                    row["payment_id"] = _uuid(row["payment_id"])
                rows[values[0]] = row
        # Rows created by this batch are inserted in their final state; rows read are updated.
        new: list[dict[str, Any]] = []
        changed: dict[UUID, dict[str, Any]] = {}
        created: set[UUID] = set()
        for e in events:
            if e.event_type == creation:
                row = create(e)
                rows[e.aggregate_id] = row
                new.append(row)
                created.add(e.aggregate_id)
            else:
                found = rows.get(e.aggregate_id)
                if found is None:
                    continue  # no row to change (the UPDATE of old matched nothing)
                row = found
                change(row, e.event_type, e.data, e.occurred_at)
                if e.aggregate_id not in created:
                    changed[e.aggregate_id] = row
            row["updated_at"], row["version"], row["position"] = e.occurred_at, e.version, e.position
        if new:
            self._insert(cur, new)
        if changed:
            self._update(cur, changed)

    def _unnest(self, columns: dict[str, str]) -> str:
        return ", ".join(f"%b::{kind}[]" for kind in columns.values())

    def _insert(self, cur: psycopg.Cursor[Any], rows: list[dict[str, Any]]) -> None:
        names = list(self.created)
        cur.execute(
            f"INSERT INTO {self.table} ({', '.join(names)})"
            f" SELECT * FROM unnest({self._unnest(self.created)})",
            [[row[c] for row in rows] for c in names], binary=True,
        )

    def _update(self, cur: psycopg.Cursor[Any], rows: dict[UUID, dict[str, Any]]) -> None:
        names = list(self.mutable)
        cur.execute(
            f"UPDATE {self.table} t SET {', '.join(f'{c} = u.{c}' for c in names)}"
            f" FROM unnest(%b::uuid[], {self._unnest(self.mutable)}) AS u(_id, {', '.join(names)})"
            f" WHERE t.{self.key} = u._id",
            [list(rows), *([row[c] for row in rows.values()] for c in names)], binary=True,
        )


_SESSIONS = _Table("session_status", "session_id", SESSION_CREATED, SESSION_MUTABLE)
_PAYMENTS = _Table("payment_status", "payment_id", PAYMENT_CREATED, PAYMENT_MUTABLE)


def phones_masked(cur: psycopg.Cursor[Any], opened: Sequence[EventEnvelope],
                  personal: PersonalDataReader | None) -> dict[UUID, str]:
    """The masked phone of each opened session (by event id): from the sealed phone while its key
    exists, ``erased`` after; an event from before sealing carried the phone itself."""
    masked: dict[UUID, str] = {}
    sealed = [e for e in opened if "customer_phone" not in e.data]
    for e in opened:
        if "customer_phone" in e.data:
            masked[e.event_id] = mask_phone(e.data["customer_phone"])
    if sealed and personal is None:
        masked.update((e.event_id, WITHHELD) for e in sealed)
    elif sealed and personal is not None:
        for e, data in zip(sealed, personal.open_many(cur, [e.data.get("personal") for e in sealed]), strict=True):
            phone = (data or {}).get("phone")
            masked[e.event_id] = mask_phone(phone) if isinstance(phone, str) else ERASED
    return masked


def reasons_opened(cur: psycopg.Cursor[Any], envelopes: Sequence[EventEnvelope],
                   personal: PersonalDataReader | None) -> list[EventEnvelope]:
    """The envelopes, each ``payment_session.cancelled`` with the reason it sealed under the
    customer's key opened into ``reason`` (``erased`` once the key is destroyed, ``withheld``
    without a reader); an event from before sealing carried ``reason`` itself."""
    sealed = [e for e in envelopes
              if e.event_type == "payment_session.cancelled" and isinstance(e.data.get("personal"), Mapping)]
    if not sealed:
        return list(envelopes)
    reasons: list[str | None]
    if personal is None:
        reasons = [WITHHELD] * len(sealed)
    else:
        reasons = [ERASED if opened is None else opened.get("reason")
                   for opened in personal.open_many(cur, [e.data["personal"] for e in sealed])]
    replaced = {id(e): msgspec.structs.replace(e, data={**e.data, "reason": reason})
                for e, reason in zip(sealed, reasons, strict=True)}
    return [replaced.get(id(e), e) for e in envelopes]


class StatusProjection:
    name = "status"
    tables: tuple[str, ...] = ("session_status", "payment_status")

    def __init__(self, personal: PersonalDataReader | None = None) -> None:
        """``personal``: opens sealed phones (given by api/bootstrap.py); None: rows say ``withheld``."""
        self._personal = personal

    @property
    def personal(self) -> PersonalDataReader | None:
        return self._personal

    def apply_batch(self, cur: psycopg.Cursor[Any], envelopes: Sequence[EventEnvelope]) -> None:
        sessions = reasons_opened(cur, [e for e in envelopes if e.aggregate_type == "payment_session"],
                                  self.personal)
        payments = [e for e in envelopes if e.aggregate_type == "payment"]
        masked = phones_masked(cur, [e for e in sessions if e.event_type == "payment_session.opened"], self.personal)
        _SESSIONS.write(cur, sessions, "payment_session.opened", lambda e: _opened(e, masked[e.event_id]),
                        change_session)
        _PAYMENTS.write(cur, payments, "payment.initiated", _initiated, change_payment)
        erased = [e.aggregate_id for e in envelopes if e.event_type == "customer.erased"]
        if erased:
            # The customer's key is destroyed right after this event is recorded: every session
            # sealed under it shows what a rebuild shows.
            cur.execute("UPDATE session_status SET customer_phone_masked = %s"
                        " WHERE customer_id = ANY(%s) AND customer_phone_masked <> %s", (ERASED, erased, ERASED))
            cur.execute("UPDATE session_status SET end_reason = %s WHERE customer_id = ANY(%s)"
                        " AND status = 'cancelled' AND end_reason IS DISTINCT FROM %s", (ERASED, erased, ERASED))

"""Disputes: one row per dispute, its status and dates, for merchants (their own), compliance,
admins and analysts (the dispute and win rates; no personal data here).

A batch is folded in Python to each dispute's last state; new disputes are inserted and changed
ones updated with one statement each.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

import psycopg

from application.envelope import EventEnvelope

COLUMNS = {
    "dispute_id": "uuid", "merchant_id": "uuid", "payment_id": "uuid", "processor": "text",
    "processor_dispute_id": "text", "status": "text", "reason": "text", "amount_minor": "bigint", "currency": "text",
    "fee_minor": "bigint", "due_by": "timestamptz", "evidence_submitted_at": "timestamptz", "reminded": "boolean",
    "opened_at": "timestamptz", "closed_at": "timestamptz", "updated_at": "timestamptz", "version": "bigint",
    "position": "bigint",
}
CHANGING = ("status", "evidence_submitted_at", "reminded", "closed_at", "updated_at", "version", "position")


def _unnest(columns: dict[str, str]) -> str:
    return ", ".join(f"%b::{kind}[]" for kind in columns.values())


class DisputesProjection:
    name = "disputes"
    tables: tuple[str, ...] = ("disputes",)

    def apply_batch(self, cur: psycopg.Cursor[Any], envelopes: Sequence[EventEnvelope]) -> None:
        new: dict[UUID, dict[str, Any]] = {}
        changed: dict[UUID, dict[str, Any]] = {}
        for e in envelopes:
            if e.aggregate_type != "dispute":
                continue
            d = e.data
            if e.event_type == "dispute.opened":
                row = new[e.aggregate_id] = {
                    "dispute_id": str(e.aggregate_id), "merchant_id": str(d["merchant_id"]),
                    "payment_id": str(d["payment_id"]), "processor": d["processor"],
                    "processor_dispute_id": d["processor_dispute_id"], "status": "needs_response",
                    "reason": d["reason"], "amount_minor": d["amount_minor"], "currency": d["currency"],
                    "fee_minor": d["fee_minor"], "due_by": d["due_by"], "evidence_submitted_at": None,
                    "reminded": False, "opened_at": e.occurred_at, "closed_at": None,
                }
            else:
                row = new.get(e.aggregate_id) or changed.setdefault(e.aggregate_id, {})
                if e.event_type == "dispute.updated":
                    if d["change"] == "evidence_submitted":
                        row["status"], row["evidence_submitted_at"] = "under_review", d["at"]
                    elif d["change"] == "due_soon":
                        row["reminded"] = True
                elif e.event_type == "dispute.closed":
                    row["status"], row["closed_at"] = d["outcome"], d["at"]
            row["updated_at"], row["version"], row["position"] = e.occurred_at, e.version, e.position
        if new:
            names = list(COLUMNS)
            cur.execute(f"INSERT INTO disputes ({', '.join(names)}) SELECT * FROM unnest({_unnest(COLUMNS)})",
                        [[row[c] for row in new.values()] for c in names], binary=True)
        if changed:
            # Columns a batch did not change keep their value (COALESCE with the row's own).
            kinds = {c: COLUMNS[c] for c in CHANGING}
            sets = ", ".join(f"{c} = COALESCE(u.{c}, t.{c})" for c in CHANGING)
            cur.execute(
                f"UPDATE disputes t SET {sets}"
                f" FROM unnest(%b::uuid[], {_unnest(kinds)}) AS u(_id, {', '.join(CHANGING)})"
                " WHERE t.dispute_id = u._id",
                [list(changed), *([row.get(c) for row in changed.values()] for c in CHANGING)], binary=True,
            )

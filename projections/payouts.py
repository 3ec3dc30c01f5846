"""Payouts: every merchant payout with its status, and the payments it paid (its lines); and
what partner merchants are due of other merchants' payments (their split shares, settled and not
yet paid out: ``partner_dues``, the payout loop's hint).

A batch's payouts are folded in Python to their last state (a payout created and paid in one
batch is inserted paid); new payouts and their lines are inserted with one statement each, and
payouts the batch changed are updated with one statement. Partner dues are summed per payment and
partner and added with one statement.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

import psycopg

from application.envelope import EventEnvelope

COLUMNS = {
    "payout_id": "uuid", "merchant_id": "uuid", "currency": "text", "cutoff": "date", "status": "text",
    "amount_minor": "bigint", "carried_in_minor": "bigint", "reserve_held_minor": "bigint",
    "reserve_released_minor": "bigint", "line_count": "integer", "bank_reference": "text", "failure_reason": "text",
    "created_at": "timestamptz", "updated_at": "timestamptz", "version": "bigint", "position": "bigint",
}
CHANGING = ("status", "bank_reference", "failure_reason", "updated_at", "version", "position")
LINE_COLUMNS = {
    "payout_id": "uuid", "line_no": "integer", "merchant_id": "uuid", "payment_id": "uuid", "gross_minor": "bigint",
    "fee_minor": "bigint", "refunds_minor": "bigint", "shares_minor": "bigint", "disputes_minor": "bigint",
    "net_minor": "bigint",
}


def partner_due_changes(e: EventEnvelope) -> list[tuple[str, int]]:
    """(partner, change of what it is due) for one payment event: a settlement makes each partner's
    share available to it; a payout to a partner pays it."""
    if e.event_type == "payment.settled":
        own = f"merchant:{e.merchant_id}:available"
        return [(p["account"].split(":")[1], p["amount_minor"]) for p in e.data.get("postings") or ()
                if p["account"].startswith("merchant:") and p["account"].endswith(":available")
                and p["account"] != own and p["direction"] == "credit"]
    if e.event_type == "payment.included_in_payout" and e.data.get("party"):
        return [(e.data["party"], -e.data["gross_minor"])]
    return []


def _created(e: EventEnvelope) -> dict[str, Any]:
    d = e.data
    return {
        "payout_id": str(e.aggregate_id), "merchant_id": str(d["merchant_id"]), "currency": d["currency"],
        "cutoff": d["cutoff"], "status": "created" if d["amount_minor"] > 0 else "carried_forward",
        "amount_minor": d["amount_minor"], "carried_in_minor": d["carried_in_minor"],
        "reserve_held_minor": d["reserve_held_minor"], "reserve_released_minor": d["reserve_released_minor"],
        "line_count": len(d["lines"]), "bank_reference": None, "failure_reason": None, "created_at": e.occurred_at,
    }


def _unnest(columns: dict[str, str]) -> str:
    return ", ".join(f"%b::{kind}[]" for kind in columns.values())


class PayoutsProjection:
    name = "payouts"
    tables: tuple[str, ...] = ("payouts", "payout_lines", "partner_dues")

    def apply_batch(self, cur: psycopg.Cursor[Any], envelopes: Sequence[EventEnvelope]) -> None:
        new: dict[UUID, dict[str, Any]] = {}
        changed: dict[UUID, dict[str, Any]] = {}
        lines: list[dict[str, Any]] = []
        dues: dict[tuple[str, str], tuple[str, int]] = {}  # (payment, partner) -> (currency, change)
        for e in envelopes:
            if e.aggregate_type == "payment":
                for partner, change in partner_due_changes(e):
                    # A settlement's postings name the currency; a payout to a partner has none,
                    # but always follows the settlement that made the row (so "" is never stored).
                    currency = next((p["currency"] for p in e.data.get("postings") or ()), "")
                    known, before = dues.get((str(e.aggregate_id), partner), (currency, 0))
                    dues[(str(e.aggregate_id), partner)] = (known or currency, before + change)
                continue
            if e.aggregate_type != "payout":
                continue
            if e.event_type == "payout.created":
                row = new[e.aggregate_id] = _created(e)
                lines += [{"payout_id": str(e.aggregate_id), "line_no": n, "merchant_id": row["merchant_id"],
                           "shares_minor": line.get("shares_minor", 0), "disputes_minor": line.get("disputes_minor", 0),
                           **{c: line[c] for c in ("payment_id", "gross_minor", "fee_minor", "refunds_minor",
                                                   "net_minor")}}
                          for n, line in enumerate(e.data["lines"], start=1)]
            else:
                row = new.get(e.aggregate_id) or changed.setdefault(e.aggregate_id, {})
                if e.event_type == "payout.paid":
                    row["status"], row["bank_reference"], row["failure_reason"] = "paid", e.data["bank_reference"], None
                elif e.event_type == "payout.failed":
                    row["status"], row["bank_reference"], row["failure_reason"] = "failed", None, e.data["reason"]
            row["updated_at"], row["version"], row["position"] = e.occurred_at, e.version, e.position
        if new:
            names = list(COLUMNS)
            cur.execute(f"INSERT INTO payouts ({', '.join(names)}) SELECT * FROM unnest({_unnest(COLUMNS)})",
                        [[row[c] for row in new.values()] for c in names], binary=True)
        if lines:
            names = list(LINE_COLUMNS)
            cur.execute(f"INSERT INTO payout_lines ({', '.join(names)}) SELECT * FROM unnest({_unnest(LINE_COLUMNS)})",
                        [[line[c] for line in lines] for c in names], binary=True)
        if dues:
            keys = list(dues)
            cur.execute(
                "INSERT INTO partner_dues (payment_id, merchant_id, currency, due_minor)"
                " SELECT * FROM unnest(%b::uuid[], %b::uuid[], %b::text[], %b::bigint[])"
                " ON CONFLICT (payment_id, merchant_id) DO UPDATE SET due_minor = partner_dues.due_minor"
                " + excluded.due_minor",
                [[k[0] for k in keys], [k[1] for k in keys], [dues[k][0] for k in keys], [dues[k][1] for k in keys]],
                binary=True,
            )
        if changed:
            kinds = {c: COLUMNS[c] for c in CHANGING}
            cur.execute(
                f"UPDATE payouts t SET {', '.join(f'{c} = u.{c}' for c in CHANGING)}"
                f" FROM unnest(%b::uuid[], {_unnest(kinds)}) AS u(_id, {', '.join(CHANGING)})"
                " WHERE t.payout_id = u._id",
                [list(changed), *([row.get(c) for row in changed.values()] for c in CHANGING)], binary=True,
            )


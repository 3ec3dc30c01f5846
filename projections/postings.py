"""Postings: every posting of a money movement with its event's time, so balances can be read as of
any moment (projections/views.py ``balances_as_of``, ``balance_history``).

A batch's postings are inserted with one statement; a posting never changes afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from application.envelope import EventEnvelope
from projections.balances import merchant_of


class PostingsProjection:
    name = "postings"
    tables: tuple[str, ...] = ("ledger_postings",)

    def apply_batch(self, cur: psycopg.Cursor[Any], envelopes: Sequence[EventEnvelope]) -> None:
        rows: list[tuple[int, int, Any, str, str, int, str | None]] = []
        for e in envelopes:
            assert e.position is not None, "envelopes are applied with their positions"
            for line_no, p in enumerate(e.data.get("postings") or [], start=1):
                signed = p["amount_minor"] if p["direction"] == "debit" else -p["amount_minor"]
                rows.append((e.position, line_no, e.occurred_at, p["account"], p["currency"], signed,
                             merchant_of(p["account"])))
        if not rows:
            return
        columns = list(zip(*rows, strict=True))
        cur.execute(
            "INSERT INTO ledger_postings (position, line_no, occurred_at, account, currency, amount_minor, merchant_id)"
            " SELECT * FROM unnest(%b::bigint[], %b::int[], %b::timestamptz[], %b::text[], %b::text[],"
            " %b::bigint[], %b::uuid[])",
            [list(c) for c in columns], binary=True,
        )

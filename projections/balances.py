"""Balances: ledger balances per account and currency from the postings of money movements.

A batch's postings are summed per account and currency in Python and added with one statement.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from application.envelope import EventEnvelope


def merchant_of(account: str) -> str | None:
    kind, _, rest = account.partition(":")
    return rest.partition(":")[0] if kind == "merchant" else None


class BalancesProjection:
    name = "balances"
    tables: tuple[str, ...] = ("ledger_balances",)

    def apply_batch(self, cur: psycopg.Cursor[Any], envelopes: Sequence[EventEnvelope]) -> None:
        deltas: dict[tuple[str, str], int] = {}
        for e in envelopes:
            for p in e.data.get("postings") or []:
                signed = p["amount_minor"] if p["direction"] == "debit" else -p["amount_minor"]
                key = (p["account"], p["currency"])
                deltas[key] = deltas.get(key, 0) + signed
        if not deltas:
            return
        keys = list(deltas)
        cur.execute(
            "INSERT INTO ledger_balances (account, currency, balance_minor, merchant_id)"
            " SELECT * FROM unnest(%b::text[], %b::text[], %b::bigint[], %b::uuid[])"
            " ON CONFLICT (account, currency)"
            " DO UPDATE SET balance_minor = ledger_balances.balance_minor + excluded.balance_minor",
            [[k[0] for k in keys], [k[1] for k in keys], [deltas[k] for k in keys],
             [merchant_of(k[0]) for k in keys]], binary=True,
        )

"""Balances: ledger balances per account and currency from the postings of money movements."""

from __future__ import annotations

from typing import Any

import psycopg

from application.envelope import EventEnvelope


def merchant_of(account: str) -> str | None:
    kind, _, rest = account.partition(":")
    return rest.partition(":")[0] if kind == "merchant" else None


class BalancesProjection:
    name = "balances"
    tables = ("ledger_balances",)

    def apply(self, cur: psycopg.Cursor[Any], e: EventEnvelope) -> None:
        postings = e.data.get("postings") or []
        for p in postings:
            signed = p["amount_minor"] if p["direction"] == "debit" else -p["amount_minor"]
            cur.execute(
                "INSERT INTO ledger_balances (account, currency, balance_minor, merchant_id)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT (account, currency)"
                " DO UPDATE SET balance_minor = ledger_balances.balance_minor + excluded.balance_minor",
                (p["account"], p["currency"], signed, merchant_of(p["account"])),
            )

    def after_batch(self, cur: psycopg.Cursor[Any]) -> None:
        pass

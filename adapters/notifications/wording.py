"""The words of the SMS the ledger sends customers, in English: the ``MessageWording`` port of
application/ports.py. The ledger supplies the facts (merchant, amount, link, code, expiry)."""

from __future__ import annotations

from datetime import timedelta

from domain.money import Money


class SmsWording:
    def payment_link(
        self, *, merchant_name: str, amount: Money, order_reference: str, link_url: str, code: str,
        expires_in: timedelta,
    ) -> str:
        # Whole minutes, and never "0 min" for a link that is still alive.
        minutes = max(1, round(expires_in.total_seconds() / 60))
        return (f"{merchant_name}: pay {amount.format()} for order {order_reference} at "
                f"{link_url} - your code is {code}. "
                f"The link expires in {minutes} min. Never share this code.")

    def new_code(self, *, merchant_name: str, code: str) -> str:
        return f"{merchant_name}: your new code is {code}. Never share this code."

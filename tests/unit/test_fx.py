"""Conversion for merchants that settle in another currency: exact rounding across currencies of
different minor units, and a payment whose settlement, refunds and payouts convert part by part
so every currency still balances and what is owed adds up."""

from __future__ import annotations

from collections import defaultdict

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.errors import InvalidField
from domain.fx import FX_ACCOUNT, FxRate
from domain.ledger import Posting, imbalance
from domain.payment import Payment

from .builders import fake_seal, payment_in

EUR_PER_USD = FxRate("USD", "EUR", "0.92", "test", "2026-12-04T00:00:00+00:00")


def test_conversion_rounds_half_up_to_the_target_minor_unit() -> None:
    assert EUR_PER_USD.convert(10_000) == 9_200
    assert EUR_PER_USD.convert(1) == 1  # 0.92 cent: rounds to 1
    assert FxRate("USD", "EUR", "0.5", "t", "t").convert(1) == 1  # exactly half: up
    assert FxRate("USD", "EUR", "0.5", "t", "t").convert(-1) == -1
    assert FxRate("USD", "JPY", "151", "t", "t").convert(1_050) == 1_586  # 10.50 USD = 1585.5 yen
    assert FxRate("JPY", "USD", "0.0066225", "t", "t").convert(1_000) == 662  # 6.6225 USD
    for bad in ("0", "-1", "abc", "NaN"):
        with pytest.raises(InvalidField):
            FxRate("USD", "EUR", bad, "t", "t")


def _owed_by_currency(payment: Payment, events: list[object]) -> dict[tuple[str, str], int]:
    totals: dict[tuple[str, str], int] = defaultdict(int)
    for event in events:
        for d in getattr(event, "postings", ()) or ():
            signed = d["amount_minor"] if d["direction"] == "credit" else -d["amount_minor"]
            totals[(d["account"], d["currency"])] += signed
    return totals


@given(st.lists(st.integers(1, 3_000), max_size=3), st.lists(st.integers(1, 3_000), max_size=2),
       st.sampled_from(["0.92", "151", "1.0001", "0.0066"]))
def test_a_converted_settlement_balances_each_currency_and_payouts_take_exactly_what_is_available(
    before: list[int], after: list[int], rate: str,
) -> None:
    fx = FxRate("USD", "JPY" if rate in ("151",) else "EUR", rate, "t", "t")
    payment = payment_in("captured")  # 100.00 USD captured
    events: list[object] = list(payment.collect_events())
    refunds = iter(range(100))

    def refund(amount: int) -> None:
        if amount <= payment.refundable_minor:
            n = next(refunds)
            payment.refund(refund_id=f"rf_{n}", amount_minor=amount, reason="", processor_reference=f"re_{n}",
                           seal=fake_seal)

    for amount in before:
        refund(amount)
    payment.settle("st_1", 210, fx)
    assert payment.payout_currency == fx.to_currency
    for amount in after:
        refund(amount)
    events += payment.collect_events()
    for event in events:
        assert imbalance(Posting.from_dict(d) for d in getattr(event, "postings", ()) or ()) == {}, event
    owed = _owed_by_currency(payment, events)
    merchant = payment.merchant_id
    gross, fee, shares, refunded, _ = payment.payout_due()
    assert owed[(f"merchant:{merchant}:available", fx.to_currency)] == gross - fee - shares - refunded
    assert owed.get((f"merchant:{merchant}:payable", "USD"), 0) == 0
    assert (FX_ACCOUNT, fx.to_currency) in owed  # the exchange position, in both currencies
    payment.include_in_payout("po_1")
    assert payment.payout_due() == (0, 0, 0, 0, 0)
    assert isinstance(payment, Payment)

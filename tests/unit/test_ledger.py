"""Ledger: the fee rule and its rounding, fee schedule rejections, balanced postings for every movement."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from uuid import uuid4

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.errors import InvalidFeeSchedule, InvalidSplit, UnknownCurrency
from domain.ledger import (
    PLATFORM_CASH,
    PLATFORM_FEES,
    PLATFORM_PARTY,
    PROCESSOR_CLEARING,
    PROCESSOR_FEES,
    FeeSchedule,
    Posting,
    Split,
    balanced,
    capture_postings,
    check_splits,
    imbalance,
    merchant_available,
    merchant_in_transit,
    merchant_payable,
    payout_created_postings,
    payout_failed_postings,
    payout_paid_postings,
    refund_postings,
    refund_settlement_postings,
    settlement_postings,
)
from domain.money import CURRENCY_EXPONENTS, max_amount_minor


def test_default_schedule_is_2_9_percent_plus_30_minor_units() -> None:
    assert FeeSchedule() == FeeSchedule(percent_bps=290, fixed_minor=30)
    assert FeeSchedule().fee_for(10_000) == 290 + 30


@pytest.mark.parametrize(
    ("schedule", "amount", "fee"),
    [
        (FeeSchedule(), 1_000, 29 + 30),  # 29.0 exactly
        (FeeSchedule(), 499, 14 + 30),  # 14.471 rounds down
        (FeeSchedule(), 500, 15 + 30),  # 14.5 exactly: half rounds up
        (FeeSchedule(), 1_500, 44 + 30),  # 43.5 exactly: half rounds up (banker's would give 44 too)
        (FeeSchedule(), 2_500, 73 + 30),  # 72.5 exactly: half up gives 73, banker's would give 72
        (FeeSchedule(), 1_724, 50 + 30),  # 49.996 rounds up
        (FeeSchedule(50, 0), 100, 1),  # 0.5 -> 1 (banker's rounding would give 0)
        (FeeSchedule(50, 0), 99, 0),  # 0.495 -> 0
        (FeeSchedule(50, 0), 500, 3),  # 2.5 -> 3 (banker's rounding would give 2)
        (FeeSchedule(0, 0), 10_000, 0),
        (FeeSchedule(0, 25), 10_000, 25),
        (FeeSchedule(10_000, 0), 777, 777),
    ],
)
def test_fee_rule_rounds_the_percentage_half_up_then_adds_the_fixed_part(
    schedule: FeeSchedule, amount: int, fee: int
) -> None:
    assert schedule.fee_for(amount) == fee


@pytest.mark.parametrize(
    ("schedule", "amount", "fee"),
    [
        (FeeSchedule(), 1, 1),  # 0 + 30 capped at 1
        (FeeSchedule(), 30, 30),  # 1 + 30 = 31 capped at 30
        (FeeSchedule(), 31, 31),  # 1 + 30 = 31, exactly the amount
        (FeeSchedule(), 32, 31),  # below the cap
        (FeeSchedule(10_000, 5), 100, 100),
    ],
)
def test_fee_is_capped_at_the_amount(schedule: FeeSchedule, amount: int, fee: int) -> None:
    assert schedule.fee_for(amount) == fee


@pytest.mark.parametrize(
    "kwargs",
    [
        {"percent_bps": -1},
        {"fixed_minor": -1},
        {"percent_bps": 10_001},
        {"percent_bps": True},
        {"fixed_minor": False},
        {"percent_bps": 2.9},
        {"fixed_minor": 30.0},
        {"percent_bps": "290"},
        {"fixed_minor": None},
    ],
    ids=repr,
)
def test_fee_schedule_rejections(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidFeeSchedule) as caught:
        FeeSchedule(**kwargs)
    assert caught.value.code == "invalid_fee_schedule"


def test_fee_schedule_bounds_are_inclusive() -> None:
    assert FeeSchedule(percent_bps=10_000, fixed_minor=0).percent_bps == 10_000
    assert FeeSchedule(percent_bps=0, fixed_minor=0).fixed_minor == 0


def test_imbalance_reports_per_currency_difference() -> None:
    postings = [
        Posting("a", "debit", 500, "USD"),
        Posting("b", "credit", 400, "USD"),
        Posting("c", "debit", 7, "JPY"),
        Posting("d", "credit", 7, "JPY"),
        Posting("e", "credit", 3, "EUR"),
    ]
    assert imbalance(postings) == {"USD": 100, "EUR": -3}


def test_balanced_refuses_unbalanced_postings() -> None:
    with pytest.raises(AssertionError):
        balanced([Posting("a", "debit", 5, "USD"), Posting("b", "credit", 4, "USD")])


@pytest.mark.parametrize(
    ("direction", "amount"), [("debit", -1), ("sideways", 1), ("credit", 1.5), ("debit", None)]
)
def test_posting_refuses_programmer_errors(direction: Any, amount: Any) -> None:
    with pytest.raises(AssertionError):
        Posting("a", direction, amount, "USD")


def test_posting_refuses_unknown_currency() -> None:
    with pytest.raises(UnknownCurrency):
        Posting("a", "debit", 1, "XXX")


def test_posting_dict_round_trip_is_json_native() -> None:
    posting = Posting(merchant_payable("m-1"), "credit", 970, "USD")
    data = posting.as_dict()
    assert data == {
        "account": "merchant:m-1:payable",
        "direction": "credit",
        "amount_minor": 970,
        "currency": "USD",
    }
    assert Posting.from_dict(data) == posting


def test_capture_postings_for_the_default_fee() -> None:
    merchant_id = uuid4()
    assert capture_postings(merchant_id, 10_000, 320, "USD") == (
        Posting(PROCESSOR_CLEARING, "debit", 10_000, "USD"),
        Posting(f"merchant:{merchant_id}:payable", "credit", 9_680, "USD"),
        Posting(PLATFORM_FEES, "credit", 320, "USD"),
    )


def test_capture_postings_leave_out_zero_legs() -> None:
    merchant_id = uuid4()
    accounts_when_fee_is_everything = {p.account for p in capture_postings(merchant_id, 1, 1, "USD")}
    assert accounts_when_fee_is_everything == {PROCESSOR_CLEARING, PLATFORM_FEES}
    accounts_when_fee_is_zero = {p.account for p in capture_postings(merchant_id, 100, 0, "USD")}
    assert accounts_when_fee_is_zero == {PROCESSOR_CLEARING, merchant_payable(merchant_id)}


currencies = st.sampled_from(sorted(CURRENCY_EXPONENTS))
schedules = st.builds(FeeSchedule, st.integers(0, 10_000), st.integers(0, 10**9))


@st.composite
def amounts(draw: st.DrawFn) -> tuple[int, str]:
    currency = draw(currencies)
    return draw(st.integers(1, max_amount_minor(currency))), currency


def _total(postings: tuple[Posting, ...], account: str, direction: str) -> int:
    return sum(p.amount_minor for p in postings if p.account == account and p.direction == direction)


@given(amounts(), st.integers(0, 10_000), st.integers(0, 10**9))
def test_fee_matches_a_decimal_half_up_reference(
    amount_currency: tuple[int, str], percent_bps: int, fixed_minor: int
) -> None:
    amount, _ = amount_currency
    percentage = (Decimal(amount) * percent_bps / 10_000).quantize(Decimal(1), rounding=ROUND_HALF_UP)
    fee = FeeSchedule(percent_bps, fixed_minor).fee_for(amount)
    assert fee == min(amount, int(percentage) + fixed_minor)
    assert 0 <= fee <= amount


@given(amounts(), schedules)
def test_capture_postings_balance_and_split_the_amount(
    amount_currency: tuple[int, str], schedule: FeeSchedule
) -> None:
    amount, currency = amount_currency
    merchant_id = uuid4()
    fee = schedule.fee_for(amount)
    postings = capture_postings(merchant_id, amount, fee, currency)
    assert imbalance(postings) == {}
    assert all(p.amount_minor > 0 and p.currency == currency for p in postings)
    payable = _total(postings, merchant_payable(merchant_id), "credit")
    fees = _total(postings, PLATFORM_FEES, "credit")
    assert fees == fee
    assert payable + fees == amount == _total(postings, PROCESSOR_CLEARING, "debit")


@given(amounts())
def test_refund_postings_balance_and_come_out_of_the_merchant_payable(
    amount_currency: tuple[int, str],
) -> None:
    amount, currency = amount_currency
    merchant_id = uuid4()
    postings = refund_postings(merchant_id, amount, currency)
    assert imbalance(postings) == {}
    assert all(p.amount_minor >= 0 and p.currency == currency for p in postings)
    assert _total(postings, merchant_payable(merchant_id), "debit") == amount
    assert _total(postings, PROCESSOR_CLEARING, "credit") == amount


@given(amounts(), st.data())
def test_settlement_postings_balance_move_clearing_to_cash_and_the_share_to_available(
    amount_currency: tuple[int, str], data: st.DataObject
) -> None:
    amount, currency = amount_currency
    fee = data.draw(st.integers(0, amount))
    share = data.draw(st.integers(-amount, amount))
    merchant_id = uuid4()
    postings = settlement_postings(merchant_id, amount, fee, share, currency)
    assert imbalance(postings) == {}
    assert all(p.amount_minor > 0 and p.currency == currency for p in postings)
    assert _total(postings, PLATFORM_CASH, "debit") == amount - fee
    assert _total(postings, PROCESSOR_FEES, "debit") == fee
    assert _total(postings, PROCESSOR_CLEARING, "credit") == amount
    moved = _total(postings, merchant_available(merchant_id), "credit") - _total(
        postings, merchant_available(merchant_id), "debit")
    assert moved == share


@given(amounts(), schedules, st.data())
def test_capture_refunds_and_their_settlement_leave_clearing_at_zero(
    amount_currency: tuple[int, str], schedule: FeeSchedule, data: st.DataObject
) -> None:
    amount, currency = amount_currency
    refunded = data.draw(st.integers(0, amount))
    processor_fee = data.draw(st.integers(0, amount))
    merchant_id = uuid4()
    fee = schedule.fee_for(amount)
    postings = capture_postings(merchant_id, amount, fee, currency)
    if refunded:
        postings += refund_postings(merchant_id, refunded, currency)
        postings += refund_settlement_postings(refunded, 0, currency)
    postings += settlement_postings(merchant_id, amount, processor_fee, amount - fee - refunded, currency)
    assert imbalance(postings) == {}
    clearing = sum(p.signed_minor for p in postings if p.account == PROCESSOR_CLEARING)
    assert clearing == 0
    pending = sum(p.signed_minor for p in postings if p.account == merchant_payable(merchant_id))
    assert pending == 0
    cash = sum(p.signed_minor for p in postings if p.account == PLATFORM_CASH)
    assert cash == amount - processor_fee - refunded


@given(st.integers(-10_000, 10_000), st.integers(-1_000, 1_000))
def test_payout_postings_balance_and_a_paid_payout_leaves_nothing_in_transit(amount: int, reserve: int) -> None:
    merchant_id = uuid4()
    created = payout_created_postings(merchant_id, amount, reserve, "USD")
    assert imbalance(created) == {}
    if amount > 0:
        for end in (payout_paid_postings(merchant_id, amount, "USD"),
                    payout_failed_postings(merchant_id, amount, "USD")):
            postings = created + end
            assert imbalance(postings) == {}
            assert sum(p.signed_minor for p in postings if p.account == merchant_in_transit(merchant_id)) == 0
    else:
        assert all(p.account != merchant_in_transit(merchant_id) for p in created)



# -- splits ---------------------------------------------------------------------------------------


def test_splits_are_checked_whole() -> None:
    merchant, partner = uuid4(), str(uuid4())
    assert check_splits([Split(partner, amount_minor=500), Split(PLATFORM_PARTY, percent_bps=1_000)], 10_000,
                        merchant) == (Split(partner, amount_minor=500), Split(PLATFORM_PARTY, percent_bps=1_000))
    refused = {
        "its own merchant": [Split(str(merchant), amount_minor=1)],
        "twice": [Split(partner, amount_minor=1), Split(partner, amount_minor=2)],
        "both": [Split(partner, amount_minor=1, percent_bps=1)],
        "neither": [Split(partner)],
        "zero": [Split(partner, amount_minor=0)],
        "over 100%": [Split(partner, percent_bps=10_001)],
        "more than the amount": [Split(partner, amount_minor=6_000), Split(PLATFORM_PARTY, percent_bps=5_000)],
    }
    for why, splits in refused.items():
        with pytest.raises(InvalidSplit):
            check_splits(splits, 10_000, merchant)
            pytest.fail(why)


@given(amounts(), schedules, st.data())
def test_capture_postings_with_splits_credit_each_party_and_balance(
    amount_currency: tuple[int, str], schedule: FeeSchedule, data: st.DataObject
) -> None:
    amount, currency = amount_currency
    fee = schedule.fee_for(amount)
    partner_share = data.draw(st.integers(0, amount - fee))
    platform_share = data.draw(st.integers(0, amount - fee - partner_share))
    merchant, partner = uuid4(), str(uuid4())
    postings = capture_postings(merchant, amount, fee, currency, [(partner, partner_share),
                                                                  (PLATFORM_PARTY, platform_share)])
    assert imbalance(postings) == {}
    assert _total(postings, merchant_payable(partner), "credit") == partner_share
    assert _total(postings, PLATFORM_FEES, "credit") == fee + platform_share
    assert _total(postings, merchant_payable(merchant), "credit") == amount - fee - partner_share - platform_share

"""Risk rules: the table from domain/risk.py's docstring, the precedence of the hard rules, and
properties (score bounded, monotonic in velocity and declines)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.errors import DomainError
from domain.risk import DEFAULT_POLICY, RiskDecision, RiskPolicy, assess

USD_100 = 10_000

# (case, kwargs for assess, score, decision, reasons). Counts include the attempt being assessed.
CASES: list[tuple[str, dict[str, Any], int, str, tuple[str, ...]]] = [
    ("first attempt, small amount", {}, 0, "approve", ()),
    ("second attempt on the card", {"recent_by_card": 2}, 15, "approve", ("card_velocity",)),
    ("third attempt on the card", {"recent_by_card": 3, "recent_by_phone": 3}, 46, "approve",
     ("card_velocity", "phone_velocity")),
    ("fourth attempt on the card: hard limit", {"recent_by_card": 4}, 100, "decline",
     ("card_velocity_limit",)),
    ("fifth from the phone", {"recent_by_phone": 5}, 32, "approve", ("phone_velocity",)),
    ("sixth from the phone: hard limit", {"recent_by_phone": 6}, 100, "decline", ("phone_velocity_limit",)),
    ("above the merchant limit", {"amount_minor": 5_001, "merchant_limit_minor": 5_000}, 100, "decline",
     ("amount_above_merchant_limit",)),
    ("exactly the merchant limit", {"amount_minor": 5_000, "merchant_limit_minor": 5_000}, 20, "approve",
     ("near_merchant_limit",)),
    ("half the merchant limit", {"amount_minor": 2_500, "merchant_limit_minor": 5_000}, 10, "approve",
     ("near_merchant_limit",)),
    ("below half the merchant limit", {"amount_minor": 2_499, "merchant_limit_minor": 5_000}, 0, "approve",
     ()),
    ("at the large amount", {"amount_minor": USD_100, "large_amount_minor": USD_100}, 15, "approve",
     ("large_amount",)),
    ("5x the large amount", {"amount_minor": 5 * USD_100, "large_amount_minor": USD_100}, 25, "approve",
     ("large_amount",)),
    ("10x the large amount", {"amount_minor": 10 * USD_100, "large_amount_minor": USD_100}, 35, "approve",
     ("large_amount",)),
    ("velocity and declines reach review",
     {"recent_by_card": 3, "recent_by_phone": 3, "prior_declines": 1}, 61, "review",
     ("card_velocity", "phone_velocity", "prior_declines")),
    ("review below the decline score", {"recent_by_card": 3, "prior_declines": 1, "amount_minor": 5 * USD_100,
                                        "large_amount_minor": USD_100}, 70, "review",
     ("card_velocity", "prior_declines", "large_amount")),
    ("one point under the review score", {"recent_by_card": 3, "recent_by_phone": 2, "amount_minor": 2_500,
                                          "merchant_limit_minor": 5_000}, 48, "approve",
     ("card_velocity", "phone_velocity", "near_merchant_limit")),
    ("exactly the review score", {"recent_by_card": 3, "amount_minor": 5_000, "merchant_limit_minor": 5_000},
     50, "review", ("card_velocity", "near_merchant_limit")),
    ("exactly the decline score", {"recent_by_card": 3, "prior_declines": 2, "amount_minor": 5_000,
                                   "merchant_limit_minor": 5_000}, 80, "decline",
     ("card_velocity", "prior_declines", "near_merchant_limit")),
    ("everything at once reaches decline by score",
     {"recent_by_card": 3, "recent_by_phone": 5, "prior_declines": 2}, 92, "decline",
     ("card_velocity", "phone_velocity", "prior_declines")),
    ("prior declines are capped", {"prior_declines": 9}, 45, "approve", ("prior_declines",)),
    ("the score is capped at 100",
     {"recent_by_card": 3, "recent_by_phone": 5, "prior_declines": 3, "amount_minor": 9_500,
      "merchant_limit_minor": 10_000, "large_amount_minor": 900}, 100, "decline",
     ("card_velocity", "phone_velocity", "prior_declines", "near_merchant_limit", "large_amount")),
    ("hard rules in precedence order",
     {"amount_minor": 9_000, "merchant_limit_minor": 100, "recent_by_card": 9, "recent_by_phone": 9}, 100,
     "decline", ("amount_above_merchant_limit", "card_velocity_limit", "phone_velocity_limit")),
]


def run(**overrides: Any) -> RiskDecision:
    kwargs: dict[str, Any] = {
        "amount_minor": 2_000, "currency": "USD", "merchant_limit_minor": None,
        "recent_by_phone": 1, "recent_by_card": 1,
    }
    kwargs.update(overrides)
    return assess(**kwargs)


@pytest.mark.parametrize(("kwargs", "score", "decision", "reasons"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_rules(kwargs: dict[str, Any], score: int, decision: str, reasons: tuple[str, ...]) -> None:
    assert run(**kwargs) == RiskDecision(score, decision, reasons)  # type: ignore[arg-type]


def test_review_is_allowed_and_decline_is_not() -> None:
    assert run(recent_by_card=3, recent_by_phone=3, prior_declines=1).allowed
    assert not run(recent_by_card=4).allowed


def test_a_stricter_policy_changes_the_thresholds() -> None:
    strict = RiskPolicy(max_attempts_per_card=1, review_score=10)
    assert run(recent_by_card=2, policy=strict).decision == "decline"
    assert run(recent_by_phone=3, policy=strict).decision == "review"
    assert DEFAULT_POLICY.velocity_window_minutes == 10


@pytest.mark.parametrize(
    "overrides",
    [{"recent_by_phone": -1}, {"recent_by_card": -1}, {"prior_declines": -2}, {"recent_by_card": 1.5}],
)
def test_counts_must_be_non_negative_integers(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        run(**overrides)


@pytest.mark.parametrize("overrides", [{"amount_minor": 0}, {"currency": "XXX"}, {"amount_minor": 2.5}])
def test_money_is_checked_like_everywhere_else(overrides: dict[str, Any]) -> None:
    with pytest.raises(DomainError):
        run(**overrides)


SEVERITY = {"approve": 0, "review": 1, "decline": 2}
counts = st.integers(min_value=0, max_value=20)
inputs = st.fixed_dictionaries({
    "amount_minor": st.integers(min_value=1, max_value=10_000_000),
    "merchant_limit_minor": st.none() | st.integers(min_value=1, max_value=10_000_000),
    "large_amount_minor": st.none() | st.integers(min_value=1, max_value=1_000_000),
    "recent_by_phone": counts,
    "recent_by_card": counts,
    "prior_declines": counts,
})


@given(inputs, st.sampled_from(["recent_by_phone", "recent_by_card", "prior_declines"]),
       st.integers(min_value=1, max_value=10))
def test_more_velocity_never_lowers_the_score_or_softens_the_decision(
    kwargs: dict[str, Any], signal: str, more: int
) -> None:
    before = run(**kwargs)
    after = run(**{**kwargs, signal: kwargs[signal] + more})
    assert after.score >= before.score
    assert SEVERITY[after.decision] >= SEVERITY[before.decision]


@given(inputs)
def test_score_is_bounded_and_decides_by_the_thresholds(kwargs: dict[str, Any]) -> None:
    result = run(**kwargs)
    assert 0 <= result.score <= 100
    if result.decision != "decline":
        assert result.score < DEFAULT_POLICY.decline_score
    if result.decision == "approve":
        assert result.score < DEFAULT_POLICY.review_score
    assert (result.score > 0) == bool(result.reasons) or result.decision == "decline"
    limit = kwargs["merchant_limit_minor"]
    if limit is not None and kwargs["amount_minor"] > limit:
        assert result.decision == "decline" and result.reasons[0] == "amount_above_merchant_limit"

"""Risk rules run before a payment is sent for authorization: a score from 0 to 100 and a
decision (approve, review, decline), always with the reasons that produced it.

Pure: the caller supplies the counts (attempts by this phone and this card in the velocity
window, declines already suffered) and the merchant's limit; the rules only compute.

Hard rules, checked first and in this order; any of them declines with score 100:

    amount_above_merchant_limit  amount_minor > merchant_limit_minor
    card_velocity_limit          recent_by_card  > policy.max_attempts_per_card  (3 in 10 min)
    phone_velocity_limit         recent_by_phone > policy.max_attempts_per_phone (5 in 10 min)

Scored signals otherwise (points add up, capped at 100), listed in this order in ``reasons``:

    card_velocity         15 per attempt on this card beyond the first in the window
    phone_velocity         8 per attempt from this phone beyond the first in the window
    prior_declines        15 per decline already suffered in this session, at most 45
    near_merchant_limit   10 at half the merchant's limit, 20 at nine tenths
    large_amount          15 at large_amount_minor, 25 at 5x, 35 at 10x

Then: score >= policy.decline_score (80) declines; >= policy.review_score (50) is review
(authorized, but flagged for a person to look at); below that, approve.

``recent_by_phone`` and ``recent_by_card`` count attempts in the window *including this one*:
the first attempt is 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from domain.money import check_amount, check_currency

RiskVerdict = Literal["approve", "review", "decline"]

APPROVE: RiskVerdict = "approve"
REVIEW: RiskVerdict = "review"
DECLINE: RiskVerdict = "decline"

MAX_SCORE = 100


@dataclass(frozen=True)
class RiskPolicy:
    """The thresholds; the business owns them, the composition root may override them."""

    velocity_window_minutes: int = 10  # the window the caller counts attempts over
    max_attempts_per_phone: int = 5
    max_attempts_per_card: int = 3
    review_score: int = 50
    decline_score: int = 80
    card_velocity_points: int = 15
    phone_velocity_points: int = 8
    prior_decline_points: int = 15
    prior_decline_points_max: int = 45


DEFAULT_POLICY = RiskPolicy()


@dataclass(frozen=True)
class RiskDecision:
    score: int
    decision: RiskVerdict
    reasons: tuple[str, ...]

    @property
    def allowed(self) -> bool:
        """Approve and review both go on to the processor; only decline stops the payment."""
        return self.decision != DECLINE


def assess(
    amount_minor: int,
    currency: str,
    merchant_limit_minor: int | None,
    recent_by_phone: int,
    recent_by_card: int,
    *,
    prior_declines: int = 0,
    large_amount_minor: int | None = None,
    policy: RiskPolicy = DEFAULT_POLICY,
) -> RiskDecision:
    """Score one payment attempt. ``merchant_limit_minor`` is the merchant's limit for
    ``currency`` (None: no limit); ``large_amount_minor`` is the amount from which the amount
    alone raises the score (the ledger passes its identity-check threshold; None: not scored)."""
    check_currency(currency)
    check_amount(amount_minor, currency)
    for name, count in (("recent_by_phone", recent_by_phone), ("recent_by_card", recent_by_card),
                        ("prior_declines", prior_declines)):
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"{name} must be a count (an integer >= 0), got {count!r}")

    hard = []
    if merchant_limit_minor is not None and amount_minor > merchant_limit_minor:
        hard.append("amount_above_merchant_limit")
    if recent_by_card > policy.max_attempts_per_card:
        hard.append("card_velocity_limit")
    if recent_by_phone > policy.max_attempts_per_phone:
        hard.append("phone_velocity_limit")
    if hard:
        return RiskDecision(MAX_SCORE, DECLINE, tuple(hard))

    signals = (
        ("card_velocity", policy.card_velocity_points * max(0, recent_by_card - 1)),
        ("phone_velocity", policy.phone_velocity_points * max(0, recent_by_phone - 1)),
        ("prior_declines",
         min(policy.prior_decline_points_max, policy.prior_decline_points * prior_declines)),
        ("near_merchant_limit", _near_limit_points(amount_minor, merchant_limit_minor)),
        ("large_amount", _large_amount_points(amount_minor, large_amount_minor)),
    )
    score = min(MAX_SCORE, sum(points for _, points in signals))
    reasons = tuple(name for name, points in signals if points > 0)
    if score >= policy.decline_score:
        return RiskDecision(score, DECLINE, reasons)
    if score >= policy.review_score:
        return RiskDecision(score, REVIEW, reasons)
    return RiskDecision(score, APPROVE, reasons)


def _near_limit_points(amount_minor: int, limit_minor: int | None) -> int:
    if not limit_minor:
        return 0
    # Integer comparisons, no division: 10 * amount >= 9 * limit is "at nine tenths".
    if 10 * amount_minor >= 9 * limit_minor:
        return 20
    if 2 * amount_minor >= limit_minor:
        return 10
    return 0


def _large_amount_points(amount_minor: int, large_minor: int | None) -> int:
    if not large_minor or amount_minor < large_minor:
        return 0
    if amount_minor >= 10 * large_minor:
        return 35
    if amount_minor >= 5 * large_minor:
        return 25
    return 15

"""Double-entry postings, account names and the merchant fee schedule.

Every money movement carries postings that balance per currency: the sum of debits equals the
sum of credits. Postings travel inside events as plain dicts (``Posting.as_dict``) so the
event store and Kafka see JSON-native values.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from domain.errors import InvalidFeeSchedule
from domain.money import check_currency

Direction = Literal["debit", "credit"]

PROCESSOR_CLEARING = "processor_clearing"
PLATFORM_FEES = "platform:fees"
PLATFORM_CASH = "platform:cash"


def merchant_payable(merchant_id: object) -> str:
    return f"merchant:{merchant_id}:payable"


@dataclass(frozen=True, slots=True)
class Posting:
    account: str
    direction: Direction
    amount_minor: int
    currency: str

    def __post_init__(self) -> None:
        # Programmer errors, not business rejections: builders below never produce these.
        assert self.direction in ("debit", "credit"), self.direction
        assert isinstance(self.amount_minor, int) and self.amount_minor >= 0, self.amount_minor
        check_currency(self.currency)

    @property
    def signed_minor(self) -> int:
        """Debits positive, credits negative: a balanced set sums to zero per currency."""
        return self.amount_minor if self.direction == "debit" else -self.amount_minor

    def as_dict(self) -> dict[str, Any]:
        return {
            "account": self.account,
            "direction": self.direction,
            "amount_minor": self.amount_minor,
            "currency": self.currency,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Posting:
        return cls(data["account"], data["direction"], data["amount_minor"], data["currency"])


def imbalance(postings: Iterable[Posting]) -> dict[str, int]:
    """Per currency, debits minus credits, for the currencies that do not balance."""
    totals: dict[str, int] = defaultdict(int)
    for posting in postings:
        totals[posting.currency] += posting.signed_minor
    return {currency: total for currency, total in totals.items() if total != 0}


def balanced(postings: Iterable[Posting]) -> tuple[Posting, ...]:
    """Return the postings after checking they balance; an imbalance is a bug, never input."""
    postings = tuple(postings)
    off = imbalance(postings)
    assert not off, f"unbalanced postings {off}: {postings}"
    return postings


@dataclass(frozen=True, slots=True)
class FeeSchedule:
    """A percentage in basis points plus a fixed part in minor units of the payment's currency.

    Rounding rule: the percentage part is rounded half up to a whole minor unit
    (``(amount * bps + 5_000) // 10_000``), then the fixed part is added, and the fee is
    capped at the amount so a merchant's share is never negative.
    """

    percent_bps: int = 290
    fixed_minor: int = 30

    def __post_init__(self) -> None:
        for name, value in (("percent_bps", self.percent_bps), ("fixed_minor", self.fixed_minor)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidFeeSchedule(f"{name} must be a non-negative integer, got {value!r}")
        if self.percent_bps > 10_000:
            raise InvalidFeeSchedule(
                f"percent_bps must be at most 10000 (100%), got {self.percent_bps}"
            )

    def fee_for(self, amount_minor: int) -> int:
        percentage_part = (amount_minor * self.percent_bps + 5_000) // 10_000
        return min(amount_minor, percentage_part + self.fixed_minor)


def capture_postings(
    merchant_id: object, amount_minor: int, fee_minor: int, currency: str
) -> tuple[Posting, ...]:
    """Captured funds are owed to us by the processor; we owe the merchant all but our fee."""
    return balanced(
        p
        for p in (
            Posting(PROCESSOR_CLEARING, "debit", amount_minor, currency),
            Posting(merchant_payable(merchant_id), "credit", amount_minor - fee_minor, currency),
            Posting(PLATFORM_FEES, "credit", fee_minor, currency),
        )
        if p.amount_minor
    )


def refund_postings(merchant_id: object, amount_minor: int, currency: str) -> tuple[Posting, ...]:
    """A refund comes out of the merchant's payable; our fee is not returned."""
    return balanced(
        (
            Posting(merchant_payable(merchant_id), "debit", amount_minor, currency),
            Posting(PROCESSOR_CLEARING, "credit", amount_minor, currency),
        )
    )


def settlement_postings(amount_minor: int, currency: str) -> tuple[Posting, ...]:
    """The processor pays out the net of captures and refunds into our bank account."""
    return balanced(
        (
            Posting(PLATFORM_CASH, "debit", amount_minor, currency),
            Posting(PROCESSOR_CLEARING, "credit", amount_minor, currency),
        )
    )

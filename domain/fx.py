"""Currency conversion for merchants who settle in another currency than their payments'.

A rate says how many units (major) of ``to_currency`` one unit of ``from_currency`` buys; it is
kept as a decimal string, so the event that records it replays to the same amounts. Converting
minor units goes through exact fractions and rounds half up to the target's minor unit, once per
amount: a payment's gross, our fee, the splits' shares and each refund are converted one by one,
and what the merchant is owed is their difference, so the parts always add up.

The conversion goes through ``FX_ACCOUNT``, once in each currency: the payment's currency leaves
it, the settlement currency enters it, so each currency's postings still sum to zero and the
account's balances are the platform's exchange position.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any

from domain.errors import InvalidField
from domain.money import check_currency, exponent

FX_ACCOUNT = "platform:fx"


@dataclass(frozen=True)
class FxRate:
    from_currency: str
    to_currency: str
    rate: str  # a positive decimal, e.g. "0.9214"
    source: str
    as_of: str  # ISO time the source quoted it

    def __post_init__(self) -> None:
        check_currency(self.from_currency)
        check_currency(self.to_currency)
        try:
            value = Decimal(self.rate)
        except InvalidOperation:
            raise InvalidField(f"an FX rate must be a decimal, not {self.rate!r}", field="rate") from None
        if not value.is_finite() or value <= 0:
            raise InvalidField(f"an FX rate must be positive, not {self.rate!r}", field="rate")

    def convert(self, amount_minor: int) -> int:
        """``amount_minor`` of ``from_currency`` in minor units of ``to_currency``, rounded half up
        (half away from zero for a negative amount)."""
        exact = (Fraction(amount_minor) * Fraction(Decimal(self.rate))
                 * Fraction(10) ** (exponent(self.to_currency) - exponent(self.from_currency)))
        whole = (abs(exact.numerator) * 2 + exact.denominator) // (exact.denominator * 2)
        return whole if exact >= 0 else -whole

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FxRate:
        return cls(data["from_currency"], data["to_currency"], data["rate"], data["source"], data["as_of"])

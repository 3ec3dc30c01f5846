"""Money as integer minor units plus an ISO 4217 code; the one table of currency exponents."""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

from domain.errors import AmountTooLarge, CurrencyMismatch, InvalidAmount, UnknownCurrency

# ISO 4217 minor-unit exponents. The only place an exponent is written down.
CURRENCY_EXPONENTS: MappingProxyType[str, int] = MappingProxyType(
    {
        "USD": 2,
        "EUR": 2,
        "GBP": 2,
        "CAD": 2,
        "AUD": 2,
        "NZD": 2,
        "CHF": 2,
        "SEK": 2,
        "NOK": 2,
        "DKK": 2,
        "MXN": 2,
        "INR": 2,
        "SGD": 2,
        "JPY": 0,
        "KRW": 0,
        "KWD": 3,
        "BHD": 3,
    }
)

# The largest single amount we accept, in major units, for every currency: one million.
# Voice orders above that are not a use case we serve; the cap also keeps every sum of a
# few thousand amounts far below 2**63 in PostgreSQL bigint columns.
MAX_AMOUNT_MAJOR = 1_000_000


def exponent(currency: str) -> int:
    try:
        return CURRENCY_EXPONENTS[currency]
    except KeyError:
        raise UnknownCurrency(
            f"unknown currency {currency!r}; supported: {', '.join(sorted(CURRENCY_EXPONENTS))}",
            currency=currency,
        ) from None


def max_amount_minor(currency: str) -> int:
    return MAX_AMOUNT_MAJOR * 10 ** exponent(currency)


def check_currency(currency: str) -> str:
    exponent(currency)
    return currency


def check_amount(amount_minor: int, currency: str) -> int:
    """Reject anything that is not a positive integer amount within the stated maximum."""
    # bool is an int subclass; True is not an amount.
    if not isinstance(amount_minor, int) or isinstance(amount_minor, bool):
        raise InvalidAmount(
            f"amount must be an integer number of minor units, got {amount_minor!r}",
            amount=amount_minor,
        )
    limit = max_amount_minor(currency)
    if amount_minor <= 0:
        raise InvalidAmount(f"amount must be positive, got {amount_minor}", amount=amount_minor)
    if amount_minor > limit:
        raise AmountTooLarge(
            f"amount {amount_minor} exceeds the maximum of {limit} minor units of {currency}",
            amount=amount_minor,
            maximum=limit,
        )
    return amount_minor


@dataclass(frozen=True, slots=True)
class Money:
    amount_minor: int
    currency: str

    @classmethod
    def of(cls, amount_minor: int, currency: str) -> Money:
        check_currency(currency)
        return cls(check_amount(amount_minor, currency), currency)

    def __add__(self, other: Money) -> Money:
        self._same_currency(other)
        return Money(self.amount_minor + other.amount_minor, self.currency)

    def _same_currency(self, other: Money) -> None:
        if other.currency != self.currency:
            raise CurrencyMismatch(
                f"cannot combine {self.currency} with {other.currency}",
                currencies=[self.currency, other.currency],
            )

    def format(self) -> str:
        """Human form, e.g. ``12.50 USD`` or ``1500 JPY``; for messages, never for arithmetic."""
        exp = exponent(self.currency)
        if exp == 0:
            return f"{self.amount_minor} {self.currency}"
        sign = "-" if self.amount_minor < 0 else ""
        major, minor = divmod(abs(self.amount_minor), 10**exp)
        return f"{sign}{major}.{minor:0{exp}d} {self.currency}"


def parse_major(text: str, currency: str) -> int:
    """Parse a decimal string in major units (``"12.50"``) into minor units, exactly."""
    exp = exponent(currency)
    text = text.strip()
    whole, dot, frac = text.partition(".")
    # isascii: str.isdigit() also accepts '²' and Arabic-Indic digits, which int() may reject.
    if (
        not (whole.isascii() and whole.isdigit())
        or (dot and not (frac.isascii() and frac.isdigit()))
        or len(frac) > exp
    ):
        raise InvalidAmount(
            f"{text!r} is not an amount of {currency} with at most {exp} decimals", amount=text
        )
    return int(whole) * 10**exp + int(frac.ljust(exp, "0") or "0")

"""A sandbox source of exchange rates behind the FxRates port: fixed mid-market rates against
the US dollar (roughly those of late 2026), crossed through it for other pairs. Development and
tests only; a deployment plugs in a real rate provider behind the same port."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from domain.fx import FxRate

# Units of each currency one US dollar buys.
PER_USD: dict[str, str] = {
    "USD": "1", "EUR": "0.92", "GBP": "0.79", "CAD": "1.37", "AUD": "1.52", "CHF": "0.88", "JPY": "151",
    "SEK": "10.6", "NOK": "10.8", "DKK": "6.87", "NZD": "1.66", "SGD": "1.34", "HKD": "7.8", "MXN": "17.9",
    "BRL": "5.4", "INR": "83.5", "ZAR": "18.2", "PLN": "3.95", "KRW": "1380",
}


class SandboxFxRates:
    source = "sandbox"

    def rate(self, from_currency: str, to_currency: str) -> FxRate:
        for currency in (from_currency, to_currency):
            if currency not in PER_USD:
                raise ValueError(f"the sandbox quotes no rate for {currency}; it knows {', '.join(sorted(PER_USD))}")
        cross = (Decimal(PER_USD[to_currency]) / Decimal(PER_USD[from_currency])).quantize(Decimal("0.000001"))
        return FxRate(from_currency, to_currency, str(cross.normalize()), self.source,
                      datetime.now(UTC).isoformat())

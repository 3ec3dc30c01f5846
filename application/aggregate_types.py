"""Which aggregate class travels under which name (application/envelope.py lists the names)."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from application.envelope import AGGREGATE_TYPE_NAMES
from domain.api_key import ApiKey
from domain.customer import Customer
from domain.dispute import Dispute
from domain.merchant import Merchant
from domain.payment import Payment
from domain.payment_session import PaymentSession
from domain.payout import Payout, PayoutAccount
from domain.reconciliation import Reconciliation

AGGREGATE_TYPES: Mapping[type, str] = MappingProxyType(
    {PaymentSession: "payment_session", Payment: "payment", Merchant: "merchant", ApiKey: "api_key",
     Customer: "customer", Reconciliation: "reconciliation", Payout: "payout", PayoutAccount: "payout_account",
     Dispute: "dispute"}
)
assert tuple(AGGREGATE_TYPES.values()) == AGGREGATE_TYPE_NAMES, "one name per aggregate class, in both lists"

"""The API's request and response shapes (msgspec Structs, one per operation). Money is an
integer of minor units plus an ISO 4217 code. Unknown fields are rejected; strings are bounded.
A customer's phone must also be a number its country's numbering plan can have (``phone_refusal``)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import phonenumbers
from msgspec import Meta, Struct, field

Text = Annotated[str, Meta(min_length=1, max_length=200)]
ShortText = Annotated[str, Meta(min_length=1, max_length=64)]
Currency = Annotated[str, Meta(min_length=1, max_length=3, description="ISO 4217 code, e.g. USD")]
# Amount rules (positive, at most one million major units) are the domain's, so a refusal carries
# its stable code (invalid_amount, amount_too_large) rather than a generic validation error.
Amount = Annotated[int, Meta(description="integer minor units, e.g. 1250 = 12.50 USD")]
Url = Annotated[str, Meta(min_length=1, max_length=2048, pattern="^https?://")]
Phone = Annotated[str, Meta(min_length=1, max_length=32, description="E.164, e.g. +14155550123")]


def phone_refusal(phone: str) -> str | None:
    """Why a text message could never reach this number, or None when it could: the wrong length
    for its country, or digits its numbering plan does not use (e.g. +1 555 000 0000). Checked
    before a session opens, so no SMS is paid for a number that cannot exist. The domain's own
    check of the E.164 form still follows; the words here never repeat the number."""
    try:
        number = phonenumbers.parse(phone, None)  # no default region: it must start with +country
    except phonenumbers.NumberParseException:
        return "must be a phone number in E.164 form: '+', the country code, then the number"
    if not phonenumbers.is_possible_number(number):
        return "has the wrong number of digits for its country"
    if not phonenumbers.is_valid_number(number):
        return "is not a number that exists in its country's numbering plan"
    return None


class Strict(Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class LineItem(Strict):
    sku: ShortText
    name: Text
    quantity: Annotated[int, Meta(ge=1, le=10_000)]
    unit_amount: Amount


class Order(Strict):
    reference: Annotated[str, Meta(min_length=1, max_length=100)]
    items: Annotated[list[LineItem], Meta(min_length=1, max_length=100)]


class Voice(Strict):
    platform: Annotated[str, Meta(min_length=1, max_length=50)]
    conversation_id: Text


class SplitIn(Strict):
    """A share of the payment for the platform (a commission) or a partner merchant (paid out to
    it), as ``amount`` (minor units) or ``percent_bps`` of the captured amount; shares come out
    of the merchant's part, and refunds out of the merchant's alone."""

    party: Annotated[str, Meta(min_length=1, max_length=36, description="'platform' or a partner merchant's id")]
    amount: Amount | None = None
    percent_bps: Annotated[int, Meta(ge=1, le=10_000)] | None = None


class PaymentSessionCreate(Strict):
    amount: Amount
    currency: Currency
    customer_phone: Phone
    order: Order
    voice: Voice
    callback_url: Url | None = None
    metadata: Annotated[dict[Annotated[str, Meta(min_length=1, max_length=40)],
                             Annotated[str, Meta(max_length=500)]], Meta(max_length=20)] | None = None
    splits: Annotated[list[SplitIn], Meta(max_length=10)] | None = None


class PaymentSessionCancel(Strict):
    reason: Annotated[str, Meta(min_length=1, max_length=200)] = "cancelled_by_merchant"


class PaymentCapture(Strict):
    amount: Amount | None = None


class PaymentVoid(Strict):
    reason: Annotated[str, Meta(min_length=1, max_length=200)] = "requested_by_merchant"


class RefundCreate(Strict):
    amount: Amount
    reason: Annotated[str, Meta(max_length=200)] = ""


class FeeSchedule(Strict):
    percent_bps: Annotated[int, Meta(ge=0, le=10_000, description="basis points: 290 = 2.9%")]
    fixed: Annotated[int, Meta(ge=0, le=1_000_000, description="minor units of the payment's currency")]


class MerchantCreate(Strict):
    name: Text
    fee_schedule: FeeSchedule | None = None
    webhook_url: Url | None = None
    commerce_backend_uri: Url | None = None
    max_amount: Annotated[dict[Currency, Amount], Meta(max_length=50)] | None = None


class Reserve(Strict):
    """A rolling reserve: this share of each payout's new money is held back for ``days`` days.
    Both zero: no reserve."""

    percent_bps: Annotated[int, Meta(ge=0, le=10_000, description="basis points, 1000 = 10%")]
    days: Annotated[int, Meta(ge=0, le=365)]


class MerchantUpdate(Strict):
    name: Text | None = None
    fee_schedule: FeeSchedule | None = None
    webhook_url: Url | None = None
    commerce_backend_uri: Url | None = None
    max_amount: Annotated[dict[Currency, Amount], Meta(max_length=50)] | None = None
    payout_schedule: Literal["daily", "weekly", "manual"] | None = None
    reserve: Reserve | None = None
    settlement_currency: Annotated[str, Meta(max_length=3, description=(
        "the currency to be paid out in, converted at settlement; empty: each payment's own"))] | None = None


class KeyCreate(Strict):
    role: Literal["merchant", "analyst", "compliance", "admin"] = "merchant"
    label: Annotated[str, Meta(max_length=100)] = ""


# -- responses ---------------------------------------------------------------------------------


class Links(Struct):
    self: str


class PaymentSession(Struct):
    id: str
    merchant_id: str
    status: str
    amount: int
    currency: str
    customer_phone: str
    order_reference: str
    voice: dict[str, str]
    # Whether the customer will be asked for an identity check: above the currency's threshold
    # and no check passed on an earlier purchase within the last year.
    identity_required: bool
    payment_id: str | None
    end_reason: str | None
    expires_at: datetime
    created_at: datetime | None
    updated_at: datetime | None
    position: int | None
    links: Links
    projection_caught_up: bool = True


class TimelineEntry(Struct):
    event_type: str
    version: int
    occurred_at: datetime
    data: dict[str, Any]


class Payment(Struct):
    id: str
    merchant_id: str
    session_id: str | None
    status: str
    amount: int
    currency: str
    card_brand: str
    card_last4: str
    authorized_amount: int
    captured_amount: int
    refunded_amount: int
    fee: int
    failure_code: str | None
    created_at: datetime | None
    updated_at: datetime | None
    position: int | None
    links: Links
    timeline: list[TimelineEntry] | None = None
    refund_id: str | None = None
    # The risk rules' verdict before authorization (approve, review, decline) and score 0-100;
    # "review" was authorized but is flagged for a person to look at.
    risk_decision: str | None = None
    risk_score: int | None = None
    # The processor the payment was sent to (after any failover); None before it was sent.
    processor: str | None = None


class PaymentList(Struct):
    data: list[Payment]
    has_more: bool
    next_starting_after: str | None


class Balance(Struct):
    account: str
    currency: str
    balance: int


class BalanceSplit(Struct):
    """A merchant's money with us in one currency, each bucket what we owe it (Stripe's split):
    pending (captured, not yet settled by the processor), available (settled, not yet paid
    out), reserved (held back by a rolling reserve), in_transit (in a payout the bank has not
    confirmed)."""

    merchant_id: str
    currency: str
    pending: int
    available: int
    reserved: int
    in_transit: int


class BalanceList(Struct):
    data: list[Balance]
    merchants: list[BalanceSplit]


class BalancePoint(Struct):
    """An account's balance at the end of one hour or day (``as_of``: the bucket's end, the last
    one's is the request's ``to``), as ``GET /v1/balances?as_of=`` would give it then."""

    period_start: datetime
    as_of: datetime
    balance: int


class BalanceSeries(Struct):
    currency: str
    points: list[BalancePoint]


class BalanceHistory(Struct, kw_only=True):
    account: str
    granularity: str
    date_from: datetime = field(name="from")
    date_to: datetime = field(name="to")
    series: list[BalanceSeries]


class Merchant(Struct):
    id: str
    name: str
    fee_schedule: FeeSchedule
    webhook_url: str | None
    commerce_backend_uri: str | None
    max_amount: dict[str, int]
    active: bool
    payout_schedule: str
    reserve: Reserve
    settlement_currency: str | None


class DisputeEvidence(Strict):
    """Text evidence, in the shape of the card networks' evidence objects. ``submit: false``
    stages it (later calls add to it); ``true`` sends everything staged to the processor."""

    product_description: Annotated[str, Meta(max_length=20_000)] | None = None
    customer_communication: Annotated[str, Meta(max_length=20_000)] | None = None
    service_date: Annotated[str, Meta(max_length=100)] | None = None
    shipping_carrier: Annotated[str, Meta(max_length=200)] | None = None
    shipping_tracking_number: Annotated[str, Meta(max_length=200)] | None = None
    shipping_date: Annotated[str, Meta(max_length=100)] | None = None
    refund_policy: Annotated[str, Meta(max_length=20_000)] | None = None
    uncategorized_text: Annotated[str, Meta(max_length=20_000)] | None = None
    submit: bool = False


class Dispute(Struct):
    id: str
    merchant_id: str
    payment_id: str
    processor: str
    status: Annotated[str, Meta(description="needs_response, under_review, won, lost, accepted, expired")]
    reason: str
    amount: int
    currency: str
    fee: int
    due_by: datetime
    evidence_submitted_at: datetime | None
    opened_at: datetime
    closed_at: datetime | None
    updated_at: datetime
    evidence: dict[str, str] | None = None


class DisputeList(Struct):
    data: list[Dispute]
    has_more: bool
    next_starting_after: str | None


class PayoutCreate(Strict):
    currency: Currency


class PayoutLine(Struct):
    """What a payout paid of one payment: ``net = gross - fee - shares - refunds`` (``shares``:
    what its splits gave other parties). A partner's line is its share, as ``gross``."""

    payment_id: str
    gross: int
    fee: int
    shares: int
    refunds: int
    disputes: int
    net: int


class Payout(Struct):
    id: str
    merchant_id: str
    currency: str
    cutoff: str
    status: Annotated[str, Meta(description="created (with the bank), paid, failed, carried_forward")]
    amount: int
    carried_in: int
    reserve_held: int
    reserve_released: int
    line_count: int
    bank_reference: str | None
    failure_reason: str | None
    created_at: datetime
    updated_at: datetime
    lines: list[PayoutLine] | None = None


class PayoutList(Struct):
    data: list[Payout]
    has_more: bool
    next_starting_after: str | None


class KeyIssued(Struct):
    key_id: str
    role: str
    merchant_id: str | None
    api_key: str  # shown once; only a keyed hash is kept



class ProblemField(Struct):
    field: str
    message: str


class Problem(Struct):
    """RFC 9457 problem details, as every error is sent (``application/problem+json``)."""

    type: str
    title: str
    status: int
    code: str
    detail: str
    instance: str | None = None
    request_id: str | None = None
    errors: list[ProblemField] | None = None
    details: dict[str, Any] | None = None


class CustomerErasureCreate(Strict):
    """Erase what is held about a customer (admin): their data key is destroyed."""

    customer_phone: Phone
    reason: Annotated[str, Meta(min_length=1, max_length=500)]


class CustomerErasure(Struct, kw_only=True):
    """What an erasure did; never the phone."""

    erased: bool
    customer_ids: list[str]
    erased_at: datetime
    keys_destroyed: int
    sessions: int


class CustomerExportCreate(Strict):
    """A subject access request: everything held about this phone (admin)."""

    customer_phone: Phone

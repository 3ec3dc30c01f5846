"""A dispute's evidence pack: a payment's whole journey from the audit trail, each line with the
event id, position and hash a reviewer checks with ``echotransact audit verify``, and the same
customer's earlier undisputed payments with this merchant.

It reads only the read side, masked as ``application/masking.py`` masks it: phone numbers as
``+1******0123``, a card as brand and last four, never a card number (free text is scrubbed of
any that were typed into it). Facts the read side does not hold are said to be missing in the
pack (``NOT_RECORDED``, ``NOT_ON_READ_SIDE``, and the list ``MISSING``), never guessed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import psycopg

from application.masking import PersonalDataReader
from domain.money import Money
from domain.values import ERASED

VERIFY_COMMAND = "echotransact audit verify"
NOT_RECORDED = "not recorded"
# On the event, but masked on the read side on purpose (application/masking.py SECRET_FIELDS).
NOT_ON_READ_SIDE = "not on the read side"
PRIOR_WINDOW = timedelta(days=365)
MAX_PRIOR_PAYMENTS = 20
# What a prior payment is compared on. The card's fingerprint (per merchant: payment_status.
# card_fingerprint_hash) identifies the card; the read side's masked values alone are shared by
# many customers of a large merchant (a phone masked to its country digit, length and last four;
# a card's brand and last four), so without the fingerprint a payment is listed only when it
# shares both.
MATCHED_ON = (
    "the same card (its fingerprint, per merchant), or the page opened from the same IP address, or both the"
    " masked phone (country digit, length and last four) and the card's brand and last four; captured,"
    " undisputed payments of the same merchant in the 365 days before this one"
)
# Event fields that are free text (anyone's words): scrubbed of phone and card numbers.
FREE_TEXT = frozenset({"reason", "message"})
# What each event seals under the customer's key (``personal``, application/privacy.py): opened
# into the line's fields for the pack, ``erased`` once the key is destroyed, ``withheld`` where the
# pack was built without the keys (no reader given).
SEALED_FIELDS: Mapping[str, tuple[str, ...]] = {
    "payment_session.link_opened": ("ip", "user_agent"),
    "payment_session.cancelled": ("reason",),
    "payment.voided": ("reason",),
    "payment.refunded": ("reason",),
}
WITHHELD = "withheld"

# What the read side lacks for a complete pack, and where it would have to come from.
MISSING = (
    {"fact": "SMS: provider message id for sessions before payment_session.sms_sent existed",
     "reason": "older sessions' sends are kept only by the SMS dispatcher (outbox_messages, deleted after 30 days)"},
    {"fact": "commerce order delivered, for sessions before payment_session.order_delivered existed",
     "reason": "older deliveries are kept only in the webhook delivery log (deleted after 30 days)"},
    {"fact": "authorization code",
     "reason": "the processor's answer carries only its reference, recorded as processor_reference"},
    {"fact": "device",
     "reason": "no event records the customer's device"},
)

# A run of digits, through spaces, dots, dashes and brackets between them.
_NUMBER = re.compile(r"\+?\d(?:[ .\-()]{0,2}\d)*")

Row = dict[str, Any]
Details = dict[str, Any]


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        n = int(ch) * (2 if i % 2 else 1)
        total += n - 9 if n > 9 else n
    return total % 10 == 0


def scrub(text: str, phone_last4: str | None = None) -> str:
    """Free text (an item's name, an order reference) with any phone or card number typed into
    it masked to its last four digits: a number in international form (+ and 8 digits or more),
    a card number (13 to 19 digits that pass the Luhn check), or one of 7 digits or more that
    ends with the customer's phone's last four. Other numbers (order numbers) stay as written."""
    def mask(found: re.Match[str]) -> str:
        written = found.group()
        digits = re.sub(r"\D", "", written)
        if ((written.startswith("+") and len(digits) >= 8) or (13 <= len(digits) <= 19 and _luhn(digits))
                or (phone_last4 and len(digits) >= 7 and digits.endswith(phone_last4))):
            return "*" * (len(digits) - 4) + digits[-4:]
        return written
    return _NUMBER.sub(mask, text)


def phone_ending(masked: str | None) -> str:
    return masked[-4:] if masked else "????"


def _iso(at: datetime | None) -> str | None:
    return at.astimezone(UTC).isoformat() if at is not None else None


def _money(amount_minor: Any, currency: str) -> str:
    return Money(int(amount_minor), currency).format()


def _card(brand: str, last4: str) -> str:
    return f"{brand} ending {last4}"


# -- the lines of the timeline ----------------------------------------------------------------------


class _Journey:
    """What a line's words need of the lines before it (its currency, the wrong codes so far)."""

    def __init__(self, currency: str, phone_masked: str | None) -> None:
        self.currency = currency
        self.phone_masked = phone_masked
        self.phone_last4 = phone_masked[-4:] if phone_masked else None
        self.wrong_codes = 0

    def scrub(self, value: Any) -> str:
        return scrub(str(value if value is not None else ""), self.phone_last4)


def _opened(d: Mapping[str, Any], j: _Journey) -> tuple[str, Details]:
    items = [{"sku": j.scrub(i.get("sku")), "name": j.scrub(i.get("name")), "quantity": i.get("quantity"),
              "unit_amount_minor": i.get("unit_amount_minor")} for i in d.get("line_items", [])]
    reference, platform, conversation = (j.scrub(d.get(k)) for k in ("order_reference", "voice_platform",
                                                                      "conversation_id"))
    what = (f"Order {reference} taken on {platform} (conversation {conversation}):"
            f" {len(items)} item(s), {_money(d['amount_minor'], d['currency'])}")
    return what, {
        "order_reference": reference, "items": items, "amount_minor": d["amount_minor"], "currency": d["currency"],
        "voice_platform": platform, "conversation_id": conversation,
        # Masked in the audit trail already; the session's row says the same.
        "customer_phone": j.phone_masked, "identity_required": d.get("identity_required"),
    }


def _link_sent(d: Mapping[str, Any], j: _Journey) -> tuple[str, Details]:
    return (f"SMS with the payment link and code sent to the phone ending {phone_ending(j.phone_masked)}",
            {"to": j.phone_masked, "provider_message_id": NOT_RECORDED})


def _sms_sent(d: Mapping[str, Any], j: _Journey) -> tuple[str, Details]:
    return (f"SMS accepted by the provider for the phone ending {phone_ending(j.phone_masked)}",
            {"provider_message_id": d.get("provider_reference") or NOT_RECORDED, "message_id": d.get("message_id")})


def _link_opened(d: Mapping[str, Any], j: _Journey) -> tuple[str, Details]:
    return "Payment link opened", {"ip": d.get("ip") or NOT_RECORDED,
                                   "user_agent": d.get("user_agent") or NOT_RECORDED}


def opened_personal(cur: psycopg.Cursor[Row], rows: list[Row], personal: PersonalDataReader | None) -> list[Row]:
    """Audit rows with what their events sealed under the customer's key opened into their data
    (``SEALED_FIELDS``: the page's IP address and user agent, the words of a cancellation, void or
    refund); ``erased`` once the key is destroyed, ``withheld`` without a reader. Events from
    before sealing carry the fields in plain text, or ``{"plain": {...}}``."""
    sealed = [r for r in rows if r["event_type"] in SEALED_FIELDS and isinstance(r["data"].get("personal"), Mapping)]
    if not sealed:
        return rows
    values: list[Mapping[str, Any] | None]
    if personal is None:
        values = [r["data"]["personal"].get("plain") for r in sealed]
    else:
        values = list(personal.open_many(cur, [r["data"]["personal"] for r in sealed]))
    opened = dict(zip((id(r) for r in sealed), values, strict=True))
    out = []
    for r in rows:
        if id(r) in opened:
            seen = opened[id(r)]
            instead = ERASED if personal is not None else WITHHELD
            fields = {f: (seen.get(f) if isinstance(seen, Mapping) else instead)
                      for f in SEALED_FIELDS[r["event_type"]]}
            r = {**r, "data": {**r["data"], **fields}}
        out.append(r)
    return out


def _code_rejected(d: Mapping[str, Any], j: _Journey) -> tuple[str, Details]:
    j.wrong_codes = int(d.get("attempts", j.wrong_codes + 1))
    return f"Wrong code entered (attempt {j.wrong_codes})", {"attempts": j.wrong_codes}


def _code_verified(d: Mapping[str, Any], j: _Journey) -> tuple[str, Details]:
    attempts = j.wrong_codes + 1
    return f"Code verified (attempt {attempts})", {"attempts": attempts}


def _payment_method_attached(d: Mapping[str, Any], j: _Journey) -> tuple[str, Details]:
    return (f"Card attached: {_card(d['card_brand'], d['card_last4'])}",
            {"payment_id": d.get("payment_id"), "card_brand": d["card_brand"], "card_last4": d["card_last4"]})


def _initiated(d: Mapping[str, Any], j: _Journey) -> tuple[str, Details]:
    return (f"Payment of {_money(d['amount_minor'], d['currency'])} started with the card"
            f" {_card(d['card_brand'], d['card_last4'])}",
            {"amount_minor": d["amount_minor"], "currency": d["currency"], "card_brand": d["card_brand"],
             "card_last4": d["card_last4"], "card_fingerprint": NOT_ON_READ_SIDE})


def _risk_assessed(d: Mapping[str, Any], j: _Journey) -> tuple[str, Details]:
    reasons = ", ".join(d.get("reasons") or []) or "none"
    return (f"Risk verdict: {d.get('decision')} (score {d.get('score')}; reasons: {reasons})",
            {k: d.get(k) for k in ("decision", "score", "reasons", "recent_by_phone", "recent_by_card",
                                   "prior_declines")})


def _authorized(d: Mapping[str, Any], j: _Journey) -> tuple[str, Details]:
    return (f"Authorized {_money(d['amount_minor'], j.currency)} by {d.get('processor')}"
            f" (reference {d.get('processor_reference')})",
            {"processor": d.get("processor"), "processor_reference": d.get("processor_reference"),
             "authorization_code": NOT_RECORDED, "amount_minor": d["amount_minor"],
             "expires_at": d.get("expires_at")})


def _captured(d: Mapping[str, Any], j: _Journey) -> tuple[str, Details]:
    return (f"Captured {_money(d['amount_minor'], j.currency)} (reference {d.get('processor_reference')})",
            {"amount_minor": d["amount_minor"], "fee_minor": d.get("fee_minor"),
             "processor_reference": d.get("processor_reference")})


def _refunded(d: Mapping[str, Any], j: _Journey) -> tuple[str, Details]:
    reason = j.scrub(d.get("reason"))
    return (f"Refunded {_money(d['amount_minor'], j.currency)} ({reason})",
            {"refund_id": d.get("refund_id"), "amount_minor": d["amount_minor"], "reason": reason,
             "processor_reference": d.get("processor_reference"),
             "refunded_total_minor": d.get("refunded_total_minor")})


def _fields(what: str, *names: str) -> Callable[[Mapping[str, Any], _Journey], tuple[str, Details]]:
    """A line whose words are fixed and whose details are these fields of the event (free text scrubbed)."""
    def line(d: Mapping[str, Any], j: _Journey) -> tuple[str, Details]:
        details = {n: j.scrub(d.get(n)) if n in FREE_TEXT else d.get(n) for n in names}
        shown = "; ".join(f"{n.replace('_', ' ')} {v}" for n, v in details.items() if v not in (None, ""))
        return (f"{what} ({shown})" if shown else what), details
    return line


LINES: dict[str, Callable[[Mapping[str, Any], _Journey], tuple[str, Details]]] = {
    "payment_session.opened": _opened,
    "payment_session.link_sent": _link_sent,
    "payment_session.link_opened": _link_opened,
    "payment_session.sms_failed": _fields("SMS not delivered", "reason"),
    "payment_session.sms_sent": _sms_sent,
    "payment_session.order_delivered": _fields("Order delivered to the merchant's commerce backend", "status_code"),
    "payment_session.code_resent": _fields("Code sent again", "resends"),
    "payment_session.code_rejected": _code_rejected,
    "payment_session.locked": _fields("Session locked after wrong codes", "attempts"),
    "payment_session.code_verified": _code_verified,
    "payment_session.identity_verified": _fields("Identity check passed", "verifier"),
    "payment_session.identity_recognized": _fields(
        "Identity recognised from an earlier passed check", "customer_id", "verified_at"),
    "payment_session.identity_rejected": _fields("Identity check failed", "verifier", "attempts", "reason"),
    "payment_session.payment_method_attached": _payment_method_attached,
    "payment_session.payment_declined": _fields("Card declined", "payment_id", "reason_code", "declines"),
    "payment_session.completed": _fields("Payment session completed", "payment_id"),
    "payment_session.expired": _fields("Payment link expired"),
    "payment_session.cancelled": _fields("Payment session cancelled", "reason"),
    "payment_session.failed": _fields("Payment session failed", "reason"),
    "payment.initiated": _initiated,
    "payment.risk_assessed": _risk_assessed,
    "payment.processing_started": _fields("Sent for authorization", "processor"),
    "payment.processing_rerouted": _fields("Authorization rerouted", "processor", "previous"),
    "payment.authorized": _authorized,
    "payment.failed": _fields("Payment failed", "reason_code", "message"),
    "payment.captured": _captured,
    "payment.voided": _fields("Authorization voided", "reason"),
    "payment.authorization_expired": _fields("Authorization expired"),
    "payment.refunded": _refunded,
    "payment.settled": _fields("Settled by the processor", "settlement_reference", "amount_minor"),
    "payment.refund_settled": _fields("Refund settled by the processor", "settlement_reference", "amount_minor"),
    "payment.dispute_opened": _fields("Dispute opened", "dispute_id", "amount_minor"),
    "payment.dispute_closed": _fields("Dispute closed", "dispute_id", "outcome"),
    "payment.included_in_payout": _fields("Included in a payout", "payout_id"),
}


def _line(row: Row, journey: _Journey) -> Row:
    words = LINES.get(row["event_type"])
    details: Details
    if words is None:  # an event type added after this pack: named, with no fields (they may be personal)
        what, details = row["event_type"], {}
    else:
        what, details = words(row["data"] or {}, journey)
    return {
        "at": _iso(row["occurred_at"]), "what": what, "details": details, "event_type": row["event_type"],
        "event_id": str(row["event_id"]), "position": row["position"], "hash": row["hash"],
        "prev_hash": row["prev_hash"],
    }


# -- the pack ------------------------------------------------------------------------------------------


def build_pack(
    cur: psycopg.Cursor[Row], payment_id: UUID, *, disputed: AbstractSet[UUID] = frozenset(), now: datetime,
    merchant_id: UUID | None = None, personal: PersonalDataReader | None = None,
) -> dict[str, Any] | None:
    """The evidence pack of ``payment_id``, or None when the cursor's scope does not see it.

    ``cur``: a cursor with dict rows in a transaction scoped by row-level security (a merchant's
    scope or admin's: compliance does not see payment_status). ``merchant_id``: the scope's
    merchant, to filter by in SQL as well. ``disputed``: payments with a dispute, never listed
    as prior payments (nor is one whose audit trail records a dispute). ``personal``: opens what
    events sealed under the customers' keys (api/bootstrap.py gives the process's)."""
    cur.execute(
        "SELECT p.payment_id, p.merchant_id, p.session_id, p.status, p.amount_minor, p.currency, p.card_brand,"
        " p.card_last4, p.card_fingerprint_hash, p.processor, p.authorized_minor, p.captured_minor,"
        " p.refunded_minor, p.created_at, s.customer_phone_masked, s.order_reference, s.voice_platform,"
        " s.conversation_id"
        " FROM payment_status p LEFT JOIN session_status s ON s.session_id = p.session_id"
        " WHERE p.payment_id = %s AND (%s::uuid IS NULL OR p.merchant_id = %s::uuid)",
        (payment_id, merchant_id, merchant_id),
    )
    payment = cur.fetchone()
    if payment is None:
        return None
    merchant = payment["merchant_id"]
    aggregates = [payment_id] + ([payment["session_id"]] if payment["session_id"] else [])
    cur.execute(
        "SELECT position, event_id, event_type, occurred_at, data, prev_hash, hash FROM audit_log"
        " WHERE aggregate_id = ANY(%s) AND merchant_id = %s ORDER BY position",
        (aggregates, merchant),
    )
    journey = _Journey(payment["currency"], payment["customer_phone_masked"])
    timeline = [_line(row, journey) for row in opened_personal(cur, cur.fetchall(), personal)]
    return {
        "payment": {
            "payment_id": str(payment_id),
            "session_id": str(payment["session_id"]) if payment["session_id"] else None,
            "status": payment["status"],
            "amount_minor": payment["amount_minor"],
            "currency": payment["currency"],
            "authorized_minor": payment["authorized_minor"],
            "captured_minor": payment["captured_minor"],
            "refunded_minor": payment["refunded_minor"],
            "processor": payment["processor"],
            "created_at": _iso(payment["created_at"]),
            "card": {"brand": payment["card_brand"], "last4": payment["card_last4"],
                     "fingerprint": payment["card_fingerprint_hash"] or NOT_RECORDED},
            "customer_phone": payment["customer_phone_masked"],
            "order_reference": journey.scrub(payment["order_reference"]),
            "voice_platform": journey.scrub(payment["voice_platform"]),
            "conversation_id": journey.scrub(payment["conversation_id"]),
        },
        "merchant_id": str(merchant),
        "generated_at": _iso(now),
        "timeline": timeline,
        "prior_payments": _prior_payments(cur, payment, disputed, personal),
        "prior_payments_matched_on": MATCHED_ON,
        "not_recorded": [dict(m) for m in MISSING],
        "verify": VERIFY_COMMAND,
    }


MAX_IP_CANDIDATES = 2_000


def _opened_ips(cur: psycopg.Cursor[Row], merchant_id: UUID, personal: PersonalDataReader | None, *,
                session_id: UUID | None = None, since: datetime | None = None,
                until: datetime | None = None) -> dict[UUID, str]:
    """Session -> the IP address its payment page was opened from (the last opening), for one
    session or for the merchant's openings in a window (the newest MAX_IP_CANDIDATES); sealed
    ones opened with the customers' keys, erased ones left out."""
    cur.execute(
        "SELECT aggregate_id, data FROM audit_log WHERE merchant_id = %(merchant)s"
        " AND event_type = 'payment_session.link_opened'"
        " AND (%(session)s::uuid IS NULL OR aggregate_id = %(session)s)"
        " AND (%(since)s::timestamptz IS NULL OR occurred_at >= %(since)s)"
        " AND (%(until)s::timestamptz IS NULL OR occurred_at < %(until)s)"
        " ORDER BY position DESC LIMIT %(limit)s",
        {"merchant": merchant_id, "session": session_id, "since": since, "until": until, "limit": MAX_IP_CANDIDATES})
    rows = cur.fetchall()
    sealed = [r for r in rows if isinstance(r["data"].get("personal"), Mapping)]
    opened = personal.open_many(cur, [r["data"]["personal"] for r in sealed]) if sealed and personal else []
    ips: dict[UUID, str] = {}
    for row, values in [*zip(sealed, opened, strict=False),
                        *((r, r["data"]) for r in rows if not isinstance(r["data"].get("personal"), Mapping))]:
        ip = (values or {}).get("ip")
        if ip and ip != ERASED:
            ips.setdefault(row["aggregate_id"], ip)  # newest first: the last opening wins
    return ips


def _prior_payments(cur: psycopg.Cursor[Row], payment: Row, disputed: AbstractSet[UUID],
                    personal: PersonalDataReader | None) -> list[Row]:
    """Captured payments of the same merchant in the year before this one, sharing the masked
    phone and the card's brand and last four, with no dispute (passed, or in the audit trail)."""
    created = payment["created_at"]
    own_ips = set(_opened_ips(cur, payment["merchant_id"], personal, session_id=payment["session_id"]).values())
    # The IP address is sealed under each customer's key: opened here, for the merchant's most
    # recent MAX_IP_CANDIDATES page openings of the window (erased customers' no longer open).
    ip_sessions = [] if not own_ips else [
        session for session, ip in _opened_ips(cur, payment["merchant_id"], personal, since=created - PRIOR_WINDOW,
                                               until=created).items() if ip in own_ips]
    same_ip = "p.session_id = ANY(%(ip_sessions)s::uuid[])"
    cur.execute(
        "SELECT p.payment_id, p.created_at, p.amount_minor, p.currency, p.status, p.card_brand, p.card_last4,"
        f" p.card_fingerprint_hash, s.customer_phone_masked, {same_ip} AS same_ip"
        " FROM payment_status p JOIN session_status s ON s.session_id = p.session_id"
        " WHERE p.merchant_id = %(merchant)s AND p.payment_id <> %(payment)s"
        " AND p.created_at >= %(since)s AND p.created_at < %(until)s AND p.captured_minor > 0"
        " AND s.merchant_id = %(merchant)s AND (p.card_fingerprint_hash = %(card)s"
        "   OR (s.customer_phone_masked = %(phone)s AND p.card_brand = %(brand)s AND p.card_last4 = %(last4)s)"
        f"   OR {same_ip})"
        " AND NOT (p.payment_id = ANY(%(disputed)s::uuid[]))"
        " AND NOT EXISTS (SELECT 1 FROM audit_log a WHERE a.aggregate_id = p.payment_id"
        "   AND a.merchant_id = %(merchant)s AND a.event_type = 'payment.dispute_opened')"
        " ORDER BY p.created_at DESC, p.payment_id LIMIT %(limit)s",
        {"merchant": payment["merchant_id"], "payment": payment["payment_id"], "since": created - PRIOR_WINDOW,
         "until": created, "phone": payment["customer_phone_masked"], "brand": payment["card_brand"],
         "last4": payment["card_last4"], "card": payment["card_fingerprint_hash"], "ip_sessions": ip_sessions,
         "disputed": list(disputed),
         "limit": MAX_PRIOR_PAYMENTS},
    )
    out = []
    for row in cur.fetchall():
        shared = []
        if payment["card_fingerprint_hash"] and row["card_fingerprint_hash"] == payment["card_fingerprint_hash"]:
            shared.append("card_fingerprint")
        if row["same_ip"]:
            shared.append("ip")
        if row["customer_phone_masked"] == payment["customer_phone_masked"]:
            shared.append("phone_masked")
        if (row["card_brand"], row["card_last4"]) == (payment["card_brand"], payment["card_last4"]):
            shared.append("card_brand_last4")
        out.append({
            "payment_id": str(row["payment_id"]), "at": _iso(row["created_at"]),
            "amount_minor": row["amount_minor"], "currency": row["currency"], "status": row["status"],
            "shared": shared, "phone": row["customer_phone_masked"],
            "card": _card(row["card_brand"], row["card_last4"]),
        })
    return out

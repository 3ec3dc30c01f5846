"""Rendering for the console: the templates (api/http/templates/console/), strict security
headers, who may see which page, and the words for money, times and a payment's events."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from litestar import MediaType, Response

from domain.money import Money

CONSOLE_PREFIX = "/console"
# No inline script or style anywhere: the one script and the stylesheet are our own files.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "base-uri 'none'; frame-ancestors 'none'; connect-src 'self'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}
_HTTP = Path(__file__).parent.parent
_templates = Environment(
    loader=FileSystemLoader(_HTTP / "templates"), autoescape=True, undefined=StrictUndefined,
    trim_blocks=True, lstrip_blocks=True,
)
STATIC_DIR = _HTTP / "static" / "console"


@dataclass(frozen=True)
class NavItem:
    href: str
    label: str
    roles: tuple[str, ...]


# Each page and the roles that may open it: the API's own (api/http/controllers/*.py).
NAV = (
    NavItem("/console/payments", "Payments", ("merchant", "admin")),
    NavItem("/console/balances", "Balances", ("merchant", "admin")),
    NavItem("/console/payouts", "Payouts", ("merchant", "admin", "compliance")),
    NavItem("/console/disputes", "Disputes", ("merchant", "admin", "compliance")),
    NavItem("/console/webhooks", "Webhooks", ("merchant", "admin")),
    NavItem("/console/analytics", "Funnel & volumes", ("analyst", "admin")),
    NavItem("/console/audit", "Audit", ("compliance",)),
    NavItem("/console/health", "System health", ("admin",)),
    NavItem("/console/keys", "Merchants & keys", ("admin",)),
)
ROLE_NAMES = {"merchant": "Merchant", "analyst": "Analyst", "compliance": "Compliance", "admin": "Operator"}


HOME = {"merchant": "/console/payments", "analyst": "/console/analytics", "compliance": "/console/audit",
        "admin": "/console/health"}


def home_for(role: str) -> str:
    return HOME[role]


def may_open(role: str, href: str) -> bool:
    return any(role in item.roles for item in NAV if item.href == href)


@dataclass
class Page:
    """What every console page shows around its content."""

    role: str | None = None
    label: str = ""
    merchant_id: str | None = None
    csrf: str = ""
    current: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def context(self) -> dict[str, Any]:
        nav = [item for item in NAV if self.role in item.roles] if self.role else []
        return {"role": self.role, "role_name": ROLE_NAMES.get(self.role or "", ""), "label": self.label,
                "merchant_id": self.merchant_id, "csrf": self.csrf, "nav": nav, "current": self.current,
                "new_form_id": lambda: secrets.token_urlsafe(18)}


def html(page: Page, template: str, status: int = 200, **context: Any) -> Response[str]:
    body = _templates.get_template(f"console/{template}").render(**page.context(), **context)
    return Response(body, status_code=status, media_type=MediaType.HTML, headers=SECURITY_HEADERS)


def message(page: Page, status: int, title: str, text: str, *, link: str | None = None,
            link_label: str = "Back") -> Response[str]:
    return html(page, "message.html", status, title=title, text=text, link=link, link_label=link_label)


# -- words ----------------------------------------------------------------------------------------


def money(amount_minor: int | None, currency: str) -> str:
    if amount_minor is None:
        return "-"
    try:
        return Money(int(amount_minor), currency).format()
    except Exception:  # a currency this build does not know: the plain minor units
        return f"{amount_minor} {currency} (minor units)"


def when(value: Any) -> str:
    if value is None or value == "":
        return "-"
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    if isinstance(moment, datetime):
        if moment.tzinfo is not None:
            moment = moment.astimezone(UTC)
        return moment.strftime("%Y-%m-%d %H:%M:%S UTC")
    return str(moment)


def describe_event(event_type: str, data: dict[str, Any], currency: str) -> str:
    """One event of a payment's timeline, in plain words."""
    def m(key: str) -> str:
        return money(data.get(key), currency)

    words = {
        "payment.initiated": lambda: f"Payment of {m('amount_minor')} started with"
                                     f" {(data.get('card_brand') or 'a card').capitalize()}"
                                     f" ending in {data.get('card_last4') or '????'}.",
        "payment.risk_assessed": lambda: f"Risk check: {data.get('decision')} (score {data.get('score')})"
                                         + (f"; reasons: {', '.join(map(str, data.get('reasons') or []))}."
                                            if data.get("reasons") else "."),
        "payment.processing_started": lambda: f"Sent to processor {data.get('processor')} for authorization.",
        "payment.processing_rerouted": lambda: f"Processor {data.get('previous')} was unreachable; sent to"
                                               f" {data.get('processor')} instead.",
        "payment.authorized": lambda: f"Authorized for {m('amount_minor')} by {data.get('processor')}.",
        "payment.failed": lambda: f"Failed: {data.get('reason_code')}"
                                  + (f" ({data.get('message')})." if data.get("message") else "."),
        "payment.captured": lambda: f"Captured {m('amount_minor')}; our fee {m('fee_minor')}.",
        "payment.voided": lambda: "Authorization released (voided)"
                                  + (f": {data.get('reason')}." if data.get("reason") else "."),
        "payment.authorization_expired": lambda: "The authorization expired before it was captured.",
        "payment.refunded": lambda: f"Refunded {m('amount_minor')}"
                                    + (f" ({data.get('reason')})" if data.get("reason") else "")
                                    + f"; refunded in total {m('refunded_total_minor')}.",
        "payment.settled": lambda: f"Settled by the processor: {m('amount_minor')}, processor fee"
                                   f" {m('processor_fee_minor')}.",
        "payment.refund_settled": lambda: f"The processor settled a refund of {m('amount_minor')}.",
        "payment.fraud_warned": lambda: "The card issuer reported this payment as fraud (early warning).",
        "payment.dispute_opened": lambda: f"The cardholder disputed {m('amount_minor')}; the amount is held.",
        "payment.dispute_closed": lambda: f"Dispute closed: {data.get('outcome')}.",
        "payment.included_in_payout": lambda: f"Included in payout {data.get('payout_id')}.",
    }
    describe = words.get(event_type)
    if describe is None:
        return event_type.split(".", 1)[-1].replace("_", " ").capitalize() + "."
    try:
        return describe()
    except Exception:  # an older or newer shape of the event: say what happened, not how much
        return event_type.split(".", 1)[-1].replace("_", " ").capitalize() + "."


def ratio(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


_templates.globals.update(money=money, when=when, ratio=ratio)

"""The customer's payment page, ``/pay/{token}``: server-rendered HTML with no scripts, one form
per step (order summary and code -> identity above the threshold -> card -> result).

Every response carries strict security headers. Forms carry a CSRF token (a keyed hash of the
link token) and a per-form id; command ids derive from the form id, so a form submitted twice
is one command (a new code is texted once; the card is tokenized once, attached once and
charged once). Card numbers go straight to the vault; the CVV goes only to
``authorize_payment``; neither is logged or echoed.

The page renders; it decides nothing about money. Paying is the checkout use case
(application/checkout.py), and what each rejection answers (status and words) comes from the one
table in problems.py.
"""

from __future__ import annotations

import contextlib
import hmac
import re
import secrets
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import structlog
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from litestar import Controller, MediaType, Request, Response, get, post
from litestar.datastructures import FormMultiDict
from litestar.exceptions import HTTPException
from litestar.response import Redirect

from adapters.postgres.vault import card_brand, normalize_number
from api.http.problems import INVALID_LINK, REFUSED_ON_PAGE, PageMessage, answer_for
from api.http.redaction import redact_path
from api.http.services import ApiServices
from application.checkout import CardEntry, FormSentWithAnotherCard
from application.errors import IdempotencyKeyReused
from application.ledger import CommandResult, Ledger
from application.ports import IdentityClaim
from domain.errors import (
    DomainError,
    IdentityCheckNotRequired,
    IdentityCheckRequired,
    InvalidPaymentMethod,
    InvalidTransition,
    LinkExpired,
    ResendLimitReached,
    SessionLocked,
)
from domain.money import Money
from domain.payment import PaymentStatus
from domain.payment_session import (
    MAX_CODE_RESENDS,
    MAX_DECLINES,
    MAX_IDENTITY_ATTEMPTS,
    PaymentSession,
    SessionStatus,
)
from domain.values import mask_phone

log = structlog.get_logger("echotransact.pay")

PAGE_PREFIX = "/pay/"
STYLESHEET_PATH = "/pay/assets/pay.css"
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; base-uri 'none'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}
_HERE = Path(__file__).parent
_templates = Environment(
    loader=FileSystemLoader(_HERE / "templates"), autoescape=True, undefined=StrictUndefined,
    trim_blocks=True, lstrip_blocks=True,
)
_STATIC = {name: (_HERE / "static" / name).read_bytes() for name in ("pay.css", "favicon.svg")}
_FORM_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")
_CODE = re.compile(r"[0-9]{6}")
_EXPIRY = re.compile(r"\s*([0-9]{1,2})\s*/?\s*([0-9]{2}|[0-9]{4})\s*")
_POSTAL = re.compile(r"[A-Za-z0-9 -]{3,10}")
S = SessionStatus

DECLINE_MESSAGES = {
    "insufficient_funds": "Your bank declined the card: not enough funds.",
    # The risk rules' reasons stay with the merchant; the customer is told only what to do.
    "risk_declined": "We could not accept this card for this payment.",
}
FAILURE_MESSAGES = {
    "too_many_declines": "The card was declined too many times, so this payment link is closed.",
    "identity_not_verified": "We could not confirm your identity, so this payment link is closed.",
}


def masked_phone(phone: str) -> str:
    """``+14155550123`` -> ``+1 ••• ••• 0123``: what ``mask_phone`` keeps, the hidden digits as
    bullets in groups of three, for people to read; no-break spaces, so it never wraps."""
    masked = mask_phone(phone)
    hidden = len(masked) - 6
    return "\u00a0".join([masked[:2], *("•" * min(3, hidden - i) for i in range(0, hidden, 3)), masked[-4:]])


def csrf_token(ledger: Ledger, link_token: str) -> str:
    return ledger.keyed_hash("pay-page-csrf", link_token)


def _html(template: str, status: int = 200, **context: Any) -> Response[str]:
    body = _templates.get_template(template).render(stylesheet=STYLESHEET_PATH, **context)
    return Response(body, status_code=status, media_type=MediaType.HTML, headers=SECURITY_HEADERS)


def _message(status: int, title: str, text: str, *, tone: str = "info", merchant_name: str = "",
             retry_url: str | None = None, retry_label: str = "Try again") -> Response[str]:
    return _html("pay/message.html", status, title=title, text=text, tone=tone, merchant_name=merchant_name,
                 retry_url=retry_url, retry_label=retry_label)


def _refusal(error: DomainError | type[DomainError], merchant_name: str = "") -> Response[str]:
    """The page for a rejection, as problems.py's table says. A class stands for a session whose
    state says the same as the error would (an expired link, a locked session)."""
    answer = answer_for(error)
    message = answer.page_message
    if message is None:
        told = error.message if isinstance(error, DomainError) else "this is not possible now"
        message = PageMessage(REFUSED_ON_PAGE, f"{told.capitalize()}.")
    return _message(answer.page_status, message.title, message.text, tone="error", merchant_name=merchant_name)


def _page_status(error: DomainError) -> int:
    """The status of a step shown again after a rejection: the table's, like every other."""
    return answer_for(error).page_status


class _Page:
    """One request's view of a session: what the templates need, computed once."""

    def __init__(self, services: ApiServices, token: str, session: PaymentSession) -> None:
        self.ledger = services.ledger
        self.checkout = services.checkout
        self.token = token
        self.session = session
        # The kept merchant (a rename shows within MERCHANT_FRESH_S): every page of a journey
        # loaded it from the event store before, five times a payment.
        self.merchant_name = self.ledger.merchant_to_read(session.merchant_id).name
        self.base_url = f"/pay/{token}"
        self._phone: str | None = None

    def reload(self, after: CommandResult | None = None) -> None:
        """The session as it is now: as ``after`` (a command on it) saved it, else loaded again."""
        saved = after.saved_one(PaymentSession, self.session.id) if after is not None else None
        self.session = saved if saved is not None else self.ledger.get_session(self.session.id)

    @property
    def expired(self) -> bool:
        return self.ledger.clock.now() >= self.session.expires_at

    def phone(self) -> str:
        """The customer's phone, opened with their key (once per page); ``+0000`` if erased."""
        if self._phone is None:
            self._phone = self.ledger.session_phone(self.session) or "+0000"
        return self._phone

    def context(self) -> dict[str, Any]:
        s = self.session
        currency = s.currency
        items = [
            {"name": item["name"], "quantity": item["quantity"],
             "total": Money(item["quantity"] * item["unit_amount_minor"], currency).format()}
            for item in s.line_items
        ]
        steps = ["Code", *(["Identity"] if s.needs_identity_check else []), "Card", "Done"]
        return {
            "token": self.token, "base_url": self.base_url, "merchant_name": self.merchant_name,
            "order_reference": s.order_reference, "items": items,
            "total": Money(s.amount_minor, currency).format(), "phone_last4": self.phone()[-4:],
            "steps": steps, "csrf": csrf_token(self.ledger, self.token),
            "form_id": secrets.token_urlsafe(24), "errors": {}, "message": None, "values": {},
        }

    def step(self, template: str, status: int = 200, **extra: Any) -> Response[str]:
        context = self.context()
        context.update(extra)
        return _html(template, status, **context)

    def code_step(self, status: int = 200, *, resent: bool = False, **extra: Any) -> Response[str]:
        """The code form, and the form that asks for a new code while any are left. ``resent``
        (after a resend's redirect) says where the new code went and how many more are left."""
        s = self.session
        return self.step("pay/code.html", status, resent=resent and s.code_resends > 0,
                         resends_left=max(0, MAX_CODE_RESENDS - s.code_resends),
                         phone_masked=masked_phone(self.phone()),
                         resend_form_id=secrets.token_urlsafe(24), **extra)

    def identity_step(self, status: int = 200, **extra: Any) -> Response[str]:
        left = MAX_IDENTITY_ATTEMPTS - self.session.identity_attempts
        return self.step("pay/identity.html", status, attempts_left=left, **extra)

    def card_step(self, status: int = 200, **extra: Any) -> Response[str]:
        return self.step("pay/card.html", status, tries_left=MAX_DECLINES - self.session.declines, **extra)

    def outcome(self, *, resent: bool = False) -> Response[str]:
        """The page for the session as it is now: the next step, or how it ended."""
        s = self.session
        live = s.status not in (S.COMPLETED, S.EXPIRED, S.CANCELLED, S.FAILED, S.LOCKED,
                                S.PAYMENT_METHOD_ATTACHED)
        if s.status == S.EXPIRED or (live and self.expired):
            if s.status != S.EXPIRED:
                # Record it; if someone else moved the session on, the customer still sees "expired".
                with contextlib.suppress(DomainError):
                    self.ledger.expire_session(s.id)
            return _refusal(LinkExpired, self.merchant_name)
        if s.status == S.LOCKED:
            return _refusal(SessionLocked, self.merchant_name)
        if s.status == S.CANCELLED:
            return _message(410, "This payment was cancelled",
                            "The merchant cancelled this payment. You have not been charged.",
                            merchant_name=self.merchant_name)
        if s.status == S.FAILED:
            return _message(200, "Payment not completed",
                            FAILURE_MESSAGES.get(s.end_reason or "", "This payment could not be completed.")
                            + " You have not been charged.", tone="error", merchant_name=self.merchant_name)
        if s.status == S.COMPLETED:
            return self.step("pay/done.html", 200, card=self._card_of_completed())
        if s.status == S.PAYMENT_METHOD_ATTACHED:
            return self._settle_in_flight()
        if s.status in (S.LINK_SENT, S.LINK_OPENED):
            return self.code_step(resent=resent)
        if s.status == S.CODE_VERIFIED and s.needs_identity_check:
            return self.identity_step()
        return self.card_step()

    def _card_of_completed(self) -> dict[str, str]:
        payment = self.ledger.get_payment(self.session.payment_id) if self.session.payment_id else None
        if payment is None:
            return {"brand": "", "last4": ""}
        return {"brand": _brand_name(payment.card_brand), "last4": payment.card_last4}

    def _settle_in_flight(self) -> Response[str]:
        """A payment is with the processor (its answer was lost): ask again, never charge again."""
        assert self.session.payment_id is not None
        if self.checkout.settle_in_flight(self.session.payment_id).status == PaymentStatus.PROCESSING:
            return self.step("pay/pending.html", 202)
        self.reload()
        if self.session.status == S.PAYMENT_METHOD_ATTACHED:
            return self.step("pay/pending.html", 202)
        return self.outcome()


def _brand_name(brand: str | None) -> str:
    return {"visa": "Visa", "mastercard": "Mastercard", "amex": "American Express", "discover": "Discover",
            "jcb": "JCB", "diners": "Diners Club", "unionpay": "UnionPay"}.get(brand or "", "Card")


def _field(form: FormMultiDict, name: str, max_length: int = 100) -> str:
    value = form.get(name, "")
    return value.strip()[:max_length] if isinstance(value, str) else ""


def _check_post(request: Request[Any, Any, Any], form: FormMultiDict, page: _Page) -> str | None:
    """The form's id when the post is ours; None for a forged or stale one."""
    # Browsers say where a post came from in Sec-Fetch-Site; older ones only in Origin, which is
    # "null" for our own forms (Referrer-Policy: no-referrer). Hosts are compared, not schemes, so
    # a proxy that ends TLS does not make our own posts look foreign. The token below is the check
    # that does not depend on the browser.
    site = request.headers.get("sec-fetch-site")
    origin = request.headers.get("origin")
    if site is not None:
        if site != "same-origin":
            return None
    elif origin not in (None, "null") and urlsplit(origin).netloc != request.headers.get("host"):
        return None
    if not hmac.compare_digest(_field(form, "csrf", 128), csrf_token(page.ledger, page.token)):
        return None
    form_id = _field(form, "form_id", 64)
    return form_id if _FORM_ID.fullmatch(form_id) else None


def _forbidden(page: _Page) -> Response[str]:
    return _message(403, "This form is out of date",
                    "For your security we could not accept it. Open the payment page again and retry.",
                    tone="error", merchant_name=page.merchant_name, retry_url=page.base_url,
                    retry_label="Open the payment page")


def _parse_expiry(text: str) -> tuple[int, int] | None:
    match = _EXPIRY.fullmatch(text)
    if not match:
        return None
    month, year = int(match.group(1)), int(match.group(2))
    return month, (year + 2000 if year < 100 else year)


def _page_error(request: Request[Any, Any, Any], error: Exception) -> Response[str]:
    """Errors as friendly pages, never JSON and never a stack trace."""
    if isinstance(error, DomainError):
        return _refusal(error)
    if isinstance(error, HTTPException) and error.status_code < 500:
        if error.status_code == 404:  # no such route: to the customer, a link that is not right
            return _message(404, INVALID_LINK.title, INVALID_LINK.text, tone="error")
        return _message(error.status_code, "We could not read that",
                        "Something in the request was not right. Open the payment page again and retry.",
                        tone="error")
    log.error("payment_page_error", error_type=type(error).__name__, path=redact_path(request.url.path),
              exc_info=error)
    return _message(500, "Something went wrong on our side",
                    "Nothing was charged twice. Please open the payment page again in a moment.",
                    tone="error")


class PaymentPageController(Controller):
    """The customer-facing payment page (no API key: the link token is the credential)."""

    path = "/pay"
    include_in_schema = False
    exception_handlers = {  # noqa: RUF012  (Litestar's layer attribute)
        DomainError: _page_error, HTTPException: _page_error, Exception: _page_error}

    @get("/assets/pay.css", sync_to_thread=False)
    def stylesheet(self) -> Response[bytes]:
        return Response(_STATIC["pay.css"], media_type="text/css; charset=utf-8", headers=SECURITY_HEADERS)

    @get("/assets/favicon.svg", sync_to_thread=False)
    def icon(self) -> Response[bytes]:
        return Response(_STATIC["favicon.svg"], media_type="image/svg+xml", headers=SECURITY_HEADERS)

    @get("/{token:str}")
    async def show(self, request: Request[Any, Any, Any], token: str, services: ApiServices) -> Response[str]:
        # ?resent=1 is where a resend redirects: the code step then says where the new code went.
        resent = request.query_params.get("resent") == "1"

        def run() -> Response[str]:
            page = _Page(services, token, services.ledger.session_for_link(token))
            if page.session.status == S.LINK_SENT and not page.expired:
                opened = page.ledger.open_link(f"page:open:{page.session.id}", page.session.id, token,
                                               ip=request.client.host if request.client else None,
                                               user_agent=request.headers.get("user-agent"))
                page.reload(opened)
            return page.outcome(resent=resent)

        return await anyio.to_thread.run_sync(run)

    @post("/{token:str}/code")
    async def code(self, request: Request[Any, Any, Any], token: str, services: ApiServices) -> Response[Any]:
        form = await request.form()

        def run() -> Response[Any]:
            page = _Page(services, token, services.ledger.session_for_link(token))
            form_id = _check_post(request, form, page)
            if form_id is None:
                return _forbidden(page)
            if page.session.status not in (S.LINK_SENT, S.LINK_OPENED):
                return page.outcome()  # locked, expired, or past this step (a form sent twice)
            code = _field(form, "code", 20).replace(" ", "")
            if not _CODE.fullmatch(code):
                return page.code_step(422, errors={"code": "Enter the 6-digit code from the text message."})
            session_id = page.session.id
            try:
                result = page.ledger.verify_code(f"page:code:{session_id}:{form_id}", session_id, code)
            except IdempotencyKeyReused as reused:
                return page.code_step(_page_status(reused),
                                      message="That form was already sent. Please enter the code again.")
            except InvalidTransition:
                return Redirect(page.base_url, status_code=303, headers=SECURITY_HEADERS)
            check = result.result["code_check"]
            if check == "verified":
                return Redirect(page.base_url, status_code=303, headers=SECURITY_HEADERS)
            if check == "locked":
                return _refusal(SessionLocked, page.merchant_name)
            left = int(result.result["attempts_left"])
            return page.code_step(422, errors={
                "code": f"That code is not right. You have {left} {'try' if left == 1 else 'tries'} left."})

        return await anyio.to_thread.run_sync(run)

    @post("/{token:str}/resend")
    async def resend(self, request: Request[Any, Any, Any], token: str, services: ApiServices) -> Response[Any]:
        """A new code by SMS (the old one stops working; attempts are not reset). The form id
        makes the command id, so a double click texts one code."""
        form = await request.form()

        def run() -> Response[Any]:
            page = _Page(services, token, services.ledger.session_for_link(token))
            form_id = _check_post(request, form, page)
            if form_id is None:
                return _forbidden(page)
            if page.session.status not in (S.LINK_SENT, S.LINK_OPENED):
                return page.outcome()  # locked, expired, or past this step
            session_id = page.session.id
            try:
                page.ledger.resend_code(f"page:resend:{session_id}:{form_id}", session_id)
            except ResendLimitReached as refused:
                return page.code_step(_page_status(refused), message=(
                    f"We cannot send any more codes: we already sent {MAX_CODE_RESENDS} new ones for this "
                    "payment. Enter the last code we sent, or ask the merchant for a new link."))
            except InvalidTransition:
                return Redirect(page.base_url, status_code=303, headers=SECURITY_HEADERS)
            return Redirect(f"{page.base_url}?resent=1", status_code=303, headers=SECURITY_HEADERS)

        return await anyio.to_thread.run_sync(run)

    @post("/{token:str}/identity")
    async def identity(self, request: Request[Any, Any, Any], token: str,
                       services: ApiServices) -> Response[Any]:
        form = await request.form()

        def run() -> Response[Any]:
            page = _Page(services, token, services.ledger.session_for_link(token))
            form_id = _check_post(request, form, page)
            if form_id is None:
                return _forbidden(page)
            if page.session.status != S.CODE_VERIFIED or not page.session.needs_identity_check:
                return page.outcome()
            born, postal = _field(form, "date_of_birth", 10), _field(form, "postal_code", 20)
            values = {"date_of_birth": born, "postal_code": postal}
            errors = {}
            try:
                date.fromisoformat(born)
            except ValueError:
                errors["date_of_birth"] = "Enter your date of birth."
            if not _POSTAL.fullmatch(postal):
                errors["postal_code"] = "Enter your postal code (3 to 10 letters or digits)."
            if errors:
                return page.identity_step(422, errors=errors, values=values)
            session_id = page.session.id
            try:
                page.ledger.verify_identity(f"page:identity:{session_id}:{form_id}", session_id,
                                            IdentityClaim(born, postal))
            except IdempotencyKeyReused as reused:
                return page.identity_step(_page_status(reused), values=values,
                                          message="That form was already sent. Please send it again.")
            except (InvalidTransition, IdentityCheckNotRequired):
                return Redirect(page.base_url, status_code=303, headers=SECURITY_HEADERS)
            page.reload()
            if page.session.status == S.CODE_VERIFIED:
                return page.identity_step(422, values=values, message=(
                    "We could not confirm your identity with these details. Check them and try again."))
            if page.session.status == S.IDENTITY_VERIFIED:
                return Redirect(page.base_url, status_code=303, headers=SECURITY_HEADERS)
            return page.outcome()

        return await anyio.to_thread.run_sync(run)

    @post("/{token:str}/card")
    async def card(self, request: Request[Any, Any, Any], token: str, services: ApiServices) -> Response[Any]:
        form = await request.form()

        def run() -> Response[Any]:
            page = _Page(services, token, services.ledger.session_for_link(token))
            form_id = _check_post(request, form, page)
            if form_id is None:
                return _forbidden(page)
            command_id = f"page:card:{page.session.id}:{form_id}"
            if page.checkout.accepts_card(command_id, page.session):
                return _pay(page, form, command_id)
            # Nothing to pay for yet (or any more): show where the session is.
            return Redirect(page.base_url, status_code=303, headers=SECURITY_HEADERS)

        return await anyio.to_thread.run_sync(run)


def _pay(page: _Page, form: FormMultiDict, command_id: str) -> Response[Any]:
    """Check the card form, pay through checkout (idempotent on the form id), show the outcome."""
    number, expiry, cvv = _field(form, "card_number", 40), _field(form, "expiry", 10), _field(form, "cvv", 8)
    errors: dict[str, str] = {}
    brand = None
    try:
        brand = card_brand(normalize_number(number))
    except InvalidPaymentMethod:
        errors["card_number"] = "Check the card number: it is not valid."
    parsed = _parse_expiry(expiry)
    if parsed is None:
        errors["expiry"] = "Enter the expiry date as MM/YY."
    cvv_length = 4 if brand == "amex" else 3
    if not (cvv.isascii() and cvv.isdigit() and len(cvv) == cvv_length):
        errors["cvv"] = f"Enter the {cvv_length}-digit security code from your card."
    values = {"expiry": expiry}  # never the card number or the CVV
    if errors:
        return page.card_step(422, errors=errors, values=values)
    assert parsed is not None
    try:
        outcome = page.checkout.pay_by_card(command_id, page.session.id, CardEntry(number, *parsed, cvv))
    except InvalidPaymentMethod as rejection:
        reason = rejection.details.get("reason", "")
        field = "expiry" if reason in ("expired", "invalid_expiry") else "card_number"
        text = {"expired": "This card has expired.", "invalid_expiry": "Enter a valid expiry date (MM/YY)."}
        return page.card_step(_page_status(rejection), values=values, errors={
            field: text.get(reason, "Check the card number: it is not valid.")})
    except FormSentWithAnotherCard as reused:
        return page.card_step(_page_status(reused),
                              message="That form was already sent with another card. Please try again.")
    except (InvalidTransition, IdentityCheckRequired):
        return Redirect(page.base_url, status_code=303, headers=SECURITY_HEADERS)
    except IdempotencyKeyReused as reused:
        return page.card_step(_page_status(reused),
                              message="That form was already sent. Please enter your card again.")
    if outcome.status == PaymentStatus.PROCESSING:
        return page.step("pay/pending.html", 202)
    if outcome.status == PaymentStatus.FAILED:
        page.reload()
        if page.session.status == S.FAILED:
            return page.outcome()
        declined = DECLINE_MESSAGES.get(outcome.failure_code or "", "Your bank declined the card.")
        return page.card_step(402, message=declined + " You have not been charged. Try another card.")
    # Authorized (or any later state): the result page, fetched with GET so a reload is harmless.
    return Redirect(page.base_url, status_code=303, headers=SECURITY_HEADERS)

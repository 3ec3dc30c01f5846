"""The web console, ``/console``: server-rendered pages over the same services, role checks and
row-level security as the JSON API (a merchant sees only its own rows: the read views run as the
reader role with its scope, and every command passes its merchant to the ledger).

Login exchanges an API key, checked once by the API's own path (``Ledger.authenticate``), for a
server-side session (sessions.py): the cookie holds only a random id, HttpOnly, SameSite=Strict,
Secure over HTTPS, with an expiry. Every form carries the session's CSRF token and every POST is
checked against it. Commands carry a per-form id from which their command id derives, so a form
sent twice is one command (a double click refunds once).
"""

from __future__ import annotations

import csv
import io
import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from datetime import time as day_start
from typing import Any
from urllib.parse import urlencode, urlsplit
from uuid import UUID

import anyio
import structlog
from litestar import Controller, Request, Response, get, post
from litestar.datastructures import Cookie, FormMultiDict
from litestar.exceptions import HTTPException
from litestar.response import Redirect, Stream

from adapters.notifications.webhooks import WebhookAdmin, webhook_secret
from api.http.auth import Principal
from api.http.console.charts import as_int, columns_by_day, funnel_bars
from api.http.console.queries import ConsoleQueries
from api.http.console.sessions import COOKIE_NAME, LOGIN_COOKIE_NAME, ConsoleSession, SessionStore
from api.http.console.web import (
    CONSOLE_PREFIX,
    SECURITY_HEADERS,
    STATIC_DIR,
    Page,
    describe_event,
    home_for,
    html,
    may_open,
    message,
)
from api.http.controllers.payments import PAYMENT_STATUSES, balance_split
from api.http.health import CHECKS
from api.http.problems import answer_for
from api.http.services import ApiServices
from application.errors import IdempotencyKeyReused, NotFound
from domain.errors import DomainError
from domain.merchant import Merchant
from domain.money import parse_major
from projections.views import Scope

log = structlog.get_logger("echotransact.console")

_FORM_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")
_LAST4 = re.compile(r"[0-9]{4}")
_STATIC = {name: (STATIC_DIR / name).read_bytes() for name in ("console.css", "console.js")}
_STATIC_TYPES = {"console.css": "text/css; charset=utf-8", "console.js": "text/javascript; charset=utf-8"}
LOGIN_TTL_S = 3600
ROLES = ("merchant", "analyst", "compliance", "admin")


# -- plumbing -------------------------------------------------------------------------------------


@dataclass
class Visit:
    """One request by a logged-in user: who, and the page frame around what they see."""

    services: ApiServices
    session: ConsoleSession
    page: Page

    @property
    def principal(self) -> Principal:
        return Principal(self.session.key_id, self.session.role, self.session.merchant_id)

    @property
    def scope(self) -> Scope:
        return Scope(self.session.role, self.session.merchant_id)

    @property
    def queries(self) -> ConsoleQueries:
        return ConsoleQueries(self.services.views, self.services.health.database_url)

    def command_id(self, action: str, form_id: str) -> str:
        # The per-form id names the command: the same form sent twice is the same command.
        return f"{self.principal.idempotency_scope}:console:{action}:{form_id}"


def _store(services: ApiServices) -> SessionStore:
    if services.redis is None:
        raise RuntimeError("the console keeps its sessions in Redis, and none is configured")
    return SessionStore(services.redis)


def _https(request: Request[Any, Any, Any]) -> bool:
    return request.url.scheme == "https"


def _cookie(request: Request[Any, Any, Any], key: str, value: str, max_age: int) -> Cookie:
    return Cookie(key=key, value=value, path=CONSOLE_PREFIX, httponly=True, secure=_https(request),
                  samesite="strict", max_age=max_age)


def _to_login() -> Response[Any]:
    return Redirect(f"{CONSOLE_PREFIX}/login", status_code=303, headers=SECURITY_HEADERS)


def _visit(request: Request[Any, Any, Any], services: ApiServices, href: str | None) -> Visit | Response[Any]:
    """The logged-in visit, or the answer instead: to the login page without a session or when
    the session's key is no longer live, a 403 page for a page the role may not open."""
    store = _store(services)
    session = store.get(request.cookies.get(COOKIE_NAME))
    if session is None:
        return _to_login()
    # The key is asked on every request, as the API asks it (Ledger.live_api_key, behind
    # Ledger.authenticate): a key revoked by any means (the API, the CLI, another process's
    # console) ends its sessions at once, not when the cookie expires.
    if services.ledger.live_api_key(session.key_id) is None:
        store.delete(session)
        log.info("console_session_ended", key_id=str(session.key_id), reason="key_revoked")
        ended: Response[Any] = Redirect(f"{CONSOLE_PREFIX}/login?ended=1", status_code=303, headers=SECURITY_HEADERS)
        ended.delete_cookie(COOKIE_NAME, path=CONSOLE_PREFIX)
        return ended
    request.state.principal = Principal(session.key_id, session.role, session.merchant_id)  # for the log line
    page = Page(session.role, session.label, str(session.merchant_id) if session.merchant_id else None,
                session.csrf, href or "")
    if href is not None and not may_open(session.role, href):
        return message(page, 403, "Not available to your role",
                       f"The {session.role} role cannot open this page.", link=home_for(session.role),
                       link_label="Go to your start page")
    return Visit(services, session, page)


def _same_origin(request: Request[Any, Any, Any]) -> bool:
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site == "same-origin"
    origin = request.headers.get("origin")
    return origin in (None, "null") or urlsplit(origin).netloc == request.headers.get("host")


def _field(form: FormMultiDict, name: str, max_length: int = 200) -> str:
    value = form.get(name, "")
    return value.strip()[:max_length] if isinstance(value, str) else ""


def _refused(visit: Visit) -> Response[str]:
    return message(visit.page, 403, "This form was refused",
                   "It did not carry this session's security token (it may be from an old page or another"
                   " site). Nothing was done. Open the page again and retry.", link=visit.page.current or
                   home_for(visit.session.role), link_label="Open the page again")


def _checked_form(request: Request[Any, Any, Any], visit: Visit, form: FormMultiDict) -> bool:
    return _same_origin(request) and visit.session.csrf_ok(_field(form, "csrf", 128))


def _uuid(text: str | None) -> UUID | None:
    try:
        return UUID(text) if text else None
    except ValueError:
        return None


def _day(text: str | None) -> date | None:
    try:
        return date.fromisoformat(text) if text else None
    except ValueError:
        return None


def _query(request: Request[Any, Any, Any], name: str, max_length: int = 100) -> str:
    return (request.query_params.get(name) or "").strip()[:max_length]


async def _in_thread(call: Callable[[], Response[Any]]) -> Response[Any]:
    return await anyio.to_thread.run_sync(call)


async def _page(request: Request[Any, Any, Any], services: ApiServices, href: str | None,
                render: Callable[[Visit], Response[Any]]) -> Response[Any]:
    """A page of the logged-in visit (``_visit`` answers instead without one), in a worker thread."""
    def run() -> Response[Any]:
        visit = _visit(request, services, href)
        return visit if isinstance(visit, Response) else render(visit)
    return await _in_thread(run)


async def _posted(request: Request[Any, Any, Any], services: ApiServices, href: str | None,
                  act: Callable[[Visit, FormMultiDict], Response[Any]]) -> Response[Any]:
    """A form of the logged-in visit, acted on only with this session's CSRF token from our origin."""
    form = await request.form()

    def run() -> Response[Any]:
        visit = _visit(request, services, href)
        if isinstance(visit, Response):
            return visit
        if not _checked_form(request, visit, form):
            return _refused(visit)
        return act(visit, form)
    return await _in_thread(run)


def _console_error(request: Request[Any, Any, Any], error: Exception) -> Response[Any]:
    """Errors as pages for people: never JSON, never a stack trace."""
    page = Page()
    if isinstance(error, HTTPException) and error.status_code < 500:
        if error.status_code == 404:
            return message(page, 404, "Page not found", "There is no such page in the console.",
                           link=CONSOLE_PREFIX, link_label="Go to the console")
        return message(page, error.status_code, "We could not read that",
                       "Something in the request was not right.", link=CONSOLE_PREFIX, link_label="Go back")
    log.error("console_error", error_type=type(error).__name__, exc_info=error)
    return message(page, 500, "Something went wrong on our side",
                   "Nothing was done twice. Please try again in a moment.", link=CONSOLE_PREFIX,
                   link_label="Go to the console")


# -- pages ----------------------------------------------------------------------------------------


class ConsoleController(Controller):
    path = CONSOLE_PREFIX
    include_in_schema = False
    exception_handlers = {HTTPException: _console_error, Exception: _console_error}  # noqa: RUF012

    @get("/assets/{name:str}", sync_to_thread=False)
    def asset(self, name: str) -> Response[bytes]:
        if name not in _STATIC:
            raise HTTPException(status_code=404)
        return Response(_STATIC[name], media_type=_STATIC_TYPES[name],
                        headers={**SECURITY_HEADERS, "Cache-Control": "public, max-age=300"})

    @get("/")
    async def home(self, request: Request[Any, Any, Any], services: ApiServices) -> Response[Any]:
        return await _page(request, services, None,
                           lambda visit: Redirect(home_for(visit.session.role), status_code=303,
                                                  headers=SECURITY_HEADERS))

    # -- login and logout -------------------------------------------------------------------------

    @get("/login")
    async def login_form(self, request: Request[Any, Any, Any], services: ApiServices) -> Response[Any]:
        def run() -> Response[Any]:
            if _store(services).get(request.cookies.get(COOKIE_NAME)) is not None:
                return Redirect(CONSOLE_PREFIX, status_code=303, headers=SECURITY_HEADERS)
            notice = ("You are logged out." if request.query_params.get("out")
                      else "Your session ended: the API key it was made with was revoked."
                      if request.query_params.get("ended") else None)
            return _login_page(request, 200, notice=notice)
        return await _in_thread(run)

    @post("/login")
    async def login(self, request: Request[Any, Any, Any], services: ApiServices) -> Response[Any]:
        form = await request.form()

        def run() -> Response[Any]:
            sent = _field(form, "csrf", 128)
            expected = request.cookies.get(LOGIN_COOKIE_NAME, "")
            if not (_same_origin(request) and sent and expected and secrets.compare_digest(sent, expected)):
                return _login_page(request, 403, error="The login form was refused (it was out of date or"
                                   " not from this console). Please try again.")
            client = request.client.host if request.client else "unknown"
            if not services.rate_limiter.hit(f"console-login:{client}").allowed:
                return _login_page(request, 429, error="Too many attempts. Wait a minute and try again.")
            api_key = _field(form, "api_key", 300)
            key = services.ledger.authenticate(api_key) if api_key else None
            if key is None:
                log.info("console_login_refused")
                return _login_page(request, 401, error="That API key is not valid or was revoked.")
            session_id, _ = _store(services).create(key.id, key.role, key.merchant_id, key.label)
            request.state.principal = Principal(key.id, key.role, key.merchant_id)
            log.info("console_login", key_id=str(key.id), role=key.role)
            response: Response[Any] = Redirect(home_for(key.role), status_code=303, headers=SECURITY_HEADERS)
            response.set_cookie(_cookie(request, COOKIE_NAME, session_id, _store(services).ttl_s))
            response.delete_cookie(LOGIN_COOKIE_NAME, path=CONSOLE_PREFIX)
            return response
        return await _in_thread(run)

    @post("/logout")
    async def logout(self, request: Request[Any, Any, Any], services: ApiServices) -> Response[Any]:
        def act(visit: Visit, form: FormMultiDict) -> Response[Any]:
            _store(services).delete(visit.session)
            log.info("console_logout", key_id=str(visit.session.key_id))
            response: Response[Any] = Redirect(f"{CONSOLE_PREFIX}/login?out=1", status_code=303,
                                               headers=SECURITY_HEADERS)
            response.delete_cookie(COOKIE_NAME, path=CONSOLE_PREFIX)
            return response
        return await _posted(request, services, None, act)

    # -- merchants: payments ------------------------------------------------------------------------

    @get("/payments")
    async def payments(self, request: Request[Any, Any, Any], services: ApiServices) -> Response[Any]:
        return await _page(request, services, "/console/payments", lambda visit: _payments_page(request, visit))

    @get("/payments/{payment_id:uuid}")
    async def payment(self, request: Request[Any, Any, Any], payment_id: UUID,
                      services: ApiServices) -> Response[Any]:
        return await _page(request, services, "/console/payments",
                           lambda visit: _payment_page(visit, payment_id, done=_query(request, "done", 20)))

    @get("/payments/{payment_id:uuid}/{action:str}")
    async def confirm(self, request: Request[Any, Any, Any], payment_id: UUID, action: str,
                      services: ApiServices) -> Response[Any]:
        return await _page(request, services, "/console/payments",
                           lambda visit: _confirm_page(visit, payment_id, action))

    @post("/payments/{payment_id:uuid}/{action:str}")
    async def act(self, request: Request[Any, Any, Any], payment_id: UUID, action: str,
                  services: ApiServices) -> Response[Any]:
        return await _posted(request, services, "/console/payments",
                             lambda visit, form: _payment_command(visit, payment_id, action, form))

    @get("/balances")
    async def balances(self, request: Request[Any, Any, Any], services: ApiServices) -> Response[Any]:
        def render(visit: Visit) -> Response[Any]:
            rows = services.views.balances(visit.scope)
            return html(visit.page, "balances.html", rows=rows, split=balance_split(rows))
        return await _page(request, services, "/console/balances", render)

    @get("/payouts")
    async def payouts(self, request: Request[Any, Any, Any], services: ApiServices) -> Response[Any]:
        return await _in_thread(lambda: _paged_page(request, services, "payouts", "payout_id",
                                                    services.views.payouts))

    @get("/disputes")
    async def disputes(self, request: Request[Any, Any, Any], services: ApiServices) -> Response[Any]:
        return await _in_thread(lambda: _paged_page(request, services, "disputes", "dispute_id",
                                                    services.views.disputes))

    # -- merchants: webhooks ------------------------------------------------------------------------

    @get("/webhooks")
    async def webhooks(self, request: Request[Any, Any, Any], services: ApiServices) -> Response[Any]:
        return await _page(request, services, "/console/webhooks",
                           lambda visit: _webhooks_page(visit, _query(request, "status", 20),
                                                        notice=_query(request, "done", 20)))

    @get("/webhooks/rotate")
    async def confirm_rotation(self, request: Request[Any, Any, Any], services: ApiServices) -> Response[Any]:
        return await _page(request, services, "/console/webhooks", lambda visit: _rotate_page(visit))

    @post("/webhooks/rotate")
    async def rotate(self, request: Request[Any, Any, Any], services: ApiServices) -> Response[Any]:
        return await _posted(request, services, "/console/webhooks", lambda visit, form: _rotate(visit, form))

    @post("/webhooks/{delivery_id:int}/redeliver")
    async def redeliver(self, request: Request[Any, Any, Any], delivery_id: int,
                        services: ApiServices) -> Response[Any]:
        def act(visit: Visit, form: FormMultiDict) -> Response[Any]:
            owner = visit.queries.delivery_owner(delivery_id)
            if owner is None or (visit.session.merchant_id is not None and owner != visit.session.merchant_id):
                return message(visit.page, 404, "No such delivery", f"There is no delivery {delivery_id}.",
                               link="/console/webhooks", link_label="Back to webhooks")
            # Only a dead letter is sent again: a second click finds it pending and changes nothing.
            deliveries = [d for d in visit.queries.webhook_deliveries(owner, status="dead", limit=1000)
                          if d["delivery_id"] == delivery_id]
            if deliveries:
                WebhookAdmin(services.health.database_url).redeliver([delivery_id])
                log.info("console_redeliver", delivery_id=delivery_id, key_id=str(visit.session.key_id))
            return Redirect("/console/webhooks?done=redelivered", status_code=303, headers=SECURITY_HEADERS)
        return await _posted(request, services, "/console/webhooks", act)

    # -- analysts -------------------------------------------------------------------------------------

    @get("/analytics")
    async def analytics(self, request: Request[Any, Any, Any], services: ApiServices) -> Response[Any]:
        def render(visit: Visit) -> Response[Any]:
            report = _analytics(request, visit)
            status = 400 if report["error"] else 200
            return html(visit.page, "analytics.html", status, **report)
        return await _page(request, services, "/console/analytics", render)

    @get("/analytics.csv")
    async def analytics_csv(self, request: Request[Any, Any, Any], services: ApiServices) -> Response[Any]:
        def render(visit: Visit) -> Response[Any]:
            report = _analytics(request, visit)
            if report["error"]:
                return html(visit.page, "analytics.html", 400, **report)
            return Response(_analytics_csv(report), media_type="text/csv; charset=utf-8", headers={
                **SECURITY_HEADERS,
                "Content-Disposition": f'attachment; filename="echotransact-{report["date_from"]}'
                                       f'-{report["date_to"]}.csv"'})
        return await _page(request, services, "/console/analytics", render)

    # -- compliance -----------------------------------------------------------------------------------

    @get("/audit")
    async def audit(self, request: Request[Any, Any, Any], services: ApiServices) -> Response[Any]:
        return await _page(request, services, "/console/audit", lambda visit: _audit_page(request, visit))

    @get("/audit/verify")
    async def verify(self, request: Request[Any, Any, Any], services: ApiServices) -> Response[Any]:
        def render(visit: Visit) -> Response[Any]:
            started = time.perf_counter()
            report = services.views.verify_audit_chain(visit.scope)
            return html(visit.page, "verify.html", report=report,
                        duration_ms=round((time.perf_counter() - started) * 1000))
        return await _page(request, services, "/console/audit", render)

    @get("/audit/export")
    async def export(self, request: Request[Any, Any, Any], services: ApiServices) -> Response[Any]:
        visit = await anyio.to_thread.run_sync(_visit, request, services, "/console/audit")
        if isinstance(visit, Response):
            return visit
        filters = _audit_filters(request)
        if filters["error"]:
            return html(visit.page, "message.html", 400, title="We could not export that", text=filters["error"],
                        link="/console/audit", link_label="Back to the audit trail")
        scope = visit.scope

        async def lines() -> AsyncIterator[bytes]:
            send, receive = anyio.create_memory_object_stream[bytes](100)

            def produce() -> None:
                rows = services.views.audit_export(scope, aggregate_id=filters["aggregate_id"],
                                                   merchant_id=filters["merchant_id"], since=filters["since"],
                                                   until=filters["until"])
                with closing(rows):
                    for row in rows:
                        anyio.from_thread.run(send.send, (json.dumps(row, default=str, sort_keys=True) + "\n").encode())
                anyio.from_thread.run(send.aclose)

            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.to_thread.run_sync, produce)
                async with receive:
                    async for chunk in receive:
                        yield chunk

        return Stream(lines(), media_type="application/x-ndjson", headers={
            **SECURITY_HEADERS, "Content-Disposition": 'attachment; filename="echotransact-audit.jsonl"'})

    # -- operators ------------------------------------------------------------------------------------

    @get("/health")
    async def health(self, request: Request[Any, Any, Any], services: ApiServices) -> Response[Any]:
        visit = await anyio.to_thread.run_sync(_visit, request, services, "/console/health")
        if isinstance(visit, Response):
            return visit
        checks: dict[str, dict[str, Any]] = {}
        for name, check in CHECKS.items():
            started = time.perf_counter()
            try:
                await _bounded(check(services.health))
                checks[name] = {"ok": True, "latency_ms": round((time.perf_counter() - started) * 1000, 1)}
            except Exception as error:  # any failure: shown, not raised
                checks[name] = {"ok": False, "error": f"{type(error).__name__}: {error}"[:200]}

        def run() -> Response[Any]:
            state = visit.queries.system_health()
            return html(visit.page, "health.html", checks=checks, state=state, breakers=_breakers(services),
                        liveness=_liveness(state))
        return await _in_thread(run)

    @get("/keys")
    async def keys(self, request: Request[Any, Any, Any], services: ApiServices) -> Response[Any]:
        return await _page(request, services, "/console/keys",
                           lambda visit: _keys_page(visit, notice=_query(request, "done", 20)))

    @post("/keys")
    async def create_key(self, request: Request[Any, Any, Any], services: ApiServices) -> Response[Any]:
        def act(visit: Visit, form: FormMultiDict) -> Response[Any]:
            form_id = _field(form, "form_id", 64)
            role = _field(form, "role", 20)
            merchant_id = _uuid(_field(form, "merchant_id", 40))
            label = _field(form, "label", 100)
            if not _FORM_ID.fullmatch(form_id) or role not in ROLES:
                return _keys_page(visit, 422, error="Choose a role for the key.")
            if (role == "merchant") != (merchant_id is not None):
                return _keys_page(visit, 422, error="A merchant key needs its merchant, and only a merchant key"
                                                    " has one.")
            try:
                result, token = services.ledger.issue_api_key(visit.command_id("issue_key", form_id), role=role,
                                                              merchant_id=merchant_id, label=label)
            except (NotFound, DomainError, IdempotencyKeyReused) as error:
                return _keys_page(visit, 422, error=_words(error))
            log.info("console_key_issued", key_id=result.result["key_id"], role=role)
            return _keys_page(visit, 201, issued={"key_id": result.result["key_id"], "role": role, "token": token,
                                                  "merchant_id": str(merchant_id) if merchant_id else None})
        return await _posted(request, services, "/console/keys", act)

    @post("/keys/{key_id:uuid}/revoke")
    async def revoke_key(self, request: Request[Any, Any, Any], key_id: UUID,
                         services: ApiServices) -> Response[Any]:
        def act(visit: Visit, form: FormMultiDict) -> Response[Any]:
            form_id = _field(form, "form_id", 64)
            if not _FORM_ID.fullmatch(form_id):
                return _refused(visit)
            try:
                services.ledger.revoke_api_key(visit.command_id("revoke_key", form_id), key_id,
                                               reason="revoked in the console")
            except (NotFound, DomainError, IdempotencyKeyReused) as error:
                return _keys_page(visit, 422, error=_words(error))
            ended = _store(services).end_sessions_of_key(key_id)
            log.info("console_key_revoked", key_id=str(key_id), sessions_ended=ended)
            return Redirect("/console/keys?done=revoked", status_code=303, headers=SECURITY_HEADERS)
        return await _posted(request, services, "/console/keys", act)

    @post("/merchants")
    async def create_merchant(self, request: Request[Any, Any, Any], services: ApiServices) -> Response[Any]:
        def act(visit: Visit, form: FormMultiDict) -> Response[Any]:
            form_id, name = _field(form, "form_id", 64), _field(form, "name", 200)
            if not _FORM_ID.fullmatch(form_id) or not name:
                return _keys_page(visit, 422, error="Enter the merchant's name.")
            try:
                services.ledger.register_merchant(visit.command_id("register_merchant", form_id), name=name)
            except (DomainError, IdempotencyKeyReused) as error:
                return _keys_page(visit, 422, error=_words(error))
            return Redirect("/console/keys?done=merchant", status_code=303, headers=SECURITY_HEADERS)
        return await _posted(request, services, "/console/keys", act)


async def _bounded(awaitable: Any) -> None:
    with anyio.fail_after(3):
        await awaitable


# -- page builders ----------------------------------------------------------------------------------


def _login_page(request: Request[Any, Any, Any], status: int, *, error: str | None = None,
                notice: str | None = None) -> Response[str]:
    token = secrets.token_urlsafe(32)
    response = html(Page(), "login.html", status, login_csrf=token, error=error, notice=notice)
    response.set_cookie(_cookie(request, LOGIN_COOKIE_NAME, token, LOGIN_TTL_S))
    return response


def _words(error: Exception) -> str:
    if isinstance(error, DomainError):
        answer = answer_for(error)
        if answer.page_message is not None:
            return answer.page_message.text
        return f"{error.message[:1].upper()}{error.message[1:]}."
    if isinstance(error, IdempotencyKeyReused):
        return "That form was already sent with other values. Open the page again and retry."
    return str(error)


def _payments_page(request: Request[Any, Any, Any], visit: Visit) -> Response[str]:
    filters = {name: _query(request, name) for name in ("order", "card", "phone", "status", "from", "to")}
    errors: dict[str, str] = {}
    for name, label in (("card", "card"), ("phone", "phone")):
        if filters[name] and not _LAST4.fullmatch(filters[name]):
            errors[name] = f"Enter the last four digits of the {label}."
    if filters["status"] and filters["status"] not in PAYMENT_STATUSES:
        errors["status"] = "Choose a status from the list."
    day_from, day_to = _day(filters["from"]), _day(filters["to"])
    if filters["from"] and day_from is None:
        errors["from"] = "Enter a date."
    if filters["to"] and day_to is None:
        errors["to"] = "Enter a date."
    if day_from and day_to and day_from > day_to:
        errors["to"] = "The end date is before the start date."
    after = _uuid(_query(request, "after"))
    rows: list[dict[str, Any]] = []
    more = False
    if not errors:
        try:
            rows, more = visit.queries.search_payments(
                visit.scope, order_reference=filters["order"] or None, card_last4=filters["card"] or None,
                phone_last4=filters["phone"] or None, status=filters["status"] or None,
                created_from=datetime.combine(day_from, day_start(), UTC) if day_from else None,
                created_to=datetime.combine(day_to + timedelta(days=1), day_start(), UTC) if day_to else None,
                limit=20, starting_after=after)
        except ValueError:
            errors["after"] = "That page is not one of yours; start again from the first page."
    kept = {k: v for k, v in filters.items() if v}
    next_url = f"/console/payments?{urlencode({**kept, 'after': rows[-1]['payment_id']})}" if more and rows else None
    first_url = f"/console/payments?{urlencode(kept)}" if after else None
    return html(visit.page, "payments.html", 400 if errors else 200, rows=rows, filters=filters, errors=errors,
                statuses=PAYMENT_STATUSES, next_url=next_url, first_url=first_url, filtered=bool(kept))


def _actions(visit: Visit, row: dict[str, Any]) -> list[str]:
    """What a merchant may do to this payment now (the ledger decides again when it is asked)."""
    if visit.session.role != "merchant":
        return []  # capture, void and refund take a merchant key, as in the API
    status = row["status"]
    actions = []
    if status == "authorized":
        actions += ["capture", "void"]
    if status in ("captured", "settled", "refunded") and int(row["refunded_minor"]) < int(row["captured_minor"]):
        actions.append("refund")
    return actions


def _payment_page(visit: Visit, payment_id: UUID, *, done: str = "") -> Response[str]:
    row = visit.services.views.payment(visit.scope, payment_id)
    if row is None:  # another merchant's payment answers like a missing one, as in the API
        return message(visit.page, 404, "Payment not found", f"There is no payment {payment_id} you can see.",
                       link="/console/payments", link_label="Back to payments")
    session = visit.services.views.session(visit.scope, UUID(row["session_id"])) if row.get("session_id") else None
    timeline = [{"when": t["occurred_at"], "words": describe_event(t["event_type"], t["data"] or {}, row["currency"]),
                 "event_type": t["event_type"]} for t in row["timeline"]]
    notices = {"capture": "Capture recorded.", "void": "Void recorded.", "refund": "Refund recorded."}
    return html(visit.page, "payment.html", payment=row, session=session, timeline=timeline,
                actions=_actions(visit, row), notice=notices.get(done))


ACTION_TITLES = {"capture": "Capture payment", "void": "Void payment", "refund": "Refund payment"}


def _confirm_page(visit: Visit, payment_id: UUID, action: str, status: int = 200, *,
                  error: str | None = None, values: dict[str, str] | None = None) -> Response[str]:
    if action not in ACTION_TITLES:
        return message(visit.page, 404, "Page not found", "There is no such page in the console.",
                       link=f"/console/payments/{payment_id}", link_label="Back to the payment")
    row = visit.services.views.payment(visit.scope, payment_id)
    if row is None:
        return message(visit.page, 404, "Payment not found", f"There is no payment {payment_id} you can see.",
                       link="/console/payments", link_label="Back to payments")
    if visit.session.role != "merchant":
        return message(visit.page, 403, "Not available to your role",
                       "Capture, void and refund take a merchant's own login.", link=f"/console/payments/{payment_id}",
                       link_label="Back to the payment")
    remaining = {"capture": int(row["authorized_minor"]) - int(row["captured_minor"]),
                 "refund": int(row["captured_minor"]) - int(row["refunded_minor"])}.get(action, 0)
    return html(visit.page, "confirm.html", status, payment=row, action=action, title=ACTION_TITLES[action],
                remaining=remaining, error=error, values=values or {}, form_id=secrets.token_urlsafe(18))


def _payment_command(visit: Visit, payment_id: UUID, action: str, form: FormMultiDict) -> Response[Any]:
    if action not in ACTION_TITLES or visit.session.role != "merchant":
        return _confirm_page(visit, payment_id, action)
    merchant_id = visit.session.merchant_id
    row = visit.services.views.payment(visit.scope, payment_id)
    if row is None:
        return _confirm_page(visit, payment_id, action)
    form_id = _field(form, "form_id", 64)
    if not _FORM_ID.fullmatch(form_id):
        return _refused(visit)
    values = {"amount": _field(form, "amount", 30), "reason": _field(form, "reason", 200)}
    ledger = visit.services.ledger
    command_id = visit.command_id(action, f"{payment_id}:{form_id}")
    try:
        amount = parse_major(values["amount"], row["currency"]) if values["amount"] else None
        if action == "capture":
            ledger.capture_payment(command_id, payment_id, amount_minor=amount, merchant_id=merchant_id)
        elif action == "void":
            ledger.void_payment(command_id, payment_id, reason=values["reason"] or "requested_by_merchant",
                                merchant_id=merchant_id)
        else:
            if amount is None:
                return _confirm_page(visit, payment_id, action, 422, error="Enter the amount to refund.",
                                     values=values)
            ledger.refund_payment(command_id, payment_id, amount_minor=amount, reason=values["reason"],
                                  merchant_id=merchant_id)
    except (DomainError, IdempotencyKeyReused) as error:
        status = answer_for(error).page_status if isinstance(error, DomainError) else 409
        return _confirm_page(visit, payment_id, action, status, error=_words(error), values=values)
    except NotFound:
        return _confirm_page(visit, payment_id, action, 404, error="There is no such payment.", values=values)
    log.info("console_command", action=action, payment_id=str(payment_id), key_id=str(visit.session.key_id))
    return Redirect(f"/console/payments/{payment_id}?done={action}", status_code=303, headers=SECURITY_HEADERS)


def _webhooks_page(visit: Visit, status: str, *, notice: str = "") -> Response[str]:
    status = status if status in ("pending", "delivered", "dead") else ""
    merchant_id = visit.session.merchant_id
    rows = visit.queries.webhook_deliveries(merchant_id, status=status or None, limit=50)
    merchant = visit.services.ledger.get_merchant(merchant_id) if merchant_id else None
    return html(visit.page, "webhooks.html", rows=rows, shown=status,
                endpoint=merchant.webhook_url if merchant else None, signing=_signing(merchant),
                notice="Redelivery queued: the dispatcher sends it again with the same event id."
                if notice == "redelivered" else None)


# The overlaps offered when rotating, in hours: how long the previous secret keeps signing.
ROTATION_OVERLAPS_H = (1, 24, 72, 168)


def _signing(merchant: Merchant | None) -> dict[str, Any] | None:
    """The merchant's signing secret's version, and the previous one's end while it still signs."""
    if merchant is None:
        return None
    until = merchant.previous_webhook_secret_valid_until
    return {"version": merchant.webhook_secret_version,
            "previous_until": until if until is not None and until > datetime.now(UTC) else None}


def _rotate_page(visit: Visit, status: int = 200, *, error: str | None = None,
                 rotated: dict[str, Any] | None = None) -> Response[str]:
    """The confirmation step (or, after it, the new secret shown once). A merchant rotates its own
    secret; an operator chooses the merchant."""
    merchant_id = visit.session.merchant_id
    merchants = [m for m in visit.queries.merchants(visit.scope) if not m["deactivated"]] if merchant_id is None else []
    merchant = visit.services.ledger.get_merchant(merchant_id) if merchant_id else None
    return html(visit.page, "rotate.html", status, error=error, rotated=rotated, merchants=merchants,
                signing=_signing(merchant), overlaps=ROTATION_OVERLAPS_H, form_id=secrets.token_urlsafe(18))


def _rotate(visit: Visit, form: FormMultiDict) -> Response[str]:
    form_id = _field(form, "form_id", 64)
    if not _FORM_ID.fullmatch(form_id):
        return _refused(visit)
    merchant_id = visit.session.merchant_id or _uuid(_field(form, "merchant_id", 40))
    overlap_text = _field(form, "overlap_hours", 5)
    if merchant_id is None:
        return _rotate_page(visit, 422, error="Choose the merchant whose secret to rotate.")
    if not overlap_text.isdigit() or int(overlap_text) not in ROTATION_OVERLAPS_H:
        return _rotate_page(visit, 422, error="Choose how long the previous secret keeps signing.")
    try:
        result = visit.services.ledger.rotate_webhook_secret(
            visit.command_id("rotate_webhook_secret", form_id), merchant_id,
            overlap=timedelta(hours=int(overlap_text)), acting_for=visit.session.merchant_id)
    except DomainError as error:  # not found (another merchant's too), deactivated, a reused form
        return _rotate_page(visit, answer_for(error).status, error=_words(error))
    version = int(result.result["secret_version"])
    log.info("console_webhook_secret_rotated", merchant_id=str(merchant_id), version=version,
             key_id=str(visit.session.key_id), replayed=result.replayed)
    # The secret is derived for this page and shown once: a form sent again (a double click)
    # rotates nothing more and shows no secret.
    rotated = {"merchant_id": str(merchant_id), "version": version,
               "previous_until": result.result["previous_secret_valid_until"],
               "secret": None if result.replayed else webhook_secret(visit.services.settings.hash_key, merchant_id,
                                                                     version)}
    return _rotate_page(visit, 200 if result.replayed else 201, rotated=rotated)


def _analytics(request: Request[Any, Any, Any], visit: Visit) -> dict[str, Any]:
    today = datetime.now(UTC).date()
    text = {name: _query(request, name) for name in ("from", "to", "currency", "merchant", "platform")}
    date_from = _day(text["from"]) or today - timedelta(days=29)
    date_to = _day(text["to"]) or today
    currency = text["currency"].upper() or None
    merchant_id = _uuid(text["merchant"])
    error = None
    if (text["from"] and _day(text["from"]) is None) or (text["to"] and _day(text["to"]) is None):
        error = "Enter the dates as YYYY-MM-DD."
    elif date_from > date_to:
        error = "The start date is after the end date."
    elif (date_to - date_from).days > 366:
        error = "Choose at most a year."
    elif currency is not None and not re.fullmatch(r"[A-Z]{3}", currency):
        error = "A currency is three letters, e.g. USD."
    elif text["merchant"] and merchant_id is None:
        error = "A merchant id is a UUID."
    base: dict[str, Any] = {
        "date_from": date_from.isoformat(), "date_to": date_to.isoformat(), "filters": text, "error": error,
        "funnel": [], "volume": [], "steps": [], "chart": None, "by_day": None, "platforms": [], "conversions": [],
        "names": [], "reasons": [], "reason_totals": [], "query": urlencode({k: v for k, v in text.items() if v})}
    if error:
        return base
    scope = visit.scope
    funnel = visit.services.views.funnel(scope, date_from=date_from, date_to=date_to, merchant_id=merchant_id,
                                         voice_platform=text["platform"] or None)
    volume = visit.services.views.volume(scope, date_from=date_from, date_to=date_to, currency=currency,
                                         merchant_id=merchant_id)
    reasons = visit.services.views.decline_reasons(scope, date_from=date_from, date_to=date_to,
                                                   merchant_id=merchant_id, voice_platform=text["platform"] or None,
                                                   currency=currency)
    # The period's reasons, most frequent first within each kind (processor declines, then risk).
    by_reason: dict[tuple[str, str], int] = {}
    for r in reasons:
        by_reason[(r["kind"], r["reason"])] = by_reason.get((r["kind"], r["reason"]), 0) + as_int(r["payments"])
    reason_totals = sorted(((kind, reason, n) for (kind, reason), n in by_reason.items()),
                           key=lambda t: (t[0] != "decline", -t[2], t[1]))
    captured_by_day: dict[str, int] = {}
    for v in volume:
        key = str(v["period_start"])
        captured_by_day[key] = captured_by_day.get(key, 0) + as_int(v["captured_count"])
    names = [("link_sent", "Link sent"), ("link_opened", "Opened"), ("code_verified", "Code verified"),
             ("identity_verified", "Identity verified"), ("card_attached", "Card"), ("paid", "Authorized")]
    totals = [(label, sum(as_int(r[key]) for r in funnel)) for key, label in names]
    captured_total = sum(captured_by_day.values()) if not text["platform"] else None
    steps = [*totals, *([("Captured", captured_total)] if captured_total is not None else [])]
    platforms: dict[str, dict[str, int]] = {}
    days: dict[str, dict[str, int]] = {}
    for r in funnel:
        for bucket in (platforms.setdefault(r["voice_platform"], {}), days.setdefault(str(r["day"]), {})):
            for key, _ in names:
                bucket[key] = bucket.get(key, 0) + as_int(r[key])
    day_keys = sorted(set(days) | (set(captured_by_day) if captured_total is not None else set()))
    series = [(label, [days.get(d, {}).get(key, 0) for d in day_keys]) for key, label in names]
    if captured_total is not None:
        series.append(("Captured", [captured_by_day.get(d, 0) for d in day_keys]))
    by_label = dict(steps)
    # Identity is asked only above the currency's threshold, so it is no step every session takes.
    pairs = [("Link sent", "Opened"), ("Opened", "Code verified"), ("Code verified", "Card"), ("Card", "Authorized"),
             ("Authorized", "Captured")]
    conversions = [(f"{a} → {b}", by_label[b], by_label[a]) for a, b in pairs if a in by_label and b in by_label]
    return {**base, "funnel": funnel, "volume": volume, "steps": steps, "conversions": conversions,
            "chart": funnel_bars(steps, chart_id="funnel-total", title="Voice-to-mobile funnel, all days")
            if any(n for _, n in steps) else None,
            "by_day": columns_by_day(day_keys, series, chart_id="funnel-days", title="Funnel steps by day")
            if day_keys else None,
            "platforms": sorted(platforms.items()), "names": names, "reasons": reasons,
            "reason_totals": reason_totals}


def _analytics_csv(report: dict[str, Any]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    # One header for three sections; a row fills the columns of its section. Columns only ever
    # get added at the end, so a spreadsheet built on an earlier download keeps its columns.
    header = ["section", "day", "voice_platform_or_currency", "link_sent", "link_opened", "code_verified",
              "identity_verified", "authorized", "authorized_count", "declined_count", "captured_count",
              "gross_captured_minor", "refunded_minor", "fees_minor", "approval_rate", "risk_declined_count",
              "card_attached", "voice_platform", "currency", "reason_kind", "reason", "payments"]
    writer.writerow(header)

    def row(section: str, **values: Any) -> list[Any]:
        return [section, *(values.get(column, "") for column in header[1:])]

    for r in report["funnel"]:
        writer.writerow(row("funnel", day=r["day"], voice_platform_or_currency=r["voice_platform"],
                            link_sent=r["link_sent"], link_opened=r["link_opened"], code_verified=r["code_verified"],
                            identity_verified=r["identity_verified"], authorized=r["paid"],
                            card_attached=r["card_attached"]))
    for v in report["volume"]:
        rate = v.get("approval_rate")
        writer.writerow(row("volume", day=v["period_start"], voice_platform_or_currency=v["currency"],
                            authorized_count=v["authorized_count"], declined_count=v["declined_count"],
                            captured_count=v["captured_count"], gross_captured_minor=v["gross_captured_minor"],
                            refunded_minor=v["refunded_minor"], fees_minor=v["fees_minor"],
                            approval_rate="" if rate is None else f"{rate:.4f}",
                            risk_declined_count=v.get("risk_declined_count", "")))
    for r in report["reasons"]:
        writer.writerow(row("reason", day=r["day"], voice_platform=r["voice_platform"], currency=r["currency"],
                            reason_kind=r["kind"], reason=r["reason"], payments=r["payments"]))
    return out.getvalue()


def _audit_filters(request: Request[Any, Any, Any]) -> dict[str, Any]:
    text = {name: _query(request, name) for name in ("aggregate", "merchant", "from", "to")}
    aggregate_id, merchant_id = _uuid(text["aggregate"]), _uuid(text["merchant"])
    day_from, day_to = _day(text["from"]), _day(text["to"])
    error = None
    if (text["aggregate"] and aggregate_id is None) or (text["merchant"] and merchant_id is None):
        error = "An aggregate or merchant id is a UUID."
    elif (text["from"] and day_from is None) or (text["to"] and day_to is None):
        error = "Enter the dates as YYYY-MM-DD."
    elif day_from and day_to and day_from > day_to:
        error = "The start date is after the end date."
    elif day_to is not None and day_to >= date.max:
        error = "The end date is out of range."
    return {"text": text, "error": error, "aggregate_id": aggregate_id, "merchant_id": merchant_id,
            "since": datetime.combine(day_from, day_start(), UTC) if day_from else None,
            "until": datetime.combine(day_to + timedelta(days=1), day_start(), UTC) if day_to else None}


def _audit_page(request: Request[Any, Any, Any], visit: Visit) -> Response[str]:
    filters = _audit_filters(request)
    after_text = _query(request, "after", 20)
    after = int(after_text) if after_text.isdigit() else 0
    rows: list[dict[str, Any]] = []
    if not filters["error"]:
        rows = visit.queries.audit_rows(visit.scope, aggregate_id=filters["aggregate_id"],
                                        merchant_id=filters["merchant_id"], since=filters["since"],
                                        until=filters["until"], from_position=after, limit=50)
    kept = {k: v for k, v in filters["text"].items() if v}
    return html(visit.page, "audit.html", 400 if filters["error"] else 200, rows=rows, filters=filters["text"],
                error=filters["error"], export_url=f"/console/audit/export?{urlencode(kept)}",
                next_url=f"/console/audit?{urlencode({**kept, 'after': rows[-1]['position']})}"
                if len(rows) == 50 else None,
                first_url=f"/console/audit?{urlencode(kept)}" if after else None)


def _breakers(services: ApiServices) -> list[dict[str, Any]]:
    """The circuit breaker of each processor this API process calls (its own, in memory)."""
    router = services.ledger.processors
    found = []
    for part in (getattr(router, "primary", None), getattr(router, "secondary", None),
                 getattr(router, "processor", None)):
        breaker = getattr(part, "breaker", None)
        if breaker is not None:
            found.append({"name": getattr(part, "name", "") or getattr(breaker, "name", ""),
                          "state": str(getattr(breaker.state, "value", breaker.state))})
    return found


RELAY_STALE_S = 30.0


def _liveness(state: dict[str, Any]) -> dict[str, str]:
    """Whether the relay and the worker are keeping up, read from what they leave behind: the
    relay publishes every outbox row within seconds; the worker's projections reach the head."""
    oldest = state["outbox"].get("oldest_s")
    relay = "alive" if oldest is None or oldest < RELAY_STALE_S else f"stalled: oldest row waiting {oldest:.0f} s"
    behind = [p["name"] for p in state["projections"] if p["lag_events"] > 0]
    worker = "caught up" if not behind else "behind on " + ", ".join(behind)
    return {"relay": relay, "worker": worker}


def _keys_page(visit: Visit, status: int = 200, *, error: str | None = None, issued: dict[str, Any] | None = None,
               notice: str = "") -> Response[str]:
    merchants = visit.queries.merchants(visit.scope)
    keys = visit.queries.api_keys(visit.scope)
    notices = {"revoked": "Key revoked; its console sessions ended.", "merchant": "Merchant registered."}
    return html(visit.page, "keys.html", status, merchants=merchants, keys=keys, roles=ROLES, error=error,
                issued=issued, notice=notices.get(notice))


def _paged_page(request: Request[Any, Any, Any], services: ApiServices, name: str, id_key: str,
                fetch: Callable[..., tuple[list[dict[str, Any]], bool]]) -> Response[Any]:
    """A list page of 25 rows, newest first, with a cursor to the next page (a cursor the scope
    cannot see gives an empty page)."""
    visit = _visit(request, services, f"/console/{name}")
    if isinstance(visit, Response):
        return visit
    after = _uuid(_query(request, "after"))
    try:
        rows, more = fetch(visit.scope, limit=25, starting_after=after)
    except ValueError:
        rows, more = [], False
    return html(visit.page, f"{name}.html", rows=rows,
                next_url=f"/console/{name}?after={rows[-1][id_key]}" if more and rows else None)

"""Every error as RFC 9457 problem+json with a stable ``code``: one mapping, one place.

Business rejections keep their domain codes; the HTTP status says what kind of no it is.
Never a stack trace, never a 500 for bad input. ``ANSWERS`` is the one table from a rejection to
its answer, for the JSON API and for the payment page's HTML alike; ``problem_body`` is the one
place a problem+json body is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
import structlog
from eventsourcing import persistence as es
from litestar import MediaType, Request, Response
from litestar.exceptions import (
    HTTPException,
    MethodNotAllowedException,
    NotFoundException,
    ValidationException,
)
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR
from psycopg_pool import PoolTimeout

from application.errors import (
    ConcurrencyConflict,
    IdempotencyKeyReused,
    NotFound,
    ProcessorRejected,
    ProcessorUnavailable,
)
from domain import errors as d

log = structlog.get_logger(__name__)
PROBLEM_JSON = "application/problem+json"
PROBLEM_TYPE_BASE = "https://docs.echotransact.example/errors/"


@dataclass(frozen=True)
class PageMessage:
    """What the customer's payment page says for an error, in words for people."""

    title: str
    text: str


INVALID_LINK = PageMessage(
    "This link is not valid",
    "Check that you opened the whole link from the text message. If it still does not work, ask for a new link.")
LINK_EXPIRED = PageMessage(
    "This payment link has expired",
    "For your security, payment links work for a short time only. Ask the merchant for a new link; you have "
    "not been charged.")
SESSION_LOCKED = PageMessage(
    "This payment is locked",
    "The code was entered wrongly too many times, so we locked this payment to protect you. You have not been "
    "charged. Ask the merchant for a new link.")
REFUSED_ON_PAGE = "We could not do that"  # the title of a refusal without a message of its own


@dataclass(frozen=True)
class Answer:
    """How one kind of rejection is answered: by the JSON API (problem+json, ``status`` and the
    error's own ``code`` and message), and by the payment page (HTML, ``page_status`` and
    ``page_message``, or the error's message under REFUSED_ON_PAGE when it has none)."""

    error: type[d.DomainError]
    status: int
    page_status: int
    page_message: PageMessage | None = None


# The one table. Most specific first: the first matching class decides. The page's statuses
# differ where a browser is better told more (410 Gone, 423 Locked) or, for the rest, keep what the
# page has always answered: 409 for a refusal the customer can do nothing about in this form,
# 422 for a field to correct.
ANSWERS: list[Answer] = [
    Answer(NotFound, 404, 404, INVALID_LINK),
    Answer(IdempotencyKeyReused, 409, 409),
    Answer(ConcurrencyConflict, 409, 409),
    Answer(ProcessorRejected, 402, 409),
    Answer(ProcessorUnavailable, 503, 409),
    Answer(d.InvalidTransition, 409, 409),
    Answer(d.SessionLocked, 409, 423, SESSION_LOCKED),
    Answer(d.LinkExpired, 409, 410, LINK_EXPIRED),
    Answer(d.AuthorizationLapsed, 409, 409),
    Answer(d.MerchantInactive, 409, 409),
    Answer(d.ResendLimitReached, 422, 409),
    Answer(d.InvalidPaymentMethod, 422, 422),
    Answer(d.DomainError, 422, 409),  # every other business rule: the request is well formed but refused
]

TITLES = {
    400: "Bad request", 401: "Unauthorized", 402: "Payment refused", 403: "Forbidden",
    404: "Not found", 405: "Method not allowed", 409: "Conflict", 413: "Request too large",
    415: "Unsupported media type", 422: "Request refused", 429: "Too many requests",
    500: "Internal error", 503: "Service unavailable",
}


class ApiProblem(Exception):
    """An error the HTTP layer itself raises (auth, idempotency, rate limits, headers)."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail
        self.headers = headers or {}
        self.extra = extra


def problem_body(status: int, code: str, detail: str, request: Request[Any, Any, Any] | None = None,
                 **extra: Any) -> dict[str, Any]:
    """The problem+json body: the RFC 9457 members, our stable ``code``, and, given the request,
    the path (``instance``) and the request id that finds its log line."""
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + code,
        "title": TITLES.get(status, "Error"),
        "status": status,
        "code": code,
        "detail": detail,
    }
    if request is not None:
        body["instance"] = request.url.path
        request_id = request.scope.get("state", {}).get("request_id")
        if request_id:
            body["request_id"] = request_id
    body.update(extra)
    return body


def problem(status: int, code: str, detail: str, request: Request[Any, Any, Any] | None = None,
            headers: dict[str, str] | None = None, **extra: Any) -> Response[dict[str, Any]]:
    return Response(problem_body(status, code, detail, request, **extra), status_code=status,
                    media_type=PROBLEM_JSON, headers=headers)


def answer_for(error: d.DomainError | type[d.DomainError]) -> Answer:
    """The table's row for a rejection (an instance or its class)."""
    cls = error if isinstance(error, type) else type(error)
    return next(answer for answer in ANSWERS if issubclass(cls, answer.error))


def status_for(error: d.DomainError) -> int:
    return answer_for(error).status


def domain_problem_body(error: d.DomainError, request: Request[Any, Any, Any] | None) -> dict[str, Any]:
    """A rejection's body: its code and message, and its details except any phone number."""
    details = {k: v for k, v in error.details.items() if k != "phone"}
    return problem_body(status_for(error), error.code, error.message, request,
                        **({"details": details} if details else {}))


def domain_error_handler(request: Request[Any, Any, Any], error: d.DomainError) -> Response[Any]:
    status = status_for(error)
    headers = {"Retry-After": "2"} if status == 503 else None
    return Response(domain_problem_body(error, request), status_code=status, media_type=PROBLEM_JSON,
                    headers=headers)


def api_problem_handler(request: Request[Any, Any, Any], error: ApiProblem) -> Response[Any]:
    return problem(error.status, error.code, error.detail, request, error.headers, **error.extra)


def _query_name(request: Request[Any, Any, Any], key: str) -> str:
    """A parameter's name as the client sends it (``from``), where Litestar names its Python one
    (``date_from``)."""
    try:
        parameter = request.route_handler.parsed_fn_signature.parameters.get(key)
    except (AttributeError, KeyError):  # no handler resolved for this request
        return key
    alias = getattr(getattr(parameter, "kwarg_definition", None), "query", None)
    return alias if isinstance(alias, str) else key


def validation_handler(request: Request[Any, Any, Any], error: ValidationException) -> Response[Any]:
    fields = []
    for item in error.extra or []:
        if isinstance(item, dict):
            key = item.get("key")
            fields.append({"field": _query_name(request, key) if key else item.get("source") or "body",
                           "message": item.get("message", "invalid")})
        else:
            fields.append({"field": "body", "message": str(item)})
    detail = error.detail or "the request is not valid"
    if not fields:
        fields.append({"field": "body", "message": detail})
    return problem(400, "validation_error", detail, request, errors=fields)


def http_error_handler(request: Request[Any, Any, Any], error: HTTPException) -> Response[Any]:
    status = error.status_code
    code = {
        404: "not_found", 405: "method_not_allowed", 413: "request_too_large",
        415: "unsupported_media_type", 401: "unauthorized", 403: "forbidden",
    }.get(status, "bad_request" if status < 500 else "internal_error")
    if isinstance(error, NotFoundException | MethodNotAllowedException):
        detail = f"no route {request.method} {request.url.path}" if status == 404 else error.detail
    else:
        detail = error.detail if status < 500 else "something went wrong on our side"
    return problem(status, code, detail, request)


def undecodable_body_handler(request: Request[Any, Any, Any], error: Exception) -> Response[Any]:
    """msgspec raises these for a body that is not UTF-8 or nests too deeply; Litestar passes
    them through as they are. They are the client's mistake."""
    detail = ("the body is not valid UTF-8" if isinstance(error, UnicodeDecodeError)
              else "the JSON body is nested too deeply")
    return problem(400, "bad_request", detail, request)


# The database is down, restarting, or every connection is busy: the request did nothing that
# a retry would repeat wrongly (commands are idempotent), so the caller is told to retry.
DATABASE_UNAVAILABLE = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout, es.OperationalError,
                        es.InterfaceError)


def unavailable_handler(request: Request[Any, Any, Any], error: Exception) -> Response[Any]:
    log.warning("database_unavailable", error_type=type(error).__name__, path=request.url.path)
    return problem(503, "service_unavailable", "the ledger's database is unavailable; retry shortly", request,
                   {"Retry-After": "2"})


def internal_error_handler(request: Request[Any, Any, Any], error: Exception) -> Response[Any]:
    log.error("unhandled_error", error_type=type(error).__name__, path=request.url.path, exc_info=error)
    return problem(HTTP_500_INTERNAL_SERVER_ERROR, "internal_error",
                   "something went wrong on our side; the request id helps us find it", request)


EXCEPTION_HANDLERS: dict[Any, Any] = {
    d.DomainError: domain_error_handler,
    ApiProblem: api_problem_handler,
    ValidationException: validation_handler,
    HTTPException: http_error_handler,
    UnicodeDecodeError: undecodable_body_handler,
    RecursionError: undecodable_body_handler,
    **dict.fromkeys(DATABASE_UNAVAILABLE, unavailable_handler),
    Exception: internal_error_handler,
}

__all__ = ["ANSWERS", "EXCEPTION_HANDLERS", "PROBLEM_JSON", "Answer", "ApiProblem", "MediaType", "PageMessage",
           "answer_for", "domain_problem_body", "problem", "problem_body", "status_for"]

"""Every error as RFC 9457 problem+json with a stable ``code``: one mapping, one place.

Business rejections keep their domain codes; the HTTP status says what kind of no it is.
Never a stack trace, never a 500 for bad input.
"""

from __future__ import annotations

from typing import Any

import structlog
from litestar import MediaType, Request, Response
from litestar.exceptions import (
    HTTPException,
    MethodNotAllowedException,
    NotFoundException,
    ValidationException,
)
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

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

# Most specific first: the first matching class decides the status.
STATUS_BY_ERROR: list[tuple[type[d.DomainError], int]] = [
    (NotFound, 404),
    (IdempotencyKeyReused, 409),
    (ConcurrencyConflict, 409),
    (ProcessorRejected, 402),
    (ProcessorUnavailable, 503),
    (d.InvalidTransition, 409),
    (d.SessionLocked, 409),
    (d.LinkExpired, 409),
    (d.AuthorizationLapsed, 409),
    (d.MerchantInactive, 409),
    (d.DomainError, 422),  # every other business rule: the request is well formed but refused
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


def problem(status: int, code: str, detail: str, request: Request[Any, Any, Any] | None = None,
            headers: dict[str, str] | None = None, **extra: Any) -> Response[dict[str, Any]]:
    body: dict[str, Any] = {
        "type": f"https://docs.echotransact.example/errors/{code}",
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
    return Response(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def status_for(error: d.DomainError) -> int:
    return next(status for cls, status in STATUS_BY_ERROR if isinstance(error, cls))


def domain_error_handler(request: Request[Any, Any, Any], error: d.DomainError) -> Response[Any]:
    status = status_for(error)
    headers = {"Retry-After": "2"} if status == 503 else None
    details = {k: v for k, v in error.details.items() if k != "phone"}
    return problem(status, error.code, error.message, request, headers, **({"details": details} if details else {}))


def api_problem_handler(request: Request[Any, Any, Any], error: ApiProblem) -> Response[Any]:
    return problem(error.status, error.code, error.detail, request, error.headers, **error.extra)


def validation_handler(request: Request[Any, Any, Any], error: ValidationException) -> Response[Any]:
    fields = []
    for item in error.extra or []:
        if isinstance(item, dict):
            fields.append({"field": item.get("key") or item.get("source") or "body",
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
    Exception: internal_error_handler,
}

__all__ = ["EXCEPTION_HANDLERS", "PROBLEM_JSON", "ApiProblem", "MediaType", "problem", "status_for"]

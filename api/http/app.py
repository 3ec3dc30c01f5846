"""Builds the Litestar application from its services (given by the composition root)."""

from __future__ import annotations

from typing import Any

import anyio
from litestar import Litestar, Request
from litestar.config.response_cache import ResponseCacheConfig
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme
from litestar.types import ASGIApp

from api.http.auth import Principal, authenticate, authenticate_at_once
from api.http.console import CONSOLE_PREFIX, ConsoleController
from api.http.controllers.customers import CustomerController
from api.http.controllers.disputes import DisputeController
from api.http.controllers.merchants import MerchantController
from api.http.controllers.payments import BalanceController, PaymentController
from api.http.controllers.payouts import PayoutController
from api.http.controllers.processor_events import PROCESSOR_EVENTS_PREFIX, SECURITY_SCHEMES, ProcessorEventController
from api.http.controllers.reconciliations import ReconciliationController
from api.http.controllers.reports import AnalyticsController, AuditController
from api.http.controllers.sessions import PaymentSessionController
from api.http.health import Dependencies, HealthController
from api.http.middleware import RequestContextMiddleware
from api.http.pages import PAGE_PREFIX, PaymentPageController
from api.http.problems import EXCEPTION_HANDLERS, ApiProblem
from api.http.services import ApiServices

MAX_BODY_BYTES = 64 * 1024
JSON_TYPES = ("application/json",)


def _json_only(request: Request[Any, Any, Any]) -> None:
    """Commands take JSON only: anything else is 415, before the body is parsed. The payment
    page and the console take HTML forms and check them themselves."""
    if request.method in ("POST", "PATCH", "PUT") and not request.url.path.startswith((PAGE_PREFIX, CONSOLE_PREFIX)):
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        length = request.headers.get("content-length")
        if (content_type or (length and length != "0")) and content_type not in JSON_TYPES:
            raise ApiProblem(415, "unsupported_media_type", "send JSON with 'Content-Type: application/json'")


def asgi_app(services: ApiServices) -> ASGIApp:
    """What a server runs: the app inside the request-id and logging middleware, outside
    Litestar so requests that match no route get an id and a log line too; around them the
    request metrics and ``/metrics`` (api/metrics.py), and, with tracing on, the request's span."""
    from api import tracing
    from api.metrics import MetricsMiddleware, api_registry

    app: ASGIApp = RequestContextMiddleware(MetricsMiddleware(create_app(services), api_registry(services.pool)))
    return tracing.TracingMiddleware(app) if tracing.enabled() else app


def create_app(services: ApiServices | None = None, *, health: Dependencies | None = None) -> Litestar:
    deps = services.health if services else health
    assert deps is not None, "the health checks need the servers' URLs"
    dependencies: dict[str, Provide] = {"deps": Provide(lambda: deps, use_cache=True, sync_to_thread=False)}
    handlers: list[Any] = [HealthController]
    if services is not None:

        async def provide_principal(request: Request[Any, Any, Any]) -> Principal:
            principal: Principal = request.state.principal
            return principal

        dependencies["services"] = Provide(lambda: services, use_cache=True, sync_to_thread=False)
        dependencies["principal"] = Provide(provide_principal)
        handlers += [PaymentSessionController, PaymentController, BalanceController, PayoutController,
                     DisputeController, AnalyticsController, AuditController, ReconciliationController,
                     MerchantController, PaymentPageController, ProcessorEventController, ConsoleController,
                     CustomerController]
    async def before_request(request: Request[Any, Any, Any]) -> None:
        # Who is calling comes first: a caller without a key learns nothing about the body.
        # Processors sign their notifications instead (api/http/controllers/processor_events.py).
        if (services is not None and request.url.path.startswith("/v1/")
                and not request.url.path.startswith(PROCESSOR_EVENTS_PREFIX)
                and not authenticate_at_once(request, services)):
            await anyio.to_thread.run_sync(authenticate, request, services)
        _json_only(request)

    return Litestar(
        route_handlers=handlers,
        dependencies=dependencies,
        exception_handlers=EXCEPTION_HANDLERS,
        before_request=before_request,
        request_max_body_size=MAX_BODY_BYTES,
        response_cache_config=ResponseCacheConfig(),
        openapi_config=OpenAPIConfig(
            title="EchoTransact", version="1.0.0",
            description="Payments for voice commerce: idempotent commands, queries from projections.",
            components=Components(security_schemes={
                "bearer": SecurityScheme(type="http", scheme="bearer", description="an EchoTransact API key"),
                **SECURITY_SCHEMES}),
            security=[{"bearer": []}],
        ),
        debug=False,
    )

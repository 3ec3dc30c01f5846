"""OpenTelemetry traces: one trace from an HTTP request through its commands, the saved events
(their envelopes keep the W3C traceparent, application/envelope.py), the relay's Kafka message
(a ``traceparent`` header, adapters/kafka/relay.py), the projection's apply (projections/worker.py)
and the webhook's delivery (adapters/notifications/webhooks.py).

On only when OTEL_EXPORTER_OTLP_ENDPOINT is set (``configure_tracing``; the standard OTEL_*
variables tune the exporter): then each process installs the SDK's tracer provider exporting over
OTLP/HTTP in batches. Otherwise nothing is installed: no middleware, no spans, envelopes carry no
context, and the adapters see the API's no-op tracer; the cost is a few ``is None`` checks.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from application.envelope import set_trace_context_source

# ASGI's shapes, loosely: a background process that imports this need not import Litestar.
Scope = Any
Message = Any
Receive = Callable[..., Awaitable[Any]]
Send = Callable[..., Awaitable[None]]
ASGIApp = Callable[..., Awaitable[None]]

__all__ = ["ASGIApp", "Message", "Receive", "Scope", "Send", "TracingMiddleware", "add_trace_ids", "configure_tracing",
           "enabled", "install", "tracer", "uninstall"]

TRACER_NAME = "echotransact"
_propagator = TraceContextTextMapPropagator()
_enabled = False


def enabled() -> bool:
    return _enabled


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def current_traceparent() -> str | None:
    """The active span's context as a W3C traceparent, or None outside a span."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def install(provider: Any) -> None:
    """Use ``provider`` (an SDK TracerProvider) for this process's traces: the global provider
    (the adapters read it through the API), spans around commands and requests, and the trace
    context in every envelope saved from now on. The global provider can be set only once per
    process; a test that installs its own keeps it and only toggles ``install``/``uninstall``."""
    global _enabled
    if not isinstance(trace.get_tracer_provider(), type(provider)):
        trace.set_tracer_provider(provider)
    set_trace_context_source(current_traceparent)
    _enabled = True


def uninstall() -> None:
    """No new spans from our code and no trace context in new envelopes."""
    global _enabled
    set_trace_context_source(None)
    _enabled = False


def configure_tracing(service_name: str, endpoint: str | None) -> bool:
    """Export this process's spans over OTLP/HTTP to ``endpoint`` (OTEL_EXPORTER_OTLP_ENDPOINT,
    the collector's base URL; the exporter adds /v1/traces). No endpoint: off, nothing loaded."""
    if not endpoint:
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": f"echotransact-{service_name}"}))
    # The exporter reads OTEL_EXPORTER_OTLP_ENDPOINT (and _HEADERS, _TIMEOUT...) itself.
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    install(provider)
    return True


def add_trace_ids(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A structlog processor: the active span's trace_id and span_id on every log line."""
    if _enabled:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            event.setdefault("trace_id", f"{context.trace_id:032x}")
            event.setdefault("span_id", f"{context.span_id:016x}")
    return event


def command_span(command_name: str) -> Any:
    """The span around one command (its save included); the envelopes it saves carry it."""
    return tracer().start_as_current_span(f"command {command_name}", attributes={"echotransact.command": command_name})


class TracingMiddleware:
    """A server span per HTTP request, continuing the caller's ``traceparent`` if it sent one,
    named after the route template (never the path: ids and link tokens stay out of traces)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _enabled:
            await self.app(scope, receive, send)
            return
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])
                   if k in (b"traceparent", b"tracestate")}
        parent = _propagator.extract(carrier) if carrier else None
        method = scope.get("method", "GET")
        status: list[int] = []
        with tracer().start_as_current_span(f"{method}", context=parent, kind=SpanKind.SERVER,
                                            start_time=time.time_ns()) as span:

            async def send_with_status(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status.append(message["status"])
                await send(message)

            try:
                await self.app(scope, receive, send_with_status)
            finally:
                route = scope.get("path_template") or "unmatched"
                span.update_name(f"{method} {route}")
                span.set_attribute("http.request.method", method)
                span.set_attribute("http.route", route)
                if status:
                    span.set_attribute("http.response.status_code", status[0])
                    if status[0] >= 500:
                        span.set_status(Status(StatusCode.ERROR))


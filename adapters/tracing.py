"""Continuing a trace that came with an event (its envelope's W3C ``traceparent``), through the
OpenTelemetry API only: api/tracing.py installs the SDK when tracing is configured; without it
``active()`` is false and callers skip their spans altogether."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["active", "parent", "traceparent", "tracer"]

_propagator = TraceContextTextMapPropagator()


def active() -> bool:
    """Whether this process records spans (an SDK tracer provider is installed)."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def tracer() -> trace.Tracer:
    return trace.get_tracer("echotransact")


def parent(context: str) -> Context:
    """The context a ``traceparent`` names, to start a child span in."""
    return _propagator.extract({"traceparent": context})


def traceparent(span: trace.Span) -> str:
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"

"""One trace per job: OpenTelemetry spans over OTLP/HTTP, W3C Trace Context between processes.

Configured only by OpenTelemetry's own variables, which the SDK reads itself:
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) turns exporting on,
``OTEL_SERVICE_NAME`` names the process (else the deployable's default), ``OTEL_TRACES_SAMPLER``
(and ``_ARG``) picks the sampler. With no endpoint the tracer is OpenTelemetry's no-op one: no
span is recorded or exported, yet a trace context that arrives (an event's ``traceparent``) is
passed on as it came, so logs and events still name the caller's trace.

Each process has one tracer provider of its own, not the global one: inside ``llama stack run``
llama-stack's telemetry owns the global provider. Short-lived processes call :func:`flush`
before they exit; a span buffered in a batch processor is lost otherwise.

A span begun by :func:`start` (a loop body that is not re-indented, such as an epoch) belongs
to the :func:`span` it was begun in: an exception that leaves that span first ends it, with
the exception recorded and an error status, so a failed epoch is exported as failed.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from typing import Any, Final

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

# The CloudEvents distributed-tracing extension's attributes, and the pipeline parameters.
TRACE_KEYS: Final = ("traceparent", "tracestate")
ENDPOINT_VARS: Final = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")

_PROPAGATOR: Final = TraceContextTextMapPropagator()
_lock = threading.Lock()
_provider: Any = None
# The spans :func:`start` began inside the innermost :func:`span`, with their context tokens.
_started: ContextVar[list[tuple[trace.Span, object]] | None] = ContextVar(
    "kfp_trainer_started_spans", default=None
)


def enabled(env: Mapping[str, str] | None = None) -> bool:
    """True when an OTLP endpoint is configured (spans are recorded and exported)."""
    env = os.environ if env is None else env
    return any(env.get(name) for name in ENDPOINT_VARS)


def init(service_name: str, env: Mapping[str, str] | None = None) -> None:
    """Build this process's tracer provider once; ``service_name`` unless OTEL_SERVICE_NAME."""
    global _provider
    with _lock:
        if _provider is not None:
            return
        env = os.environ if env is None else env
        if not enabled(env):
            _provider = trace.NoOpTracerProvider()
            return
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        attributes = {} if env.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
        provider = TracerProvider(resource=Resource.create(attributes))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        _provider = provider


def tracer(name: str) -> trace.Tracer:
    """A tracer of this process's provider (no-op until :func:`init`, or without an endpoint)."""
    if _provider is None:
        return trace.NoOpTracer()
    return _provider.get_tracer(name)


def flush(timeout_s: float = 10.0) -> None:
    """Export every finished span now (before a short-lived process exits)."""
    force_flush = getattr(_provider, "force_flush", None)
    if force_flush is not None:
        force_flush(int(timeout_s * 1000))


def shutdown() -> None:
    """Flush and stop exporting (a worker or server going away)."""
    global _provider
    with _lock:
        provider, _provider = _provider, None
    stop = getattr(provider, "shutdown", None)
    if stop is not None:
        stop()


def carrier() -> dict[str, str]:
    """The active span's ``traceparent`` (and ``tracestate``); {} when there is none."""
    out: dict[str, str] = {}
    _PROPAGATOR.inject(out)
    return {k: v for k, v in out.items() if k in TRACE_KEYS and v}


def context_of(values: Mapping[str, Any] | None) -> otel_context.Context | None:
    """The trace context named by ``traceparent``/``tracestate`` in ``values``; None if absent."""
    found = {k: str(values[k]) for k in TRACE_KEYS if values and values.get(k)}
    if "traceparent" not in found:
        return None
    extracted = _PROPAGATOR.extract(found)
    if not trace.get_current_span(extracted).get_span_context().is_valid:
        return None
    return extracted


@contextlib.contextmanager
def span(
    tracer_name: str,
    name: str,
    *,
    parent: Mapping[str, Any] | otel_context.Context | None = None,
    kind: trace.SpanKind = trace.SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[trace.Span]:
    """A current span; ``parent`` (a carrier or a context) wins over the active one.

    Exceptions are recorded on the span (error status) and re-raised. Spans :func:`start`
    began inside it and did not end are ended first: with the exception when one leaves.
    """
    context = parent if isinstance(parent, otel_context.Context) else context_of(parent)
    started: list[tuple[trace.Span, object]] = []
    outer = _started.set(started)
    try:
        with tracer(tracer_name).start_as_current_span(
            name, context=context, kind=kind, attributes=_attributes(attributes)
        ) as current:
            try:
                yield current
            except BaseException as exc:
                _end_started(started, exc)
                raise
            finally:
                _end_started(started, None)
    finally:
        _started.reset(outer)


def _end_started(started: list[tuple[trace.Span, object]], exc: BaseException | None) -> None:
    """End what :func:`start` left open, innermost first, restoring each previous context."""
    while started:
        current, token = started.pop()
        if exc is not None:
            current.record_exception(exc)
            current.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        current.end()
        otel_context.detach(token)


def start(
    tracer_name: str,
    name: str,
    *,
    attributes: Mapping[str, Any] | None = None,
) -> tuple[trace.Span, object]:
    """Start a child of the active span and make it current, without a ``with`` block.

    For a loop body that should not be re-indented: ``end(*started)`` closes it. Begun inside
    a :func:`span`, it is ended by that span if an exception leaves first (error status).
    """
    current = tracer(tracer_name).start_span(name, attributes=_attributes(attributes))
    token = otel_context.attach(trace.set_span_in_context(current))
    started = _started.get()
    if started is not None:
        started.append((current, token))
    return current, token


def end(current: trace.Span, token: object, attributes: Mapping[str, Any] | None = None) -> None:
    """Set ``attributes``, end the span :func:`start` began and restore the previous one."""
    started = _started.get()
    if started is not None and (current, token) in started:
        started.remove((current, token))
    current.set_attributes(_attributes(attributes))
    current.end()
    otel_context.detach(token)


def _attributes(values: Mapping[str, Any] | None) -> dict[str, Any]:
    """Span attributes: None left out, other non-primitive values as text."""
    out: dict[str, Any] = {}
    for key, value in (values or {}).items():
        if value is None:
            continue
        out[key] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return out


__all__ = [
    "TRACE_KEYS",
    "carrier",
    "context_of",
    "enabled",
    "end",
    "flush",
    "init",
    "shutdown",
    "span",
    "start",
    "tracer",
]

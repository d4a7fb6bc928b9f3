"""Where the provider's part of a job's trace starts: llama-stack's request span.

llama-stack 0.2.12 keeps its own span ids (not OpenTelemetry's context) for each request. A
client that sent ``traceparent`` has it on the request's root span: the job continues the
client's trace. Otherwise the job continues llama-stack's own trace, whose id the client got in
the ``x-trace-id`` answer header. An active OpenTelemetry span (library use) wins over both.
"""

from __future__ import annotations

from opentelemetry import context as otel_context
from opentelemetry import trace

from pipelines import tracing


def request_context() -> otel_context.Context | None:
    """The parent for the provider's span; None: the active context (or a new trace)."""
    if trace.get_current_span().get_span_context().is_valid:
        return None
    from llama_stack.providers.utils.telemetry import tracing as stack_tracing

    span = stack_tracing.get_current_span()
    if span is None:
        return None
    client = tracing.context_of(span.attributes or {})
    if client is not None:
        return client
    try:
        parent = trace.SpanContext(
            trace_id=int(span.trace_id, 16),
            span_id=int(span.span_id, 16),
            is_remote=True,
            trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
        )
    except (TypeError, ValueError):
        return None
    if not parent.is_valid:
        return None
    return trace.set_span_in_context(trace.NonRecordingSpan(parent))

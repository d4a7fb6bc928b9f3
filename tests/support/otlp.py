"""An OTLP/HTTP trace receiver on 127.0.0.1, standing in for an OpenTelemetry Collector.

It takes what the SDK's OTLP/HTTP exporter sends (``POST /v1/traces``, protobuf, optionally
gzip) and decodes it with ``opentelemetry-proto``, as a collector does, answering with an
``ExportTraceServiceResponse``. Anything else gets the status a collector gives (404, 415, 400).
Point ``OTEL_EXPORTER_OTLP_ENDPOINT`` at :attr:`OtlpReceiver.url`.
"""

from __future__ import annotations

import gzip
import threading
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from tests.support.loopback import LoopbackHTTPServer, QuietHandler, wait_for

PROTOBUF = "application/x-protobuf"


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as the receiver decoded it (ids as W3C hex)."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    service: str
    scope: str
    kind: int
    attributes: dict[str, Any] = field(default_factory=dict)
    start_ns: int = 0
    end_ns: int = 0
    status_code: int = 0  # 0 unset, 1 ok, 2 error
    status_message: str = ""
    events: tuple[tuple[str, dict[str, Any]], ...] = ()  # (name, attributes), in order


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind) if kind else None


def decode(body: bytes) -> list[ReceivedSpan]:
    """The spans of one ExportTraceServiceRequest. :raises DecodeError: not one."""
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        name=span.name,
                        service=str(resource.get("service.name", "")),
                        scope=scope_spans.scope.name,
                        kind=span.kind,
                        attributes={kv.key: _value(kv.value) for kv in span.attributes},
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        status_code=span.status.code,
                        status_message=span.status.message,
                        events=tuple(
                            (e.name, {kv.key: _value(kv.value) for kv in e.attributes})
                            for e in span.events
                        ),
                    )
                )
    return spans


class OtlpReceiver(LoopbackHTTPServer):
    """``with OtlpReceiver() as otlp: env["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp.url``."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self._lock = threading.Lock()
        outer = self

        class Handler(QuietHandler):
            def _answer(self, status: int, body: bytes, ctype: str = PROTOBUF) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                body = self.read_body()
                if self.path != "/v1/traces":
                    return self._answer(404, b"only /v1/traces here", "text/plain")
                if (self.headers.get("Content-Type") or "").split(";")[0] != PROTOBUF:
                    return self._answer(415, b"send application/x-protobuf", "text/plain")
                try:
                    if self.headers.get("Content-Encoding") == "gzip":
                        body = gzip.decompress(body)
                    spans = decode(body)
                except (OSError, DecodeError) as exc:
                    return self._answer(400, f"not an OTLP request: {exc}".encode(), "text/plain")
                with outer._lock:
                    outer.spans.extend(spans)
                    outer.requests += 1
                self._answer(200, ExportTraceServiceResponse().SerializeToString())

        super().__init__(Handler)

    def received(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self.spans)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [s for s in self.received() if s.trace_id == trace_id]

    def named(self, name: str) -> list[ReceivedSpan]:
        return [s for s in self.received() if s.name == name]

    def wait_for_span(self, name: str, timeout: float = 30.0, count: int = 1) -> list[ReceivedSpan]:
        """The spans called ``name``, once at least ``count`` arrived."""
        return wait_for(
            lambda: (found := self.named(name)) and len(found) >= count and found,
            timeout,
            f"{count} span(s) named {name!r} (got {sorted({s.name for s in self.received()})})",
        )


def children(spans: list[ReceivedSpan], parent: ReceivedSpan) -> list[ReceivedSpan]:
    return [s for s in spans if s.parent_span_id == parent.span_id]

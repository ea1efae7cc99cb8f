"""OpenTelemetry traces that follow a job: CreateJob -> outbox -> NATS -> worker -> SUCCEEDED.

Tracing is off unless TUNEFORGE_TRACING says where spans go (`configure`, once per process: the services
process in services.kit.runtime, the worker in trainer_worker.agent.main):

- `off` (the default): the OpenTelemetry API's no-op tracer; nothing is recorded or exported, and no
  `traceparent` is written to outbox rows or message headers.
- `console`: each ended span as JSON on stdout (the SDK's ConsoleSpanExporter).
- `file`: one JSON object a line per ended span, appended to TUNEFORGE_TRACING_FILE (`JsonLinesExporter`;
  several processes may append to the same file). Tests and the demo read it back.
- `otlp`: OTLP/gRPC to a collector, batched; the exporter reads the standard OTEL_EXPORTER_OTLP_* variables
  (OTEL_EXPORTER_OTLP_ENDPOINT, default http://localhost:4317).

The trace context crosses processes as a W3C `traceparent`: in gRPC metadata (a client may send one), in
the outbox row that a state change writes (services.kit.outbox) and in the NATS headers of every message
published with tuneforge_core.nats.publish (`inject` / `extract`). A consumer starts its span as a child of
the message's context (`consumer_span`).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["Span", "SpanKind", "Status", "StatusCode", "configure", "consumer_span", "context_of", "detached",
           "enabled", "extract", "ids", "inject", "span", "tracer"]

MODES: tuple[str, ...] = ("off", "console", "file", "otlp")
TRACEPARENT = "traceparent"
TRACER_NAME = "tuneforge"

_propagator = TraceContextTextMapPropagator()
_configured: str | None = None
_lock = threading.Lock()


def tracer() -> trace.Tracer:
    """The tracer every TuneForge span comes from (a no-op one while tracing is off)."""
    return trace.get_tracer(TRACER_NAME)


def enabled() -> bool:
    """Whether this process records spans (`configure` set an exporter)."""
    return _configured not in (None, "off")


def configure(mode: str, file: str = "", *, service_name: str) -> None:
    """Sets up this process' tracer provider once (later calls are no-ops): spans go where `mode` says
    (see the module doc); the SDK flushes and stops the exporter at exit. A mode this module does not know,
    or `file` without a path, is a ValueError naming the setting."""
    global _configured
    if mode not in MODES:
        raise ValueError(f"unknown tracing mode '{mode}' (TUNEFORGE_TRACING): use one of {', '.join(MODES)}")
    if mode == "file" and not file:
        raise ValueError("TUNEFORGE_TRACING=file needs TUNEFORGE_TRACING_FILE (the JSON-lines file to "
                         "append to)")
    with _lock:
        if _configured is not None:
            return
        _configured = mode
        if mode == "off":
            return
        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        if mode == "console":
            provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        elif mode == "file":
            provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(Path(file))))
        else:  # loaded only when asked for: it brings its own gRPC client
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)


class JsonLinesExporter(SpanExporter):
    """Appends each span as one JSON line (name, kind, trace_id, span_id, parent_span_id, start/end in ns,
    status, attributes, service) to `path`; one write per batch, so processes sharing the file do not
    interleave within a line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = [json.dumps(span_record(s)) + "\n" for s in spans]
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, "".join(lines).encode())
            finally:
                os.close(fd)
        except OSError:
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def span_record(span: ReadableSpan) -> dict[str, object]:
    """One ended SDK span as the plain dict `JsonLinesExporter` writes."""
    ctx = span.get_span_context()
    trace_id, span_id = (ctx.trace_id, ctx.span_id) if ctx is not None else (0, 0)
    parent = span.parent
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": trace.format_trace_id(trace_id),
        "span_id": trace.format_span_id(span_id),
        "parent_span_id": trace.format_span_id(parent.span_id) if parent is not None else "",
        "start_time_ns": span.start_time,
        "end_time_ns": span.end_time,
        "status": span.status.status_code.name,
        "attributes": {k: v if isinstance(v, (str, int, float, bool)) else str(v)
                       for k, v in (span.attributes or {}).items()},
        "service": str(span.resource.attributes.get("service.name", "")),
    }


def current_traceparent() -> str | None:
    """The W3C traceparent of the current span, or None when no span is recording (tracing off)."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get(TRACEPARENT) or None


def inject(headers: dict[str, str] | None = None) -> dict[str, str]:
    """`headers` plus the current span's traceparent (unless they carry one already)."""
    out = dict(headers or {})
    if TRACEPARENT not in out:
        _propagator.inject(out)
    return out


def extract(carrier: Mapping[str, str] | None) -> otel_context.Context:
    """The context a traceparent in `carrier` (message headers, metadata) names; the empty one without."""
    return _propagator.extract(dict(carrier or {}))


def context_of(traceparent: str | None) -> otel_context.Context:
    return extract({TRACEPARENT: traceparent} if traceparent else None)


@contextlib.contextmanager
def span(name: str, *, parent: otel_context.Context | None = None, kind: SpanKind = SpanKind.INTERNAL,
         attributes: Mapping[str, str | int] | None = None) -> Iterator[Span]:
    """A span current inside the block (child of `parent` when given, else of the current span); an
    exception ends it with an error status and is re-raised."""
    with tracer().start_as_current_span(name, context=parent, kind=kind,
                                        attributes=dict(attributes or {})) as current:
        yield current


@contextlib.contextmanager
def consumer_span(name: str, headers: Mapping[str, str] | None,
                  attributes: Mapping[str, str | int] | None = None) -> Iterator[Span]:
    """A CONSUMER span for handling one message, child of the context its headers carry."""
    with span(name, parent=extract(headers), kind=SpanKind.CONSUMER, attributes=attributes) as current:
        yield current


@contextlib.contextmanager
def detached() -> Iterator[None]:
    """Runs the block with no current span: what it publishes starts no span in any trace (a worker's
    periodic progress reports, which would make a long job's trace grow without end)."""
    token = otel_context.attach(otel_context.Context())
    try:
        yield
    finally:
        otel_context.detach(token)


def ids() -> tuple[str, str] | None:
    """(trace_id, span_id) of the current span in hex, or None when none is recording."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return trace.format_trace_id(ctx.trace_id), trace.format_span_id(ctx.span_id)

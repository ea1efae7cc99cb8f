"""Log lines of every TuneForge process, as text or as JSON lines (TUNEFORGE_LOG_FORMAT).

JSON lines (python-json-logger) carry `timestamp` (ISO 8601, UTC), `level`, `logger`, `message`, and, when
known, `organization` (the caller of the RPC being served: services.kit.telemetry adds a filter for it),
`job_id` (a log call's `extra={"job_id": ...}`, else the job this context works on: `job_context`) and
`exc_info` for exceptions, and `trace_id` / `span_id` while an OpenTelemetry span is recording
(`TraceFilter`; tuneforge_core.tracing). Text lines stay as they always were.

Both the services (services.kit.runtime.configure_logging) and the trainer worker use `configure`.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
from collections.abc import Iterator, Sequence
from typing import Literal, TextIO

from opentelemetry import trace
from pythonjsonlogger.json import JsonFormatter

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
# The attributes a JSON line always has, renamed to their JSON keys; `timestamp` is added by the formatter.
JSON_FIELDS = "%(levelname)s %(name)s %(message)s"
JSON_RENAMES = {"levelname": "level", "name": "logger"}
# Loggers of libraries that say too much at INFO.
NOISY = ("nats", "grpc", "botocore", "urllib3", "alembic")

# The job the current context works on (a worker's current job, a consumer's message), for `job_id`.
_job: contextvars.ContextVar[str] = contextvars.ContextVar("tuneforge_log_job", default="")


@contextlib.contextmanager
def job_context(job_id: str) -> Iterator[None]:
    """Log lines written inside carry `job_id` (unless the call names another in `extra=`)."""
    token = _job.set(job_id)
    try:
        yield
    finally:
        _job.reset(token)


def set_job(job_id: str) -> None:
    """Sets the job of the current context (a task's own copy: asyncio tasks copy the context)."""
    _job.set(job_id)


class JobFilter(logging.Filter):
    """Gives a record `job_id` from the context when its log call did not pass one with `extra=`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "job_id", ""):
            job_id = _job.get()
            if job_id:
                record.job_id = job_id
        return True


class TraceFilter(logging.Filter):
    """Gives a record `trace_id` and `span_id` (hex, as exporters write them) of the span current where the
    log call was made, when one is recording (tracing on: tuneforge_core.tracing)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            record.trace_id = trace.format_trace_id(ctx.trace_id)
            record.span_id = trace.format_span_id(ctx.span_id)
        return True


def json_formatter() -> logging.Formatter:
    return JsonFormatter(JSON_FIELDS, rename_fields=JSON_RENAMES, timestamp=True)


def handler(log_format: str = "text", filters: Sequence[logging.Filter] = (),
            stream: TextIO | None = None) -> logging.Handler:
    """A handler writing `log_format` lines ("text" or "json") to `stream` (stderr), with `JobFilter`,
    `TraceFilter` and `filters` on it (handler filters see the records of every logger that propagates to
    it)."""
    if log_format not in ("text", "json"):
        raise ValueError(f"unknown log format '{log_format}' (TUNEFORGE_LOG_FORMAT): use text or json")
    out = logging.StreamHandler(stream if stream is not None else sys.stderr)
    out.setFormatter(json_formatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    out.addFilter(JobFilter())
    out.addFilter(TraceFilter())
    for extra in filters:
        out.addFilter(extra)
    return out


def configure(level: str, log_format: str = "text", *, filters: Sequence[logging.Filter] = ()) -> None:
    """The process' logging: one `handler` on the root logger at `level` (as logging.basicConfig, a
    no-op when the root logger already has handlers), libraries' chatter at WARNING."""
    logging.basicConfig(level=level.upper(), handlers=[handler(log_format, filters)])
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)

"""What the server's call handling shares (services.kit.pipeline), and the tracing interceptor.

Domain code raises `tuneforge_core.errors` exceptions (it knows nothing of gRPC); `abort_with` turns them,
and anything unexpected, into a google.rpc.Status (see `status_from_exception`), bounded so that it fits
the trailers a client accepts (`bounded_status`) however much of the request it quotes.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.kit import telemetry
from tuneforge_core import tracing
from tuneforge_core.errors import status_from_exception

# What a status may take of the trailers: gRPC clients refuse trailers over 8 KiB by default, and the call
# then fails with RESOURCE_EXHAUSTED and says nothing of why it was refused.
TRAILER_BUDGET_BYTES = 7800
MESSAGE_BYTES = 512
TEXT_BYTES = 256


def _cut(text: str, limit: int) -> str:
    """`text` within `limit` UTF-8 bytes, marked where it was cut."""
    data = text.encode(errors="replace")
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode(errors="ignore") + "…"


def _trailer_bytes(status: status_pb2.Status) -> int:
    """What `status` takes of the trailers: grpc-status-details-bin (base64) and grpc-message, whose bytes
    outside printable ASCII are percent-encoded."""
    message = status.message.encode(errors="replace")
    encoded = sum(1 if 0x20 <= b < 0x7F and b != 0x25 else 3 for b in message)
    return (status.ByteSize() + 2) // 3 * 4 + encoded


def bounded_status(status: status_pb2.Status) -> status_pb2.Status:
    """`status` as it is when it fits the trailers, else with what echoes the request cut to size.

    A message or a field violation may quote what the caller sent (a megabyte-long id, module name or
    template); past the budget, the message and every ErrorInfo value, violation field and description are
    cut, and the violations that still do not fit are left out (the message says how many). The code and
    the reason never change, so the caller still learns which error it was.
    """
    if _trailer_bytes(status) <= TRAILER_BUDGET_BYTES:
        return status
    out = status_pb2.Status(code=status.code, message=_cut(status.message, MESSAGE_BYTES))
    violations: error_details_pb2.BadRequest | None = None
    for detail in status.details:
        info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR) and detail.Unpack(info):
            for key in list(info.metadata):
                info.metadata[key] = _cut(info.metadata[key], TEXT_BYTES)
            out.details.add().Pack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR) and detail.Unpack(bad):
            violations = error_details_pb2.BadRequest(field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=_cut(v.field, TEXT_BYTES),
                                                            description=_cut(v.description, TEXT_BYTES))
                for v in bad.field_violations])
    if violations is not None:
        total = len(violations.field_violations)
        packed = out.details.add()
        packed.Pack(violations)
        while _trailer_bytes(out) > TRAILER_BUDGET_BYTES and violations.field_violations:
            violations.field_violations.pop()
            packed.Pack(violations)
        left_out = total - len(violations.field_violations)
        if left_out:
            out.message = _cut(out.message, MESSAGE_BYTES - 64) + f" ({left_out} more violations left out)"
    return out


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """Ends the call with the status of `exc` (raises grpc.aio.AbortError)."""
    status = bounded_status(status_from_exception(exc))
    await context.abort_with_status(rpc_status.to_status(status))


def rewrap(handler: Any, unary: Callable[[Any], Any], stream: Callable[[Any], Any]) -> Any:
    """`handler` with its behaviour wrapped, same (de)serializers: `unary` wraps the calls that answer once
    (unary and client-streaming), `stream` those that stream answers."""
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            unary(handler.unary_unary), handler.request_deserializer, handler.response_serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            unary(handler.stream_unary), handler.request_deserializer, handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            stream(handler.unary_stream), handler.request_deserializer, handler.response_serializer)
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(
            stream(handler.stream_stream), handler.request_deserializer, handler.response_serializer)
    return handler


async def run_stream(result: Any, context: grpc.aio.ServicerContext) -> None:
    """Runs a streaming handler's call to its end, whether the handler writes its responses with
    `context.write` (a coroutine, as grpcio's own health servicer and our metric streams do) or yields them
    (an async generator: each is written here).

    Every streaming handler the pipeline builds (and the tracing interceptor's) is a coroutine built on
    this, so grpc.aio takes every streaming call through its reader-writer API, and a response written deep
    inside resumes a few plain coroutine frames instead of a chain of async generators, one per wrapper (a
    stream with a thousand followers pays that chain per response per follower)."""
    if inspect.isawaitable(result):
        await result
        return
    async for item in result:
        await context.write(item)


def final_code(context: grpc.aio.ServicerContext, exc: BaseException | None) -> str:
    """The gRPC code a call ended with: the one its context was aborted with (`abort_with` aborts with the
    mapped status), CANCELLED when the client went away, else OK."""
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return grpc.StatusCode.CANCELLED.name
    try:
        code: Any = context.code()
    except Exception:
        code = None
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        return _CODE_NAMES.get(code, "UNKNOWN")
    if exc is not None and not isinstance(exc, grpc.aio.AbortError):
        return grpc.StatusCode.UNKNOWN.name  # escaped every mapping: grpcio answers UNKNOWN
    return grpc.StatusCode.OK.name


_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


class TracingInterceptor(grpc.aio.ServerInterceptor):
    """A SERVER span per call (tuneforge_core.tracing), named by the full method ("tuneforge.v1.JobService/
    CreateJob"), child of the `traceparent` a caller sent in its metadata, current while the servicer runs
    (so an outbox row written by the call keeps its context) and ended with the call's final gRPC code
    (`rpc.grpc.status_code`; an error status on anything but OK). A streaming call's span is not current
    while it streams. It wraps the handlers services.kit.pipeline built, so it sees the code their error
    mapping chose. Installed only while tracing is on."""

    async def intercept_service(self, continuation: Callable[..., Any],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        full = handler_call_details.method.lstrip("/")
        service, method = telemetry.split_method(handler_call_details.method)
        attributes: dict[str, str | int] = {"rpc.system": "grpc", "rpc.service": service,
                                            "rpc.method": method}
        metadata = {k: v for k, v in (handler_call_details.invocation_metadata or ())
                    if k == tracing.TRACEPARENT and isinstance(v, str)}

        def finish(span: Any, context: grpc.aio.ServicerContext, exc: BaseException | None) -> None:
            code = final_code(context, exc)
            span.set_attribute("rpc.grpc.status_code", getattr(grpc.StatusCode, code, grpc.StatusCode.UNKNOWN)
                               .value[0])
            if code != "OK":
                span.set_status(tracing.Status(tracing.StatusCode.ERROR, code))

        def unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
            async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
                with tracing.span(full, parent=tracing.extract(metadata), kind=tracing.SpanKind.SERVER,
                                  attributes=attributes) as span:
                    try:
                        response = await behavior(request, context)
                    except BaseException as exc:
                        finish(span, context, exc)
                        raise
                    finish(span, context, None)
                    return response

            return wrapper

        def stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
            async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> None:
                # Not made current: a response stream may be closed from another task, where the context
                # it attached could not be detached.
                span = tracing.tracer().start_span(full, context=tracing.extract(metadata),
                                                   kind=tracing.SpanKind.SERVER, attributes=attributes)
                try:
                    await run_stream(behavior(request, context), context)
                except BaseException as exc:
                    finish(span, context, exc)
                    raise
                else:
                    finish(span, context, None)
                finally:
                    span.end()

            return wrapper

        return rewrap(handler, unary, stream)

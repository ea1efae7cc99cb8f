"""What every RPC goes through around its servicer, made once per method when the method is registered.

For each call, outermost first:

1. telemetry: the call counted with its duration and final gRPC code (services.kit.telemetry:
   tuneforge_rpc_requests_total, tuneforge_rpc_duration_seconds), a streaming call once, when it ends;
2. errors: the one place where an exception becomes a gRPC status (`status_from_exception`, bounded to what
   the trailers take: services.kit.interceptors.bounded_status), for every RPC shape;
3. the gate (services.kit.auth.MethodGate), before the request is even parsed: the credential, the role,
   the rate, the audit of a refusal; health checking and reflection have none;
4. the request parsed: bytes that do not parse (bad UTF-8 in a string field, truncated bytes) are
   INVALID_ARGUMENT naming the method, not grpcio's UNKNOWN, and so is a string holding a NUL character
   (naming its field: PostgreSQL's text cannot store one); then scoped into the caller's organization;
5. the servicer, and the audit of a call that may change something;
6. the answer serialized, unless it is one `freeze` kept the bytes of (an answer built once and sent to
   every caller, like a page of the model catalog).

The handlers are built when the servicers are registered (`CallPipeline.registrar`), not by interceptors
per call: grpc.aio runs each interceptor as a coroutine of its own on every call, before the handler's
own wrappers (four interceptors, four wrappers). Built here, a call's handler is two coroutines around the
servicer; ListBaseModels at 16 calls in flight went from 50-58% to 66-67% of a bare grpc.aio server's
throughput (benchmarks/README.md, run H). The one interceptor left is tracing's, only while it is on.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import DecodeError, Message

from services.kit import telemetry
from services.kit.auth import CallAuth, MethodGate, current_principal, resource_of
from services.kit.interceptors import abort_with, final_code, run_stream
from services.kit.protos import find_nul
from tuneforge_core.errors import InvalidArgument, Violations

Behavior = Callable[..., Any]
M = TypeVar("M", bound=Message)

# Answers whose bytes are kept (`freeze`), by id: (the message, its bytes). The message is held, so its id
# is not reused while it is here. Bounded: past FROZEN_KEPT the oldest are serialized per call again.
FROZEN_KEPT = 256
_frozen: OrderedDict[int, tuple[Message, bytes]] = OrderedDict()


def freeze(message: M) -> M:
    """`message`, an answer that will not change again, serialized once: every unary call answered with
    this very object sends these bytes. For the event loop's thread (servicers)."""
    _frozen[id(message)] = (message, message.SerializeToString())
    while len(_frozen) > FROZEN_KEPT:
        _frozen.popitem(last=False)
    return message


def _with_frozen(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    if serialize is None:
        return None

    def serialized(response: Any) -> bytes:
        kept = _frozen.get(id(response))
        if kept is not None and kept[0] is response:
            return kept[1]
        return serialize(response)

    return serialized


def _parser(method: str, deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    """The request parser of `method`: a request that does not parse is the caller's error."""
    if deserialize is None:
        return lambda raw: raw

    def parse(raw: bytes) -> Any:
        try:
            request = deserialize(raw)
        except Exception as exc:
            detail = f" ({exc})" if isinstance(exc, DecodeError) else ""
            message = f"the request to {method} is not a valid protobuf message{detail}"
            raise InvalidArgument(message) from None
        # A string holding a NUL holds this byte (most requests hold none at all, and are not walked).
        # PostgreSQL's text cannot store one: refused here, naming the field, for every method at once.
        if b"\x00" in raw and isinstance(request, Message):
            path = find_nul(request)
            if path is not None:
                violations = Violations()
                violations.add(path, "must not contain a NUL character (U+0000)")
                violations.raise_if_any(f"Invalid request to {method}")
        return request

    return parse


class CallPipeline:
    """Builds each method's handler (see the module). `auth` None: no gate at all (a server of tests)."""

    def __init__(self, auth: CallAuth | None) -> None:
        self.auth = auth
        # (method, the servicer's handler) -> the handler built around it; the same handler object reaches
        # both registrations grpc keeps (by method and generic), so it is built once.
        self._built: dict[tuple[str, int], tuple[Any, Any]] = {}

    def registrar(self, server: grpc.aio.Server) -> Registrar:
        """What generated `add_*Servicer_to_server` functions register on: `server`, every handler built."""
        return Registrar(server, self)

    def handler(self, method: str, handler: Any) -> Any:
        key = (method, id(handler))
        built = self._built.get(key)
        if built is None or built[0] is not handler:
            built = self._built[key] = (handler, self._build(method, handler))
        return built[1]

    def _build(self, method: str, handler: Any) -> Any:
        gate = self.auth.for_method(method) if self.auth is not None else None
        parse = _parser(method, handler.request_deserializer)
        service, name = telemetry.split_method(method)
        serializer = handler.response_serializer

        def observe(context: grpc.aio.ServicerContext, started: float, exc: BaseException | None) -> None:
            telemetry.observe_rpc(service, name, final_code(context, exc), time.perf_counter() - started)

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _observed(_unary(handler.unary_unary, parse, gate), observe), None, _with_frozen(serializer))
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _observed(_client_stream(handler.stream_unary, parse, gate), observe), None,
                _with_frozen(serializer))
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _observed(_server_stream(handler.unary_stream, parse, gate), observe), None, serializer)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                _observed(_bidi_stream(handler.stream_stream, parse, gate), observe), None, serializer)
        return handler


class Registrar:
    """A server as generated code registers servicers on it, each handler built by the pipeline.

    Generated code registers each service twice: as a generic handler and as "registered methods". grpc.aio
    keeps one pending request per registered method and, for every call it accepts, waits on all of them
    at once (`asyncio.wait` over ~50 futures: a check, a callback added and one removed, each). So no
    method is registered with grpc: the methods go to one table, the first generic handler of the server,
    which finds a call's handler with one dictionary look-up, and grpc waits on its one generic request.
    ListBaseModels at 16 calls in flight, six alternating rounds each: 228-266 us of services CPU a call
    against 271-334 registered (benchmarks/README.md, run K)."""

    def __init__(self, server: grpc.aio.Server, pipeline: CallPipeline) -> None:
        self._server = server
        self._pipeline = pipeline
        self._table = _Table()
        server.add_generic_rpc_handlers((self._table,))

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(_Generic(h, self._pipeline) for h in handlers))

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, Any]) -> None:
        for name, handler in handlers.items():
            method = f"/{service}/{name}"
            self._table.handlers[method] = self._pipeline.handler(method, handler)


class _Table(grpc.GenericRpcHandler):
    """The built handlers by full method name ("/tuneforge.v1.JobService/GetJob")."""

    def __init__(self) -> None:
        self.handlers: dict[str, Any] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        return self.handlers.get(handler_call_details.method)


class _Generic(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler, pipeline: CallPipeline) -> None:
        self._inner = inner
        self._pipeline = pipeline

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = self._inner.service(handler_call_details)
        return None if handler is None else self._pipeline.handler(handler_call_details.method, handler)


# -- 1 and 2: telemetry and errors, around the rest --------------------------------------------------------

def _observed(inner: Behavior, observe: Callable[..., None]) -> Behavior:
    """The call counted when it ends, its exception mapped to a status. For every shape: a coroutine, so
    grpc.aio takes a streaming call through its reader-writer API (services.kit.interceptors.run_stream)."""

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter()
        try:
            try:
                response = await inner(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await abort_with(context, exc)
        except BaseException as exc:
            observe(context, started, exc)
            raise
        observe(context, started, None)
        return response

    return call


# -- 3 to 5: the gate, the request, the servicer and the audit, for each shape -----------------------------

def _unary(behavior: Behavior, parse: Callable[[bytes], Any], gate: MethodGate | None) -> Behavior:
    if gate is None:
        async def open_unary(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            return await behavior(parse(raw), context)

        return open_unary

    async def unary(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        principal = gate.admit_fast(context) or await gate.admit(context)
        if not gate.mutating:
            request = parse(raw)
            gate.enter(request, principal)
            return await behavior(request, context)
        resource = ""
        try:
            request = parse(raw)
            resource = resource_of(request)
            gate.enter(request, principal)  # a request naming another organization is refused, and audited
            response = await behavior(request, context)
        except BaseException as exc:
            await gate.outcome(context, principal, resource, None, exc)
            raise
        await gate.outcome(context, principal, resource, response, None)
        return response

    return unary


def _server_stream(behavior: Behavior, parse: Callable[[bytes], Any], gate: MethodGate | None) -> Behavior:
    if gate is None:
        async def open_stream(request: Any, context: grpc.aio.ServicerContext) -> None:
            await run_stream(behavior(request, context), context)

        return _unary(open_stream, parse, None)
    auth = gate.auth

    async def streamed(request: Any, context: grpc.aio.ServicerContext) -> None:
        with auth.stream_held(current_principal()):  # at most api_streams_per_organization open
            await run_stream(behavior(request, context), context)

    return _unary(streamed, parse, gate)  # answered when its stream ends; audited with the request's resource


async def _parsed(requests: AsyncIterator[bytes], parse: Callable[[bytes], Any], gate: MethodGate | None,
                  principal: Any) -> AsyncIterator[Any]:
    async for raw in requests:
        request = parse(raw)
        if gate is not None:
            gate.enter(request, principal)
        yield request


def _client_stream(behavior: Behavior, parse: Callable[[bytes], Any], gate: MethodGate | None) -> Behavior:
    async def collect(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
        if gate is None:
            return await behavior(_parsed(requests, parse, None, None), context)
        principal = gate.admit_fast(context) or await gate.admit(context)
        if not gate.mutating:
            return await behavior(_parsed(requests, parse, gate, principal), context)
        try:
            response = await behavior(_parsed(requests, parse, gate, principal), context)
        except BaseException as exc:
            await gate.outcome(context, principal, "", None, exc)
            raise
        await gate.outcome(context, principal, "", response, None)
        return response

    return collect


def _bidi_stream(behavior: Behavior, parse: Callable[[bytes], Any], gate: MethodGate | None) -> Behavior:
    auth = gate.auth if gate is not None else None

    async def streamed(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
        if auth is None:
            await run_stream(behavior(requests, context), context)
            return
        with auth.stream_held(current_principal()):
            await run_stream(behavior(requests, context), context)

    return _client_stream(streamed, parse, gate)

"""The aiohttp application: the REST/JSON routes of every RPC, OpenAPI, and the web console at `/`.

A gRPC client of the services, nothing more: each HTTP request becomes one call on the services' address
carrying the caller's `Authorization` header as `authorization` metadata, so authentication, roles and
organization scoping are the services' own, exactly as for a gRPC client.

- Unary RPCs: JSON in (body and/or query parameters and path variables), JSON out.
- Server-streaming RPCs (WatchJob, StreamMetrics, StreamLogs): server-sent events, one `data:` line of JSON
  per response message; a failure after the stream began is an `event: error` with the Status JSON. An
  error before the first message (unknown job, missing key) is a plain HTTP error. A comment line every
  KEEPALIVE_S keeps proxies from closing a quiet stream and tells the gateway when the client went away;
  the gRPC call is cancelled then (or as soon as aiohttp sees the connection close).
- Client-streaming RPCs (UploadDataset, ValidateDataset): the raw request body is the file, streamed on in
  CHUNK_BYTES messages as it arrives (never held whole in memory); the metadata message's fields are query
  parameters (`?name=chat&filename=chat.jsonl&split.trainFraction=0.9`).

Input the gateway refuses before calling a service (bad JSON, an unknown field, a value of the wrong type,
an unknown enum name, a parameter that is not UTF-8) is 400 with a google.rpc.BadRequest naming the field;
a body whose Content-Type is not JSON (`application/json`, `application/*+json`, or none) is 415 naming
the header; a JSON body over `max_body_bytes` is 413 (RESOURCE_EXHAUSTED); a URL over MAX_URL_BYTES is
414 naming its longest parameter; a body in a Content-Encoding the gateway does not decode is 415 naming
that header, and one that does not decode (not the gzip it claims to be) is 400 naming `body` (an upload's
call is then cancelled, never ended as if the file were whole).

Left to aiohttp, which answers them in plain text before any handler or middleware runs (it has no hook to
shape that answer; aio-libs/aiohttp#3287): a malformed request line or header, a header over 8190 bytes,
bad chunked framing in the first packet of a body.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import grpc
import grpc.aio
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from google.protobuf import message, message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.rpc import code_pb2, status_pb2

from services.gateway import errors, transcode
from services.gateway.rules import Route, TemplateError, all_routes
from tuneforge_core.reasons import Reason

log = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # the services' limit on one message (services.kit.runtime)
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
UNARY_TIMEOUT_S = 120.0
UPLOAD_TIMEOUT_S = 3600.0
KEEPALIVE_S = 15.0
# How long a stream waits for its first message before it sends its headers: errors the service raises at
# once (unknown job, no key) become plain HTTP errors; a quiet stream starts anyway after this.
FIRST_MESSAGE_WAIT_S = 1.0

# The longest request URL (path and query, percent-encoded) the gateway reads: aiohttp's default limit on a
# request line, so no URL that was read before is refused. aiohttp itself reads lines up to MAX_LINE_BYTES,
# so that a longer URL is answered by the gateway, a Status naming its longest parameter, rather than by
# aiohttp's plain-text 400 (which names nothing).
MAX_URL_BYTES = 8190
MAX_LINE_BYTES = 1024 * 1024
OPENAPI_FILE = Path(__file__).resolve().parents[2] / "gen" / "openapi" / "tuneforge.v1.openapi.json"

# What reading a request's body raises when the body itself is malformed: a Content-Encoding it does not
# decode to (gzip, deflate), a bad chunk of a chunked body, a Transfer-Encoding aiohttp refuses. aiohttp
# parses the body while the handler reads it, so these reach the handler (unlike errors in the request line
# or headers, which aiohttp answers before any handler runs) and are the client's 400, not the gateway's 500.
BODY_ERRORS = (web.RequestPayloadError, HttpProcessingError)

CHANNEL_KEY: web.AppKey[grpc.aio.Channel] = web.AppKey("gateway_channel", grpc.aio.Channel)
ACTIVE_STREAMS: web.AppKey[dict[str, int]] = web.AppKey("gateway_active_streams", dict)
_JSON = "application/json"
# The content codings aiohttp decodes (br and zstd where their packages are installed; aiohttp refuses them
# itself otherwise). A body in any other coding would be read as if it were not encoded at all.
CONTENT_CODINGS = frozenset({"identity", "gzip", "deflate", "br", "zstd"})


def _message_class(desc: Any) -> type[message.Message]:
    cls: type[message.Message] = message_factory.GetMessageClass(desc)
    return cls


def _error_response(status: status_pb2.Status, http: int | None = None,
                    headers: dict[str, str] | None = None) -> web.Response:
    retry_after = errors.retry_after(status)
    if retry_after is not None:  # RFC 9110's header for what the status's RetryInfo says
        headers = {**(headers or {}), "Retry-After": retry_after}
    return web.Response(status=http or errors.http_status(status.code), body=errors.status_json(status),
                        content_type=_JSON, headers=headers)


def _unreadable_body(exc: Exception) -> web.Response:
    """400 naming `body` for a body aiohttp could not read (one of BODY_ERRORS), with its reason. The
    connection is closed after it: the rest of such a body cannot be told from the next request."""
    cause = exc.__cause__ if isinstance(exc.__cause__, HttpProcessingError) else exc
    reason = cause.message if isinstance(cause, HttpProcessingError) else str(cause)
    reason = " ".join(str(reason).split())[:300] or type(cause).__name__
    response = _error_response(errors.bad_request([("body", f"could not be read: {reason}")]))
    response.force_close()
    return response


def _metadata(request: web.Request) -> list[tuple[str, str]]:
    metadata = []
    authorization = request.headers.get("Authorization")
    if authorization:
        metadata.append(("authorization", authorization))
    request_id = request.headers.get("X-Request-Id")
    if request_id:
        metadata.append(("x-request-id", request_id))
    return metadata


def _check_json_content_type(request: web.Request) -> None:
    """A JSON body must say it is JSON, or say nothing: `application/json` or `application/*+json`, in
    UTF-8; no Content-Type is read as JSON. Anything else (a form, text/plain, XML) is 415 naming the
    header, rather than read as JSON regardless of what the client said it sent."""
    if "Content-Type" not in request.headers:
        return
    media = request.content_type  # lower-case, without parameters
    kind, _, subtype = media.partition("/")
    if media != _JSON and not (kind == "application" and subtype.endswith("+json")):
        given = transcode.shown(request.headers["Content-Type"])
        raise transcode.BadInput([("Content-Type", f"is {given!r}; this route takes a JSON body: send "
                                                   f"Content-Type: {_JSON}")], http_status=415)
    charset = transcode.shown(request.charset or "utf-8")
    if charset.lower() not in ("utf-8", "utf8"):
        raise transcode.BadInput([("Content-Type", f"says charset={charset}; JSON bodies are UTF-8 (send "
                                                   f"Content-Type: {_JSON})")], http_status=415)


def _check_content_encoding(request: web.Request) -> None:
    """415 naming Content-Encoding for a body in a coding the gateway cannot decode (e.g. "compress", or
    two codings stacked), rather than that body passed on still encoded, as if it were the JSON or file."""
    coding = request.headers.get("Content-Encoding", "").strip().lower()
    if coding and coding not in CONTENT_CODINGS:
        given = transcode.shown(request.headers["Content-Encoding"])[:100]
        raise transcode.BadInput([("Content-Encoding", f"is {given!r}; the gateway decodes "
                                   f"{', '.join(sorted(CONTENT_CODINGS))} bodies only")],
                                 http_status=415)


def _query(request: web.Request) -> dict[str, list[str]]:
    """The query parameters; BadInput naming any that is not UTF-8 (which `request.query` would have
    turned into U+FFFD and passed on)."""
    transcode.check_query_utf8(request.rel_url.raw_query_string)
    query: dict[str, list[str]] = {}
    for key, value in request.query.items():
        query.setdefault(key, []).append(value)
    return query


class Gateway:
    """The routes and the handlers; one per application."""

    def __init__(self, target: str, credentials: grpc.ChannelCredentials | None = None, *,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, openapi_file: Path = OPENAPI_FILE) -> None:
        self.target = target
        self.credentials = credentials
        self.max_body_bytes = max_body_bytes
        self.openapi_file = openapi_file
        self.routes = all_routes()
        for route in self.routes:
            if route.client_streaming and not route.server_streaming:
                _upload_fields(route)  # refuse at start a client stream this gateway cannot carry
            elif route.client_streaming:
                raise TemplateError(f"{route.method.full_name}: bidirectional streams have no HTTP form")
        self.channel: grpc.aio.Channel | None = None
        self._callables: dict[str, Callable[..., Any]] = {}
        self._openapi: bytes | None = None

    # -- lifecycle --
    async def start(self, app: web.Application) -> None:
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        self.channel = (
            grpc.aio.secure_channel(self.target, self.credentials, options=options)
            if self.credentials is not None else grpc.aio.insecure_channel(self.target, options=options))
        app[CHANNEL_KEY] = self.channel

    async def close(self, _app: web.Application) -> None:
        if self.channel is not None:
            await self.channel.close()

    def _callable(self, route: Route) -> Callable[..., Any]:
        key = route.full_name
        if key not in self._callables:
            assert self.channel is not None
            request_cls = _message_class(route.method.input_type)
            response_cls = _message_class(route.method.output_type)
            kinds = {(False, False): self.channel.unary_unary, (False, True): self.channel.unary_stream,
                     (True, False): self.channel.stream_unary}
            kind = kinds[(route.client_streaming, route.server_streaming)]
            self._callables[key] = kind(key, request_serializer=request_cls.SerializeToString,
                                        response_deserializer=response_cls.FromString)
        return self._callables[key]

    # -- dispatch --
    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        raw_path = request.rel_url.raw_path
        too_long = self._url_too_long(request)
        if too_long is not None:
            return _error_response(errors.bad_request(too_long.violations), http=too_long.http_status)
        allowed: set[str] = set()
        for route in self.routes:
            variables = route.path.match(raw_path)
            if variables is None:
                continue
            if route.http_method != request.method:
                allowed.add(route.http_method)
                continue
            try:
                if request.can_read_body:
                    _check_content_encoding(request)
                if route.client_streaming:
                    return await self._client_stream(route, variables, request)
                built = await self._build(route, variables, request)
                if route.server_streaming:
                    return await self._server_stream(route, built, request)
                return await self._unary(route, built, request)
            except transcode.BadInput as exc:
                return _error_response(errors.bad_request(exc.violations), http=exc.http_status)
            except BODY_ERRORS as exc:
                return _unreadable_body(exc)
            except web.HTTPRequestEntityTooLarge:
                return _error_response(errors.simple(
                    code_pb2.RESOURCE_EXHAUSTED, f"the request body is larger than {self.max_body_bytes} "
                    "bytes (TUNEFORGE_HTTP_MAX_BODY_BYTES); upload files with POST /v1/datasets:upload",
                    Reason.UPLOAD_TOO_LARGE, limit_bytes=str(self.max_body_bytes)), http=413)
        if allowed:
            return _error_response(errors.simple(
                code_pb2.UNIMPLEMENTED, f"{request.method} is not allowed on {request.path}; allowed: "
                f"{', '.join(sorted(allowed))}", Reason.NOT_IMPLEMENTED), http=405,
                headers={"Allow": ", ".join(sorted(allowed))})
        return _error_response(errors.simple(
            code_pb2.NOT_FOUND, f"no API route {request.method} {request.path} (see /v1/openapi.json)",
            Reason.NOT_FOUND, path=request.path))

    def _url_too_long(self, request: web.Request) -> transcode.BadInput | None:
        """414 naming the longest parameter (path variable or query parameter) of a URL over MAX_URL_BYTES,
        or None."""
        size = len(request.raw_path)  # path and query, as sent
        if size <= MAX_URL_BYTES:
            return None
        query = parse_qsl(request.rel_url.raw_query_string, keep_blank_values=True, errors="surrogateescape")
        parts = [(name, _size(value)) for name, value in query]
        for route in self.routes:
            variables = route.path.match(request.rel_url.raw_path)
            if variables is not None:
                parts += [(name, _size(value)) for name, value in variables.items()]
                break
        name, longest = max(parts, key=lambda part: part[1], default=("path", len(request.rel_url.raw_path)))
        return transcode.BadInput([(transcode.shown(name)[:200], f"is {longest} bytes long, making the URL "
                                   f"{size} bytes; the gateway reads URLs of at most {MAX_URL_BYTES} bytes")],
                                  http_status=414)

    async def _build(self, route: Route, variables: dict[str, str], request: web.Request) -> message.Message:
        msg = _message_class(route.method.input_type)()
        if route.body:
            raw = await request.read()
            if raw.strip():
                _check_json_content_type(request)
            if route.body == "*":
                transcode.parse_json_into(msg, raw)
            else:
                transcode.parse_json_into(getattr(msg, route.body), raw, prefix=route.body)
        elif request.can_read_body and request.method in ("GET", "DELETE"):
            raw = await request.read()
            if raw.strip():
                raise transcode.BadInput([("body", f"{request.method} {route.path.template} takes no body; "
                                                   "give the fields as query parameters")])
        transcode.apply_query(msg, _query(request), skip=frozenset(variables))
        for name, value in variables.items():
            transcode.set_path_field(msg, name, value)
        return msg

    async def _unary(self, route: Route, msg: message.Message, request: web.Request) -> web.Response:
        try:
            response = await self._callable(route)(msg, metadata=_metadata(request), timeout=UNARY_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            return _error_response(errors.status_of(exc))
        if route.response_body:
            response = getattr(response, route.response_body)
        return web.Response(body=transcode.to_json_bytes(response), content_type=_JSON)

    async def _server_stream(self, route: Route, msg: message.Message,
                             request: web.Request) -> web.StreamResponse:
        call = self._callable(route)(msg, metadata=_metadata(request))
        active = request.app[ACTIVE_STREAMS]
        active[route.method.name] = active.get(route.method.name, 0) + 1
        pending: asyncio.Future[Any] = asyncio.ensure_future(call.read())
        try:
            await asyncio.wait({pending}, timeout=FIRST_MESSAGE_WAIT_S)
            if pending.done() and isinstance(pending.exception(), grpc.aio.AioRpcError):
                error = pending.exception()
                assert isinstance(error, grpc.aio.AioRpcError)
                return _error_response(errors.status_of(error))
            response = web.StreamResponse(headers={
                "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            await response.prepare(request)
            while True:
                while not pending.done():
                    await asyncio.wait({pending}, timeout=KEEPALIVE_S)
                    if not pending.done():
                        await response.write(b": keep-alive\n\n")  # raises once the client has gone
                try:
                    item = pending.result()
                except grpc.aio.AioRpcError as exc:
                    await response.write(errors.sse_error(errors.status_of(exc)))
                    break
                if item is grpc.aio.EOF:
                    break
                await response.write(_event(item))
                pending = asyncio.ensure_future(call.read())
            await response.write_eof()
            return response
        except (ConnectionResetError, asyncio.CancelledError):
            log.info("%s: the HTTP client went away; cancelling the call", route.method.name)
            raise
        finally:
            pending.cancel()
            call.cancel()
            active[route.method.name] -= 1

    async def _client_stream(self, route: Route, variables: dict[str, str],
                             request: web.Request) -> web.Response:
        metadata_field, chunk_field = _upload_fields(route)
        request_cls = _message_class(route.method.input_type)
        head = request_cls()
        first = getattr(head, metadata_field.name)
        transcode.apply_query(first, _query(request))
        for name, value in variables.items():
            transcode.set_path_field(first, name, value)
        size = first.DESCRIPTOR.fields_by_name.get("size_bytes")
        # Content-Length lets the service refuse a file too large before it is sent; it is the file's size
        # only when the body is not encoded (a gzip body's is the compressed size, which the decoded file
        # received would then fail to match).
        encoded = request.headers.get("Content-Encoding", "identity").strip().lower() != "identity"
        if size is not None and request.content_length and not encoded and not getattr(first, size.name):
            setattr(first, size.name, request.content_length)
        head_message = request_cls(**{metadata_field.name: first})
        # A body that breaks off unreadable (see BODY_ERRORS) cancels the call, so that the service never
        # takes the part read so far for the whole file; the client is answered 400 naming the body.
        unreadable: list[Exception] = []

        async def messages() -> AsyncIterator[message.Message]:
            yield head_message
            buffer = bytearray()
            while True:
                try:
                    block = await request.content.read(CHUNK_BYTES)
                except BODY_ERRORS as exc:
                    unreadable.append(exc)
                    call.cancel()
                    return
                if not block:
                    break
                buffer += block
                if len(buffer) >= CHUNK_BYTES:
                    yield request_cls(**{chunk_field.name: bytes(buffer)})
                    buffer.clear()
            if buffer:
                yield request_cls(**{chunk_field.name: bytes(buffer)})

        call = self._callable(route)(messages(), metadata=_metadata(request), timeout=UPLOAD_TIMEOUT_S)
        try:
            response = await call
        except grpc.aio.AioRpcError as exc:
            return _error_response(errors.status_of(exc))
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if unreadable and not (task is not None and task.cancelling()):
                return _unreadable_body(unreadable[0])  # cancelled above, not by the client going away
            raise
        return web.Response(body=transcode.to_json_bytes(response), content_type=_JSON)

    async def openapi(self, _request: web.Request) -> web.Response:
        """gen/openapi/ as committed; where it is not shipped (an installed package, the container image),
        the same document built from the descriptors, without the protos' comments."""
        if self._openapi is None:
            try:
                self._openapi = self.openapi_file.read_bytes()
            except OSError:
                from services.gateway.openapi import build_document

                self._openapi = json.dumps(build_document(), indent=1).encode()
        return web.Response(body=self._openapi, content_type=_JSON)


def _size(decoded: str) -> int:
    return len(decoded.encode("utf-8", "surrogateescape"))


def _upload_fields(route: Route) -> tuple[FieldDescriptor, FieldDescriptor]:
    """(metadata field, bytes field) of a client-streaming request: the route's body names the bytes field,
    the request's one message field carries the metadata."""
    fields = route.method.input_type.fields_by_name
    chunk = fields.get(route.body)
    messages = [f for f in route.method.input_type.fields if f.message_type is not None]
    if chunk is None or chunk.type != FieldDescriptor.TYPE_BYTES or len(messages) != 1:
        raise TemplateError(f"{route.method.full_name}: a client stream needs `body` naming its bytes field "
                            "and one message field for the metadata")
    return messages[0], chunk


def _event(msg: message.Message) -> bytes:
    return b"data: " + transcode.to_json_bytes(msg) + b"\n\n"


@web.middleware
async def _json_errors(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
    """Whatever goes wrong inside the gateway is still a google.rpc.Status in JSON (logged), never an HTML
    page; aiohttp's own HTTP errors (unknown path outside /v1, 405) keep their status."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error_response(errors.simple(
            code_pb2.NOT_FOUND if exc.status == 404 else code_pb2.INVALID_ARGUMENT, exc.reason,
            Reason.NOT_FOUND if exc.status == 404 else Reason.INVALID_ARGUMENT), http=exc.status)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("%s %s failed inside the gateway", request.method, request.path)
        return _error_response(errors.simple(code_pb2.INTERNAL, "the HTTP gateway failed to handle this "
                                             "request; see its log", Reason.INTERNAL), http=500)


async def _health(_request: web.Request) -> web.Response:
    return web.json_response({"status": "SERVING"})


class _ClientErrorsOnOneLine(logging.Filter):
    """aiohttp logs a request its parser refuses (a line over MAX_LINE_BYTES, a header over 8190 bytes, a
    byte not allowed in a URL, a body that does not decode) with a full traceback at ERROR, though it is the
    client's mistake, answered 400: one WARNING line instead. aiohttp answers the request line's and the
    headers' errors itself, in plain text, before any handler or middleware runs; it has no hook to shape
    that answer."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, web.RequestPayloadError) and isinstance(exc.__cause__, HttpProcessingError):
            # A body that could not be read (BODY_ERRORS): the handler answered 400, then aiohttp, reading
            # the rest of the body before closing ("lingering"), met the same error again.
            exc = exc.__cause__
        if isinstance(exc, HttpProcessingError):
            reason = " ".join(str(exc.message or exc).split())[:300]
            record.msg, record.args = "%s: refused, %s %s: %s", (record.getMessage(), exc.code,
                                                                  type(exc).__name__, reason)
            record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
            record.exc_info, record.exc_text = None, None
        return True


SERVER_LOG = logging.getLogger("services.gateway.http")
SERVER_LOG.addFilter(_ClientErrorsOnOneLine())


def create_runner(app: web.Application) -> web.AppRunner:
    """The runner the gateway serves `app` with: request lines up to MAX_LINE_BYTES (the gateway answers
    URLs over MAX_URL_BYTES itself), and aiohttp's server log on SERVER_LOG."""
    return web.AppRunner(app, handler_cancellation=True, access_log=None, max_line_size=MAX_LINE_BYTES,
                         logger=SERVER_LOG)


def create_app(target: str, credentials: grpc.ChannelCredentials | None = None, *,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, console: bool = True) -> web.Application:
    """The gateway's application for the services at `target` (host:port)."""
    gateway = Gateway(target, credentials, max_body_bytes=max_body_bytes)
    app = web.Application(client_max_size=max_body_bytes, middlewares=[_json_errors])
    app[ACTIVE_STREAMS] = {}
    app.on_startup.append(gateway.start)
    app.on_cleanup.append(gateway.close)
    app.router.add_get("/v1/openapi.json", gateway.openapi)
    app.router.add_get("/healthz", _health)
    app.router.add_route("*", "/v1/{tail:.*}", gateway.dispatch)
    if console:
        from services.console import install

        install(app)
    return app

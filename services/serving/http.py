"""The OpenAI-compatible HTTP endpoint of EMBEDDED deployments (aiohttp, on the serving component's loop).

- `POST /v1/chat/completions`: `model` is a deployment name; `messages`, `max_tokens` (or
  `max_completion_tokens`), `temperature`, `top_p`, `stop`, `stream` (Server-Sent Events in OpenAI's chunk
  format, ending `data: [DONE]`; `stream_options.include_usage` adds the usage chunk) and `n` (1 only).
- `GET /v1/models`: the caller's organization's READY deployments.

Callers authenticate with `Authorization: Bearer <TuneForge API key>` (services.kit.identity); a missing or
invalid key is 401. A deployment of another organization is answered exactly like an unknown model (404).
Every refusal is an OpenAI-style error object `{"error": {"message", "type", "param", "code"}}`; bad input is
a 400 naming the field, never a 500. Requests are proxied to the deployment's model process
(services.serving.runner) over loopback, streaming.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from services.kit.identity import IdentityStore, Principal
from services.serving.manager import DeploymentManager
from services.serving.settings import ServingSettings
from tuneforge_core.errors import FailedPrecondition, NotFound, TuneForgeError

log = logging.getLogger(__name__)

DEFAULT_PORT = 8082
ROLES = {"system", "user", "assistant", "developer"}
MAX_STOPS = 4


class ApiError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> web.Response:
        return web.json_response({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                            "code": self.code}}, status=self.status)


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"Invalid value for '{param}': {message}", param=param, code="invalid_value")


@dataclass
class ChatRequest:
    model: str
    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    stream: bool
    include_usage: bool

    def generation(self) -> dict[str, Any]:
        return {"messages": self.messages, "max_tokens": self.max_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "stop": self.stop}


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float, *,
            low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad(name, "must be a number")
    if value > high or value < low or (low_open and value == low):
        raise bad(name, f"must be {'greater than' if low_open else 'at least'} {low:g} and at most {high:g}")
    return float(value)


def _content(value: Any, param: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                raise bad(f"{param}[{i}]", "only text content parts ({\"type\": \"text\", \"text\": ...}) "
                                           "are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(param, "must be a string or a list of text parts")


def parse_chat(body: Any, settings: ServingSettings) -> ChatRequest:
    """The request's fields, checked one by one; the first bad one is a 400 naming it."""
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_request")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "is required: the name of a deployment")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise bad("messages", "must be a non-empty list of messages")
    messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise bad(f"messages[{i}]", "must be an object with a role and content")
        role = message.get("role")
        if role not in ROLES:
            raise bad(f"messages[{i}].role", f"must be one of {', '.join(sorted(ROLES))}")
        messages.append({"role": "system" if role == "developer" else str(role),
                         "content": _content(message.get("content"), f"messages[{i}].content")})
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise bad("n", "only n=1 is supported")
    limit_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    limit = body.get(limit_name)
    if limit is None:
        max_tokens = settings.serving_default_max_tokens
    elif (isinstance(limit, bool) or not isinstance(limit, int)
          or not 1 <= limit <= settings.serving_max_tokens):
        raise bad(limit_name, f"must be an integer from 1 to {settings.serving_max_tokens}")
    else:
        max_tokens = limit
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) for s in stops):
        raise bad("stop", f"must be a string or a list of at most {MAX_STOPS} strings")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad("stream", "must be true or false")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("stream_options", "must be an object")
    return ChatRequest(model=model, messages=messages, max_tokens=max_tokens,
                       temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                       top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True), stop=stops,
                       stream=stream, include_usage=bool(options.get("include_usage")))


def advertised_host(host: str) -> str:
    """The host to put in the endpoint URL: a wildcard address is no place to connect to."""
    bare = host.strip("[]")
    if bare in ("", "0.0.0.0", "::"):
        return socket.gethostname()
    return f"[{bare}]" if ":" in bare else bare


class ChatServer:
    def __init__(self, manager: DeploymentManager, identity: IdentityStore,
                 settings: ServingSettings) -> None:
        self.manager = manager
        self.identity = identity
        self.settings = settings
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.port = 0
        self.base_url = ""

    # -- lifecycle --------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=4 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        return app

    async def start(self) -> str:
        """Listens and returns the endpoint's base URL ("http://host:port/v1")."""
        s = self.settings
        host = s.serving_host or s.grpc_host
        if s.serving_port is not None:
            port, fallback = s.serving_port, False
        else:
            port, fallback = (DEFAULT_PORT if s.grpc_port else 0), True
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        # With the gRPC server's TLS certificate the endpoint is HTTPS too, so API keys are as safe here.
        tls = None
        if s.tls_cert_file and s.tls_key_file:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(s.tls_cert_file, s.tls_key_file)
        try:
            site = web.TCPSite(self._runner, host, port, ssl_context=tls)
            await site.start()
        except OSError as exc:
            if not (fallback and exc.errno == errno.EADDRINUSE):
                raise
            log.warning("port %d is taken; the chat endpoint listens on a free port instead", port)
            site = web.TCPSite(self._runner, host, 0, ssl_context=tls)
            await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        scheme = "https" if tls else "http"
        self.base_url = (s.serving_base_url.rstrip("/")
                         or f"{scheme}://{advertised_host(host)}:{self.port}/v1")
        log.info("serving OpenAI-compatible chat completions on %s", self.base_url)
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    # -- requests ---------------------------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return exc.response()
        except web.HTTPException as exc:  # unknown path or method
            return ApiError(exc.status, exc.reason or "Not found", code="not_found").response()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("chat endpoint: %s %s failed", request.method, request.path)
            return ApiError(500, "The server had an error processing the request.", kind="server_error",
                            code="internal_error").response()

    async def _principal(self, request: web.Request) -> Principal:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "Missing API key: send 'Authorization: Bearer <TuneForge API key>'.",
                           code="invalid_api_key")
        try:
            return await asyncio.to_thread(self.identity.authenticate_key, token.strip())
        except TuneForgeError as exc:
            raise ApiError(401, f"Invalid API key: {exc.message}", code="invalid_api_key") from None

    async def models(self, request: web.Request) -> web.Response:
        principal = await self._principal(request)
        deployments = await self.manager.ready(principal.organization)
        return web.json_response({"object": "list", "data": [
            {"id": d.name, "object": "model", "created": d.create_time.seconds,
             "owned_by": principal.organization} for d in deployments]})

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        principal = await self._principal(request)
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "The request body is not valid JSON.", code="invalid_json") from None
        chat = parse_chat(body, self.settings)
        try:
            process = await self.manager.model_process(principal.organization, chat.model)
        except NotFound:
            raise ApiError(404, f"The model '{chat.model}' does not exist or you do not have access to it.",
                           param="model", code="model_not_found") from None
        except FailedPrecondition as exc:
            raise ApiError(409, exc.message, param="model", code="model_not_ready") from None
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        items = self._generate(process.base_url, chat)
        if chat.stream:
            return await self._stream(request, items, chat, completion_id, created)
        text, done = [], {}
        async for item in items:
            if "text" in item:
                text.append(item["text"])
            elif "done" in item:
                done = item
        return web.json_response({
            "id": completion_id, "object": "chat.completion", "created": created, "model": chat.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                         "logprobs": None, "finish_reason": done.get("finish_reason", "stop")}],
            "usage": _usage(done),
        })

    async def _generate(self, base_url: str, chat: ChatRequest) -> AsyncIterator[dict[str, Any]]:
        assert self._session is not None
        try:
            async with self._session.post(f"{base_url}/generate", json=chat.generation()) as response:
                if response.status != 200:
                    raise ApiError(503, f"The model process answered {response.status}.",
                                   kind="server_error", code="model_unavailable")
                async for line in response.content:
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    if "error" in item:
                        raise ApiError(503, f"Generation failed: {item['error']}", kind="server_error",
                                       code="generation_failed")
                    yield item
        except aiohttp.ClientError as exc:
            raise ApiError(503, f"The model process is unavailable ({type(exc).__name__}); retry later.",
                           kind="server_error", code="model_unavailable") from None

    async def _stream(self, request: web.Request, items: AsyncIterator[dict[str, Any]], chat: ChatRequest,
                      completion_id: str, created: int) -> web.StreamResponse:
        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
            body = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                    "model": chat.model, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                      "finish_reason": finish}], **extra}
            return f"data: {json.dumps(body)}\n\n".encode()

        # The first item comes before the response starts, so a model process that is gone is still a
        # plain error response.
        first = await anext(aiter(items), None)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        await response.write(chunk({"role": "assistant", "content": ""}))
        done: dict[str, Any] = {}
        try:
            pending = [first] if first is not None else []

            async def rest() -> AsyncIterator[dict[str, Any]]:
                for item in pending:
                    yield item
                async for item in items:
                    yield item

            async for item in rest():
                if "text" in item:
                    await response.write(chunk({"content": item["text"]}))
                elif "done" in item:
                    done = item
        except ApiError as exc:
            error = {"error": {"message": exc.message, "type": exc.kind, "param": None, "code": exc.code}}
            await response.write(f"data: {json.dumps(error)}\n\n".encode())
        else:
            await response.write(chunk({}, done.get("finish_reason", "stop")))
            if chat.include_usage:
                body = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                        "model": chat.model, "choices": [], "usage": _usage(done)}
                await response.write(f"data: {json.dumps(body)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _usage(done: dict[str, Any]) -> dict[str, int]:
    prompt, completion = int(done.get("prompt_tokens", 0)), int(done.get("completion_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

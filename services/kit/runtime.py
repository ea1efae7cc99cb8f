"""The process a service runs in: shared resources, the gRPC server and graceful shutdown.

A service is a `Component`: servicers to register plus background tasks (consumers, relays). One process
can host one component (`python -m services.jobs`) or all four (`tuneforge up`); the code is the same.

Every server the kit builds listens with SO_REUSEPORT off (grpcio turns it on by default, which lets a
second server start on a port already in use and take half the connections): a taken address is
`AddressInUse`, and the entry points exit with `EXIT_ADDRESS_IN_USE` and one clear line. The server
answers gRPC reflection in both versions, `grpc.reflection.v1` and the older `v1alpha`, and its pool
holds errors.proto, so `tuneforge.v1.ErrorReason` can be looked up like the services. A request that
does not even parse is INVALID_ARGUMENT (services.kit.pipeline), not grpcio's UNKNOWN. The
process-wide page token key (`services.kit.paging`) is set from the settings before anything is served.

A message is at most MAX_MESSAGE_BYTES (16 MiB) each way, on the server and on the channels between
services (the Python client sets the same): a larger one is RESOURCE_EXHAUSTED, refused before it is
parsed. UploadDataset and ValidateDataset stream the file, so only each frame counts, never the file.
Every call one service makes to another carries a deadline.

Every call is authenticated (services.kit.auth): the server refuses to start when one of its RPCs does
not declare its access, and the channels between services carry the service token
(`KitSettings.service_token`, else `<data_dir>/secrets/service.token`). With `tls_cert_file` and
`tls_key_file` the server listens with TLS (mutual TLS with `tls_client_ca_file`) and the channels
between services use TLS too; without TLS on an address other than loopback it says at start that
credentials travel in plaintext.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import ipaddress
import logging
import os
import secrets
import signal
import socket
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from tuneforge.v1 import errors_pb2

from services.kit import keyfiles, paging, telemetry
from services.kit.auth import (
    Authenticator,
    CallAuth,
    OidcLike,
    bearer_interceptors,
    check_access_declared,
)
from services.kit.identity import IdentityStore
from services.kit.interceptors import TracingInterceptor
from services.kit.pipeline import CallPipeline, Registrar
from services.kit.tasks import cancel_and_wait
from tuneforge_core import logs, tracing
from tuneforge_core.nats import connect, ensure_streams
from tuneforge_core.settings import KitSettings
from tuneforge_core.storage import ObjectStore, store_from_settings

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# The options of the server and of every channel between services.
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
]
# A server owns its port: with SO_REUSEPORT on (grpcio's default) a second server binds the same
# address and the kernel splits connections between the two.
SERVER_OPTIONS = [*GRPC_OPTIONS, ("grpc.so_reuseport", 0)]
# Channels between services spread their calls over every address their target resolves to (gRPC's
# round_robin; its default, pick_first, keeps them all on the first). A Kubernetes ClusterIP resolves to
# one address, and one HTTP/2 connection then stays on one pod; the manifests name each service's headless
# Service instead ("dns:///jobs-pods:50051"), which resolves to every ready pod (deploy/k8s/base).
CHANNEL_OPTIONS = [*GRPC_OPTIONS, ("grpc.lb_policy_name", "round_robin")]
# The exit status of a service process whose address is taken (EADDRINUSE on Linux).
EXIT_ADDRESS_IN_USE = 98

REFLECTION_V1_SERVICE = "grpc.reflection.v1.ServerReflection"
_REFLECTION_V1_FILE = "grpc/reflection/v1/reflection.proto"
# Files reflection describes although no service method uses them: clients look up ErrorReason to read
# ErrorInfo.reason. Importing the generated module puts the file into the default pool.
REFLECTED_FILES = (errors_pb2.DESCRIPTOR,)


class ListenError(RuntimeError):
    """The server could not listen on its address; the message says which and why."""


class AddressInUse(ListenError):
    def __init__(self, address: str) -> None:
        super().__init__(f"address {address} is already in use")
        self.address = address


@dataclass
class Registration:
    """One gRPC service of a component: its full name, its servicer and the generated add function."""

    name: str
    servicer: Any
    add_to_server: Callable[[Any, Any], None]  # generated: the servicer, and the server (a Registrar)


@dataclass
class Runtime:
    """Resources the components of one process share."""

    settings: KitSettings
    nc: NATS
    js: JetStreamContext
    store: ObjectStore
    identity: IdentityStore
    service_token: str
    address: str = ""
    _channels: dict[str, grpc.aio.Channel] = field(default_factory=dict)

    def channel(self, address: str) -> grpc.aio.Channel:
        """A channel to another service, carrying the service token, its calls spread over every address
        `address` resolves to (CHANNEL_OPTIONS); an empty address means this process' own server."""
        target = address or self.address
        if target not in self._channels:
            interceptors = bearer_interceptors(self.service_token)
            credentials = channel_credentials(self.settings)
            options = CHANNEL_OPTIONS
            self._channels[target] = (
                grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)
                if credentials is not None
                else grpc.aio.insecure_channel(target, options=options, interceptors=interceptors))
        return self._channels[target]

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self.identity.close()
        with contextlib.suppress(Exception):
            await self.nc.drain()


class Component:
    """Base of a service: override `registrations`, and `start`/`stop` for background work."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._tasks: list[asyncio.Task[None]] = []

    def registrations(self) -> Sequence[Registration]:
        raise NotImplementedError

    async def start(self) -> None:
        """Starts background tasks; called after the server listens."""

    def spawn(self, coro: Awaitable[None], name: str) -> None:
        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("background task %s crashed", name)
                raise

        self._tasks.append(asyncio.create_task(guarded(), name=name))

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)


ComponentFactory = Callable[[Runtime], Component]


async def open_runtime(settings: KitSettings, name: str, identity: IdentityStore | None = None) -> Runtime:
    if not settings.nats_url:
        raise RuntimeError("TUNEFORGE_NATS_URL is not set (tuneforge up starts an embedded nats-server)")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if identity is None:
        identity = await open_identity(settings)
    nc = await connect(settings.nats_url, name)
    js = nc.jetstream()
    await ensure_streams(js)
    return Runtime(settings=settings, nc=nc, js=js, store=store_from_settings(settings), identity=identity,
                   service_token=service_token(settings))


SERVICE_TOKEN_FILE = "service.token"


async def open_identity(settings: KitSettings) -> IdentityStore:
    """The API keys and audit log every service process checks calls against (migrated to head)."""
    return await asyncio.to_thread(IdentityStore.open, settings.database_url_for("identity"),
                                   cache_s=settings.auth_cache_s, workers=settings.db_workers)


def service_token(settings: KitSettings) -> str:
    """The token the services present to each other: the setting, else one generated once in the data dir."""
    if settings.service_token:
        return settings.service_token
    return keyfiles.load_or_create_key(keyfiles.secret_file(settings.data_dir, SERVICE_TOKEN_FILE),
                                       lambda: ("tfs_" + secrets.token_urlsafe(32)).encode())


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def tls_enabled(settings: KitSettings) -> bool:
    return bool(settings.tls_cert_file and settings.tls_key_file)


def server_credentials(settings: KitSettings) -> grpc.ServerCredentials | None:
    """TLS credentials of the server from the settings (mutual TLS with a client CA), or None."""
    if not tls_enabled(settings):
        if settings.tls_cert_file or settings.tls_key_file or settings.tls_client_ca_file:
            raise ListenError("TLS needs both TUNEFORGE_TLS_CERT_FILE and TUNEFORGE_TLS_KEY_FILE")
        return None
    try:
        pair = (_read(settings.tls_key_file), _read(settings.tls_cert_file))
        client_ca = _read(settings.tls_client_ca_file) if settings.tls_client_ca_file else None
    except OSError as exc:
        raise ListenError(f"cannot read a TLS file: {exc}") from None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def channel_credentials(settings: KitSettings) -> grpc.ChannelCredentials | None:
    """TLS credentials of the channels between services, or None when the server runs without TLS.

    They trust `tls_ca_file` (else the system roots) and, where the servers ask for client certificates,
    present the server's own certificate and key."""
    if not tls_enabled(settings):
        return None
    root = _read(settings.tls_ca_file) if settings.tls_ca_file else None
    if settings.tls_client_ca_file:
        return grpc.ssl_channel_credentials(root, _read(settings.tls_key_file), _read(settings.tls_cert_file))
    return grpc.ssl_channel_credentials(root)


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def oidc_verifier(settings: KitSettings) -> OidcLike | None:
    """The OIDC verifier of the configured issuers, or None when there are none."""
    if not settings.oidc_issuers.strip():
        return None
    from services.kit.oidc import OidcVerifier, parse_issuers

    return OidcVerifier(parse_issuers(settings.oidc_issuers))


def check_address(host: str, port: int) -> None:
    """Raises AddressInUse if `host:port` is taken; any other bind problem is left to the server to report.

    A plain bind and close, as the gRPC server binds (SO_REUSEADDR on, SO_REUSEPORT off). The server and
    the supervisor ask before they bind, for one clear line instead of grpcio's generic RuntimeError and
    log; the server asks again after a failed bind, for the race between the two.
    """
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except OSError:
        return
    for family, kind, proto, _name, sockaddr in infos:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(sockaddr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise AddressInUse(f"{host}:{port}") from None


def _bind(server: grpc.aio.Server, host: str, port: int,
          credentials: grpc.ServerCredentials | None = None) -> int:
    """Binds `host:port` (port 0: a free one) and returns the port, or raises a ListenError that says why."""
    if port:
        check_address(host, port)
    try:
        if credentials is not None:
            return server.add_secure_port(f"{host}:{port}", credentials)
        return server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        if port:
            check_address(host, port)
        raise ListenError(f"cannot listen on {host}:{port} (grpcio logged why)") from None


def _reflection_v1_file(pool: descriptor_pool.DescriptorPool) -> None:
    """Adds grpc/reflection/v1/reflection.proto to `pool`, made from the v1alpha file grpcio ships.

    grpcio-reflection implements v1alpha only (grpc/grpc#38576); v1 is the same protocol, message for
    message and field number for field number, under another package. So one servicer answers both, and
    this descriptor lets reflection describe the v1 service too.
    """
    try:
        pool.FindFileByName(_REFLECTION_V1_FILE)
        return
    except KeyError:
        pass
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name, proto.package = _REFLECTION_V1_FILE, "grpc.reflection.v1"
    proto.options.java_package = "io.grpc.reflection.v1"
    proto.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    proto.options.ClearField("deprecated")
    for message in proto.message_type:
        for f in message.field:
            if f.HasField("type_name"):
                f.type_name = f.type_name.replace(old, new)
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, new)
            method.output_type = method.output_type.replace(old, new)
    pool.AddSerializedFile(proto.SerializeToString())


def enable_reflection(server: grpc.aio.Server | Registrar, service_names: Sequence[str]) -> None:
    """Serves reflection as grpc.reflection.v1 and v1alpha, listing `service_names` and both versions."""
    pool = descriptor_pool.Default()
    _reflection_v1_file(pool)
    for file in REFLECTED_FILES:
        pool.FindFileByName(file.name)  # a KeyError here: the generated module is not in this pool
    servicer = reflection.aio.ReflectionServicer(
        [*service_names, reflection.SERVICE_NAME, REFLECTION_V1_SERVICE], pool=pool)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(REFLECTION_V1_SERVICE, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString),
    }),))


async def serve(factories: Sequence[ComponentFactory], settings: KitSettings, *, name: str,
                on_ready: Callable[[str], None] | None = None,
                stop: asyncio.Event | None = None, freeze_heap: bool = False,
                end_stuck_shutdown: bool = False) -> None:
    """Runs the components behind one gRPC server until `stop` is set or SIGTERM/SIGINT arrives.

    `freeze_heap` (a service's own process, never a test's): once serving, `settle_heap`.
    `end_stuck_shutdown` (a service's own process, never a test's): a shutdown still running
    SHUTDOWN_BACKSTOP_S past `shutdown_grace_s` ends the process (`end_process`).

    Shutdown: health turns NOT_SERVING, the server stops accepting calls and gives in-flight ones
    `shutdown_grace_s` to finish, then background tasks stop and NATS drains.
    """
    stop = stop or asyncio.Event()
    paging.configure_from_settings(settings)
    configure_tracing(settings, name)
    credentials = server_credentials(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    identity = await open_identity(settings)
    auth = CallAuth(Authenticator(identity, service_token(settings), oidc_verifier(settings)),
                    calls_per_second=settings.api_calls_per_second,
                    streams_per_organization=settings.api_streams_per_organization)
    # Every handler is built around its servicer when it is registered (services.kit.pipeline: telemetry,
    # errors, authentication before the request is parsed, the audit), so a call runs through no
    # interceptor. A span per call only while tracing is on (TUNEFORGE_TRACING; configure_tracing), the one
    # interceptor, around the built handlers.
    pipeline = CallPipeline(auth)
    server = grpc.aio.server(interceptors=[TracingInterceptor()] if tracing.enabled() else None,
                             options=SERVER_OPTIONS)
    # Bind first: a taken address fails before anything starts, and components may open channels to
    # this process' own address while they are built.
    port = _bind(server, settings.grpc_host, settings.grpc_port, credentials)
    if credentials is None and not is_loopback(settings.grpc_host):
        log.warning("%s listens on %s without TLS: API keys and data travel in plaintext; set "
                    "TUNEFORGE_TLS_CERT_FILE and TUNEFORGE_TLS_KEY_FILE", name, settings.grpc_host)
    metrics: telemetry.MetricsEndpoint | None = None
    try:
        metrics = start_metrics(settings, name)
        runtime = await open_runtime(settings, name, identity)
    except BaseException:
        identity.close()
        if metrics is not None:
            metrics.close()
        raise
    runtime.address = f"{settings.grpc_host}:{port}"
    components = [factory(runtime) for factory in factories]
    registrar = pipeline.registrar(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, registrar)
    names = []
    for component in components:
        for reg in component.registrations():
            reg.add_to_server(reg.servicer, registrar)
            names.append(reg.name)
    check_access_declared(names)
    enable_reflection(registrar, [*names, health.SERVICE_NAME])
    await server.start()
    for component in components:
        await component.start()
    for service_name in [*names, ""]:
        await health_servicer.set(service_name, health_pb2.HealthCheckResponse.SERVING)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    log.info("%s serving %s on %s", name, ", ".join(names), runtime.address)
    if freeze_heap:
        settle_heap()
    if on_ready:
        on_ready(runtime.address)
    try:
        await stop.wait()
    finally:
        log.info("%s shutting down", name)
        backstop: threading.Timer | None = None
        if end_stuck_shutdown:
            after_s = settings.shutdown_grace_s + SHUTDOWN_BACKSTOP_S
            backstop = threading.Timer(after_s, lambda: end_process(name, after_s))
            backstop.daemon = True
            backstop.start()
        try:
            await health_servicer.enter_graceful_shutdown()
            await server.stop(settings.shutdown_grace_s)
            for component in reversed(components):
                await component.stop()
            await runtime.close()
            if metrics is not None:
                metrics.close()
        finally:
            if backstop is not None:
                backstop.cancel()


# How long past its grace for in-flight calls the shutdown of a service's own process may run before the
# process ends itself: the supervisor that started it may be gone (it stops its children with SIGTERM when
# it dies), and a process stuck there outlived it, holding its port and data dir.
SHUTDOWN_BACKSTOP_S = 30.0


def end_process(name: str, after_s: float) -> None:
    """Ends a process whose shutdown is stuck (from the backstop's thread), saying so."""
    log.error("%s: the shutdown is still running %.0f s after it began; ending the process", name, after_s)
    logging.shutdown()
    os._exit(1)


def settle_heap() -> None:
    """Moves everything alive once the process is serving (imported modules, catalogs, the components) out of
    the garbage collector's sight (`gc.freeze`). Those objects live as long as the process; without this,
    every full collection walks them all: 120-155 ms stop-the-world pauses in the services process,
    measured with gc.callbacks while it fanned metrics out to 1,000 streams, each one delaying every
    stream's next point by as much."""
    gc.collect()
    gc.freeze()


def start_metrics(settings: KitSettings, name: str) -> telemetry.MetricsEndpoint | None:
    """The process' Prometheus /metrics endpoint (services.kit.telemetry) when TUNEFORGE_METRICS_PORT is
    set, on TUNEFORGE_METRICS_HOST (else the gRPC host); a taken port is a ListenError like the gRPC one."""
    if not settings.metrics_port:
        return None
    host = settings.metrics_host or settings.grpc_host
    check_address(host, settings.metrics_port)
    try:
        endpoint = telemetry.serve_metrics(host.strip("[]"), settings.metrics_port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise AddressInUse(f"{host}:{settings.metrics_port}") from None
        raise ListenError(f"cannot serve /metrics on {host}:{settings.metrics_port}: {exc}") from None
    log.info("%s serving Prometheus metrics on http://%s:%d/metrics", name, host, endpoint.port)
    return endpoint


def configure_logging(level: str, log_format: str | None = None) -> None:
    """Text or JSON log lines (TUNEFORGE_LOG_FORMAT; tuneforge_core.logs), with the organization of the
    call being served on each line written while serving it."""
    logs.configure(level, log_format or KitSettings().log_format, filters=[telemetry.OrganizationFilter()])


def configure_tracing(settings: KitSettings, name: str) -> None:
    """The process' OpenTelemetry tracing (TUNEFORGE_TRACING, TUNEFORGE_TRACING_FILE; tuneforge_core.tracing),
    once per process; spans carry service.name `tuneforge-<name>` (`tuneforge` for all services in one)."""
    service = name if name.startswith("tuneforge") else f"tuneforge-{name}"
    tracing.configure(settings.tracing, settings.tracing_file, service_name=service)


def run_until_stopped(coro: Coroutine[Any, Any, None]) -> None:
    """Runs a serving coroutine; an address it cannot listen on is one line on stderr and a non-zero exit
    (`EXIT_ADDRESS_IN_USE` when the address is taken), not a traceback."""
    try:
        asyncio.run(coro)
    except ListenError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_ADDRESS_IN_USE if isinstance(exc, AddressInUse) else 1) from None


def tune_interpreter(settings: KitSettings) -> None:
    """What a service's own process sets of the interpreter (never a test's): the GIL switch interval
    (TUNEFORGE_GIL_SWITCH_INTERVAL_MS). The event loop runs Python for long stretches (writing a point to a
    thousand streams) while database threads need the GIL back after each round trip; a thread waiting
    for it asks the holder to let go only after the interval. At 5 ms (Python's default) against 0.5 ms,
    six alternating fan-out runs each of 1 job x 1,000 followers on PostgreSQL (benchmarks/README.md, run
    K): p99 median 104.4 against 98.3 ms; unary calls and SQLite ingest unchanged."""
    sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)


def main(factories: Sequence[ComponentFactory], name: str) -> None:
    """Entry point of `python -m services.<name>`."""
    settings = KitSettings()
    configure_logging(settings.log_level, settings.log_format)
    tune_interpreter(settings)
    run_until_stopped(serve(factories, settings, name=name, freeze_heap=True, end_stuck_shutdown=True))

"""The process a service runs in: shared resources, the gRPC server and graceful shutdown.

A service is a `Component`: servicers to register plus background tasks (consumers, relays). One process
can host one component (`python -m services.jobs`) or all four (`tuneforge up`); the code is the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from services.kit.interceptors import ErrorMappingInterceptor
from tuneforge_core.nats import connect, ensure_streams
from tuneforge_core.settings import KitSettings
from tuneforge_core.storage import ObjectStore, store_from_settings

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
]


@dataclass
class Registration:
    """One gRPC service of a component: its full name, its servicer and the generated add function."""

    name: str
    servicer: Any
    add_to_server: Callable[[Any, grpc.aio.Server], None]


@dataclass
class Runtime:
    """Resources the components of one process share."""

    settings: KitSettings
    nc: NATS
    js: JetStreamContext
    store: ObjectStore
    address: str = ""
    _channels: dict[str, grpc.aio.Channel] = field(default_factory=dict)

    def channel(self, address: str) -> grpc.aio.Channel:
        """A channel to another service; an empty address means this process' own server."""
        target = address or self.address
        if target not in self._channels:
            self._channels[target] = grpc.aio.insecure_channel(target, options=GRPC_OPTIONS)
        return self._channels[target]

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
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
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


ComponentFactory = Callable[[Runtime], Component]


async def open_runtime(settings: KitSettings, name: str) -> Runtime:
    if not settings.nats_url:
        raise RuntimeError("TUNEFORGE_NATS_URL is not set (tuneforge up starts an embedded nats-server)")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    nc = await connect(settings.nats_url, name)
    js = nc.jetstream()
    await ensure_streams(js)
    return Runtime(settings=settings, nc=nc, js=js, store=store_from_settings(settings))


async def serve(factories: Sequence[ComponentFactory], settings: KitSettings, *, name: str,
                on_ready: Callable[[str], None] | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Runs the components behind one gRPC server until `stop` is set or SIGTERM/SIGINT arrives.

    Shutdown: health turns NOT_SERVING, the server stops accepting calls and gives in-flight ones
    `shutdown_grace_s` to finish, then background tasks stop and NATS drains.
    """
    stop = stop or asyncio.Event()
    runtime = await open_runtime(settings, name)
    server = grpc.aio.server(interceptors=[ErrorMappingInterceptor()], options=GRPC_OPTIONS)
    # Bind first: components may open channels to this process' own address while they are built.
    port = server.add_insecure_port(f"{settings.grpc_host}:{settings.grpc_port}")
    runtime.address = f"{settings.grpc_host}:{port}"
    components = [factory(runtime) for factory in factories]
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = []
    for component in components:
        for reg in component.registrations():
            reg.add_to_server(reg.servicer, server)
            names.append(reg.name)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
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
    if on_ready:
        on_ready(runtime.address)
    try:
        await stop.wait()
    finally:
        log.info("%s shutting down", name)
        await health_servicer.enter_graceful_shutdown()
        await server.stop(settings.shutdown_grace_s)
        for component in reversed(components):
            await component.stop()
        await runtime.close()


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    for noisy in ("nats", "grpc", "botocore", "urllib3", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(factories: Sequence[ComponentFactory], name: str) -> None:
    """Entry point of `python -m services.<name>`."""
    settings = KitSettings()
    configure_logging(settings.log_level)
    asyncio.run(serve(factories, settings, name=name))

"""The channels between services (services.kit.runtime.CHANNEL_OPTIONS): calls spread over every address
their target resolves to, as a Kubernetes headless Service resolves to every replica."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
import pytest

from services.kit.runtime import GRPC_OPTIONS, Runtime
from tuneforge_core.settings import KitSettings

METHOD = "/test.Replica/Name"


@pytest.fixture
async def replicas() -> AsyncIterator[list[int]]:
    """Two servers on loopback, each answering its own name."""
    servers, ports = [], []
    for name in ("a", "b"):
        async def answer(_request: bytes, _context: Any, name: str = name) -> bytes:
            return name.encode()

        server = grpc.aio.server()
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "test.Replica", {"Name": grpc.unary_unary_rpc_method_handler(answer)})])
        ports.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        servers.append(server)
    try:
        yield ports
    finally:
        for server in servers:
            await server.stop(0)


async def answers(channel: grpc.aio.Channel, calls: int) -> Counter[bytes]:
    call = channel.unary_unary(METHOD)
    return Counter([await call(b"", timeout=10) for _ in range(calls)])


async def test_calls_go_to_every_address_the_target_resolves_to(replicas: list[int], tmp_path: Any) -> None:
    target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in replicas)  # two addresses, as DNS would give
    # Only the channel is used: no NATS, store or identity behind this runtime.
    runtime = Runtime(settings=KitSettings(data_dir=tmp_path), nc=cast(Any, None), js=cast(Any, None),
                      store=cast(Any, None), identity=cast(Any, None), service_token="token")
    spread = await answers(runtime.channel(target), 40)
    await runtime.channel(target).close()
    assert set(spread) == {b"a", b"b"} and min(spread.values()) >= 10, spread
    # gRPC's default (pick_first) keeps every call on one of them: what the option is there for.
    async with grpc.aio.insecure_channel(target, options=GRPC_OPTIONS) as channel:
        assert len(await answers(channel, 20)) == 1

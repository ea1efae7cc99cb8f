"""An organization holds at most TUNEFORGE_API_STREAMS_PER_ORGANIZATION streams open on one service process
(services.kit.auth.CallAuth.stream_held, counted by the call pipeline around every server-streaming and
bidirectional RPC): one more is RESOURCE_EXHAUSTED naming the setting; another organization, the platform's
own calls and a stream opened after one closed are not refused. Served for real: the identity component
for the keys, the metrics service, a fake jobs service, nats-server, SQLite."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import (
    api_key_service_pb2,
    api_key_service_pb2_grpc,
    identity_pb2,
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)

from services.identity.component import IdentityComponent
from services.kit.runtime import Runtime, serve
from services.metrics.component import MetricsComponent
from services.metrics.settings import MetricsSettings
from tests.auth import SERVICE_METADATA
from tests.metrics.conftest import FakeJobsComponent, FakeJobService, point
from tuneforge_core import subjects
from tuneforge_core.ids import new_id
from tuneforge_core.nats import connect, publish
from tuneforge_core.settings import KitSettings

LIMIT = 2


@pytest.fixture
async def address(kit_settings: KitSettings) -> AsyncIterator[tuple[str, FakeJobService]]:
    fake = FakeJobService()
    settings = kit_settings.model_copy(update={"api_streams_per_organization": LIMIT})

    def metrics(runtime: Runtime) -> MetricsComponent:
        return MetricsComponent(runtime, MetricsSettings(follow_grace_s=1.0, ingest_process=False))

    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    server = asyncio.create_task(serve(
        [IdentityComponent, metrics, lambda runtime: FakeJobsComponent(runtime, fake)], settings,
        name="stream-limit-test", on_ready=ready.set_result, stop=stop))
    try:
        yield await asyncio.wait_for(ready, 30), fake
    finally:
        stop.set()
        await asyncio.wait_for(server, 30)


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


async def test_an_organization_holds_at_most_its_limit_of_streams(
        address: tuple[str, FakeJobService], kit_settings: KitSettings) -> None:
    target, fake = address
    nc = await connect(kit_settings.nats_url, "test-worker")
    async with grpc.aio.insecure_channel(target) as channel:
        keys = api_key_service_pb2_grpc.ApiKeyServiceStub(channel)
        metrics = metrics_service_pb2_grpc.MetricsServiceStub(channel)
        key = {}
        for org in ("acme", "bravo"):
            response = await keys.CreateApiKey(api_key_service_pb2.CreateApiKeyRequest(
                organization=org, name="k", role=identity_pb2.ROLE_VIEWER), metadata=SERVICE_METADATA)
            key[org] = response.secret
        jobs = {org: fake.add(organization=org) for org in ("acme", "bravo")}
        for job in jobs.values():  # a stored point each stream answers first: then it is surely open
            event_id = new_id("evt")
            await publish(nc.jetstream(), subjects.worker_metrics(job.id),
                          events_pb2.MetricsReported(event_id=event_id, points=[point(0)]), event_id)

        async def opened(org: str, metadata: tuple[tuple[str, str], ...]) -> grpc.aio.UnaryStreamCall:
            call = metrics.StreamMetrics(metrics_service_pb2.StreamMetricsRequest(
                job_id=jobs[org].id, follow=True, organization=org), metadata=metadata)
            first = await asyncio.wait_for(call.read(), 20)
            assert first is not grpc.aio.EOF and first.point.step == 0
            return call

        held = [await opened("acme", bearer(key["acme"])) for _ in range(LIMIT)]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await opened("acme", bearer(key["acme"]))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "TUNEFORGE_API_STREAMS_PER_ORGANIZATION" in (refused.value.details() or "")
        # Another organization has its own streams; the platform's own calls are not counted.
        others = [await opened("bravo", bearer(key["bravo"])),
                  await opened("acme", SERVICE_METADATA)]
        # A stream that ends gives its place back.
        held.pop().cancel()
        for _ in range(100):
            try:
                held.append(await opened("acme", bearer(key["acme"])))
                break
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                await asyncio.sleep(0.05)
        assert len(held) == LIMIT
        for call in held + others:
            call.cancel()
    await nc.drain()

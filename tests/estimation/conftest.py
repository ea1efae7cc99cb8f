"""The estimation service served for real (gRPC on port 0, its SQLite database, a real nats-server) beside a
fake DatasetService answering GetDataset from a dict with the real service's error shapes. Jobs reach it as
they do in production: JobChanged events on TF_EVENTS (there is no JobService to ask)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
import grpc.aio
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import (
    dataset_pb2,
    dataset_service_pb2,
    dataset_service_pb2_grpc,
    estimation_service_pb2_grpc,
    job_pb2,
)

from services.estimation.component import EstimationComponent
from services.estimation.settings import EstimationSettings
from services.kit.runtime import Component, Registration, Runtime, serve
from tests.auth import service_credentials
from tuneforge_core import subjects
from tuneforge_core.errors import not_found
from tuneforge_core.nats import connect, publish
from tuneforge_core.settings import KitSettings

ORG = "acme"


class FakeDatasetService(dataset_service_pb2_grpc.DatasetServiceServicer):
    def __init__(self) -> None:
        self.datasets: dict[str, dataset_pb2.Dataset] = {}
        # GetDataset calls answered, to show when a request's dataset_size spared one.
        self.calls = 0

    def add(
        self,
        name: str,
        *,
        examples: int,
        train: int,
        tokens: int = 0,
        characters: int = 0,
        longest: int = 0,
        train_tokens: int = 0,
        longest_bytes: int = 0,
        warnings: int = 0,
        state: int = dataset_pb2.DATASET_STATE_READY,
    ) -> dataset_pb2.Dataset:
        dataset = dataset_pb2.Dataset(
            id=f"ds_{name}",
            organization=ORG,
            name=name,
            state=state,
            validation=dataset_pb2.ValidationSummary(valid=True, warning_count=warnings),
            statistics=dataset_pb2.DatasetStatistics(
                example_count=examples,
                total_characters=characters,
                tokens=dataset_pb2.TokenStatistics(total=tokens, max=longest, train_tokens=train_tokens),
                longest_example_bytes=longest_bytes,
            ),
            splits=[
                dataset_pb2.DatasetSplit(kind=dataset_pb2.DATASET_SPLIT_KIND_TRAIN, example_count=train),
                dataset_pb2.DatasetSplit(
                    kind=dataset_pb2.DATASET_SPLIT_KIND_VALIDATION, example_count=examples - train
                ),
            ],
        )
        self.datasets[name] = dataset
        return dataset

    async def GetDataset(
        self, request: dataset_service_pb2.GetDatasetRequest, context: grpc.aio.ServicerContext
    ) -> dataset_service_pb2.GetDatasetResponse:
        self.calls += 1
        for dataset in self.datasets.values():
            if dataset.organization == request.organization and request.dataset in (dataset.id, dataset.name):
                return dataset_service_pb2.GetDatasetResponse(dataset=dataset)
        raise not_found("dataset", request.dataset, request.organization)


class FakesComponent(Component):
    def __init__(self, runtime: Runtime, datasets: FakeDatasetService) -> None:
        super().__init__(runtime)
        self.datasets = datasets

    def registrations(self) -> Sequence[Registration]:
        return [
            Registration(
                "tuneforge.v1.DatasetService",
                self.datasets,
                dataset_service_pb2_grpc.add_DatasetServiceServicer_to_server,
            ),
        ]


@dataclass
class EstimationStack:
    estimation: estimation_service_pb2_grpc.EstimationServiceStub
    # The channel the stub uses, for other clients of the service (the jobs service's HardwareCheck).
    channel: grpc.aio.Channel
    datasets: FakeDatasetService
    # A client of the same nats-server, to publish events as the jobs service's outbox relay does.
    js: JetStreamContext


async def publish_job(stack: EstimationStack, job: job_pb2.Job, event_id: str) -> None:
    """Publishes the job's JobChanged, as the jobs service's outbox relay does after a committed change."""
    event = events_pb2.JobChanged(event_id=event_id, job=job, previous_state=job_pb2.JOB_STATE_RUNNING)
    await publish(stack.js, subjects.job_events(job.id), event, event_id)


@pytest.fixture
async def estimation_stack(kit_settings: KitSettings) -> AsyncIterator[EstimationStack]:
    datasets = FakeDatasetService()
    settings = EstimationSettings(hourly_usd={"nvidia-l4": 0.8})
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    server = asyncio.create_task(
        serve(
            [
                lambda runtime: EstimationComponent(runtime, settings),
                lambda runtime: FakesComponent(runtime, datasets),
            ],
            kit_settings,
            name="estimation-test",
            on_ready=ready.set_result,
            stop=stop,
        )
    )
    address = await asyncio.wait_for(ready, 15)
    channel = grpc.aio.insecure_channel(address, interceptors=service_credentials())
    nc: NATS = await connect(kit_settings.nats_url, "estimation-test-client")
    try:
        yield EstimationStack(
            estimation_service_pb2_grpc.EstimationServiceStub(channel), channel, datasets, nc.jetstream()
        )
    finally:
        await nc.close()
        await channel.close()
        stop.set()
        await asyncio.wait_for(server, 15)

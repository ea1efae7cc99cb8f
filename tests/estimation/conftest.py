"""The estimation service served for real (gRPC on port 0) beside a fake DatasetService answering GetDataset
from a dict with the real service's error shapes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
import grpc.aio
import pytest
from tuneforge.v1 import (
    dataset_pb2,
    dataset_service_pb2,
    dataset_service_pb2_grpc,
    estimation_service_pb2_grpc,
)

from services.estimation.component import EstimationComponent
from services.estimation.settings import EstimationSettings
from services.kit.errors import not_found
from services.kit.runtime import Component, Registration, Runtime, serve
from services.kit.settings import KitSettings

ORG = "acme"


class FakeDatasetService(dataset_service_pb2_grpc.DatasetServiceServicer):
    def __init__(self) -> None:
        self.datasets: dict[str, dataset_pb2.Dataset] = {}

    def add(self, name: str, *, examples: int, train: int, tokens: int = 0, characters: int = 0,
            longest: int = 0, state: int = dataset_pb2.DATASET_STATE_READY) -> dataset_pb2.Dataset:
        dataset = dataset_pb2.Dataset(
            id=f"ds_{name}", organization=ORG, name=name, state=state,
            statistics=dataset_pb2.DatasetStatistics(
                example_count=examples, total_characters=characters,
                tokens=dataset_pb2.TokenStatistics(total=tokens, max=longest)),
            splits=[dataset_pb2.DatasetSplit(kind=dataset_pb2.DATASET_SPLIT_KIND_TRAIN, example_count=train),
                    dataset_pb2.DatasetSplit(kind=dataset_pb2.DATASET_SPLIT_KIND_VALIDATION,
                                             example_count=examples - train)])
        self.datasets[name] = dataset
        return dataset

    async def GetDataset(self, request: dataset_service_pb2.GetDatasetRequest,
                         context: grpc.aio.ServicerContext) -> dataset_service_pb2.GetDatasetResponse:
        for dataset in self.datasets.values():
            if dataset.organization == request.organization and request.dataset in (dataset.id, dataset.name):
                return dataset_service_pb2.GetDatasetResponse(dataset=dataset)
        raise not_found("dataset", request.dataset, request.organization)


class FakeDatasetsComponent(Component):
    def __init__(self, runtime: Runtime, servicer: FakeDatasetService) -> None:
        super().__init__(runtime)
        self.servicer = servicer

    def registrations(self) -> Sequence[Registration]:
        return [Registration("tuneforge.v1.DatasetService", self.servicer,
                             dataset_service_pb2_grpc.add_DatasetServiceServicer_to_server)]


@dataclass
class EstimationStack:
    estimation: estimation_service_pb2_grpc.EstimationServiceStub
    datasets: FakeDatasetService


@pytest.fixture
async def estimation_stack(kit_settings: KitSettings) -> AsyncIterator[EstimationStack]:
    fake = FakeDatasetService()
    settings = EstimationSettings(hourly_usd={"nvidia-l4": 0.8})
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    server = asyncio.create_task(serve(
        [lambda runtime: EstimationComponent(runtime, settings),
         lambda runtime: FakeDatasetsComponent(runtime, fake)],
        kit_settings, name="estimation-test", on_ready=ready.set_result, stop=stop))
    address = await asyncio.wait_for(ready, 15)
    channel = grpc.aio.insecure_channel(address)
    try:
        yield EstimationStack(estimation_service_pb2_grpc.EstimationServiceStub(channel), fake)
    finally:
        await channel.close()
        stop.set()
        await asyncio.wait_for(server, 15)

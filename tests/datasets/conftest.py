"""Fixtures of the datasets tests: the component served over real gRPC in the test's event loop."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc.aio
import pytest
from tuneforge.v1 import dataset_service_pb2_grpc

from services.datasets.settings import DatasetSettings
from tests.auth import service_credentials
from tests.datasets.helpers import MAX_LINE_BYTES, UPLOAD_LIMIT, serving
from tuneforge_core.settings import KitSettings


@pytest.fixture
def datasets_settings(kit_settings: KitSettings, tmp_path_factory: pytest.TempPathFactory) -> DatasetSettings:
    # Tokenizers are model references: the tests' tiny models live under pytest's base temp folder.
    return DatasetSettings(**{**kit_settings.model_dump(), "max_upload_bytes": UPLOAD_LIMIT,
                              "max_line_bytes": MAX_LINE_BYTES,
                              "model_roots": str(tmp_path_factory.getbasetemp())})


@pytest.fixture
def objects_root(datasets_settings: DatasetSettings) -> Path:
    from tuneforge_core.storage import LocalObjectStore, store_from_settings

    store = store_from_settings(datasets_settings)
    assert isinstance(store, LocalObjectStore)
    return store.root


@pytest.fixture
async def datasets_address(datasets_settings: DatasetSettings) -> AsyncIterator[str]:
    async with serving(datasets_settings) as address:
        yield address


@pytest.fixture
async def stub(datasets_address: str) -> AsyncIterator[dataset_service_pb2_grpc.DatasetServiceStub]:
    async with grpc.aio.insecure_channel(datasets_address, interceptors=service_credentials()) as channel:
        yield dataset_service_pb2_grpc.DatasetServiceStub(channel)

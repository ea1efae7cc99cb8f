"""The datasets migrations and one upload/get on PostgreSQL, in a schema of its own that is dropped after."""

from __future__ import annotations

import grpc.aio
import pytest
from sqlalchemy import inspect
from tuneforge.v1 import dataset_pb2
from tuneforge.v1 import dataset_service_pb2 as pb
from tuneforge.v1.dataset_service_pb2_grpc import DatasetServiceStub

from services.datasets.component import MIGRATIONS
from services.datasets.settings import DatasetSettings
from services.kit.db import Database
from tests.auth import service_credentials
from tests.datasets.helpers import chat_lines, jsonl, meta, serving, upload_requests

pytestmark = pytest.mark.postgres

def test_migrations_apply_twice_and_create_the_tables(postgres_url: str) -> None:
    db = Database(postgres_url, "datasets")
    try:
        db.migrate(MIGRATIONS)
        db.migrate(MIGRATIONS)
        tables = set(inspect(db.engine).get_table_names())
        assert {"datasets_datasets", "datasets_splits", "datasets_outbox", "datasets_job_usage",
                "alembic_version_datasets"} <= tables
    finally:
        db.dispose()


async def test_upload_and_get_on_postgres(postgres_url: str, datasets_settings: DatasetSettings) -> None:
    settings = DatasetSettings(**{**datasets_settings.model_dump(), "database_url": postgres_url})
    async with serving(settings) as address, grpc.aio.insecure_channel(
            address, interceptors=service_credentials()) as channel:
        stub = DatasetServiceStub(channel)
        created = await stub.UploadDataset(upload_requests(meta(request_id="r1"), jsonl(chat_lines(120))))
        assert created.dataset.state == dataset_pb2.DATASET_STATE_READY
        got = await stub.GetDataset(pb.GetDatasetRequest(organization="acme", dataset="support-chats"))
        assert got.dataset == created.dataset
        again = await stub.UploadDataset(upload_requests(meta(request_id="r1"), jsonl(chat_lines(120))))
        assert again.dataset.id == created.dataset.id
        page = await stub.ListDatasets(pb.ListDatasetsRequest(organization="acme", page_size=1))
        assert [d.id for d in page.datasets] == [created.dataset.id] and page.next_page_token == ""

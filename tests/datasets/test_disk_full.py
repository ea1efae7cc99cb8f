"""A full disk is the caller's RESOURCE_EXHAUSTED, never INTERNAL, and leaves nothing half-written: neither
when storing the dataset's objects nor when receiving the upload; the next upload after space returns
succeeds."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import IO, Any

import grpc
import pytest
from tuneforge.v1 import dataset_pb2
from tuneforge.v1 import dataset_service_pb2 as pb
from tuneforge.v1.dataset_service_pb2_grpc import DatasetServiceStub

from services.datasets import uploads
from services.datasets.settings import DatasetSettings
from tests.datasets.helpers import ErrorDetails, chat_lines, jsonl, meta, object_files, upload_requests
from tuneforge_core.storage import LocalObjectStore


async def upload(stub: DatasetServiceStub, data: bytes) -> pb.UploadDatasetResponse:
    return await stub.UploadDataset(upload_requests(meta(), data, 4096))


async def refused(stub: DatasetServiceStub, data: bytes) -> ErrorDetails:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await upload(stub, data)
    return ErrorDetails(caught.value)


async def assert_full_and_nothing_left(stub: DatasetServiceStub, err: ErrorDetails,
                                       settings: DatasetSettings, objects_root: Path) -> None:
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED, (err.code, err.message)
    assert "disk is full" in err.message and "retry later" in err.message
    assert err.reason == "QUOTA_EXCEEDED" and err.info.metadata["resource"] == "disk"
    assert object_files(objects_root / "datasets") == []
    assert [p for p in object_files(objects_root) if p.name.startswith(".tmp-")] == []
    assert object_files(settings.data_dir / "tmp") == []
    listed = await stub.ListDatasets(pb.ListDatasetsRequest(organization="acme"))
    assert list(listed.datasets) == []


async def test_the_store_filling_up_mid_upload_is_resource_exhausted_and_leaves_nothing(
        stub: DatasetServiceStub, datasets_settings: DatasetSettings, objects_root: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    real_put = LocalObjectStore.put_file
    stored: list[str] = []

    def put_until_full(self: LocalObjectStore, key: str, path: Path) -> str:
        # The first object fits; the next is cut off half-way by a full disk.
        if stored:
            target = self.root / key
            target.parent.mkdir(parents=True, exist_ok=True)
            (target.parent / ".tmp-partial").write_bytes(path.read_bytes()[:10])
            (target.parent / ".tmp-partial").unlink()  # what put_file's own cleanup does
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
        stored.append(key)
        return real_put(self, key, path)

    monkeypatch.setattr(LocalObjectStore, "put_file", put_until_full)
    data = jsonl(chat_lines(150))
    err = await refused(stub, data)
    assert stored, (err.code, err.message)  # some objects were stored before the disk filled up
    await assert_full_and_nothing_left(stub, err, datasets_settings, objects_root)

    monkeypatch.undo()  # space returns
    response = await upload(stub, data)
    assert response.dataset.state == dataset_pb2.DATASET_STATE_READY
    assert object_files(datasets_settings.data_dir / "tmp") == []


async def test_the_disk_filling_up_while_receiving_is_resource_exhausted_and_leaves_nothing(
        stub: DatasetServiceStub, datasets_settings: DatasetSettings, objects_root: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = uploads._write_chunk
    written: list[int] = []

    def write_until_full(f: IO[bytes], digest: Any, chunk: bytes) -> None:
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(len(chunk))
        real_write(f, digest, chunk)

    monkeypatch.setattr(uploads, "_write_chunk", write_until_full)
    data = jsonl(chat_lines(150))
    err = await refused(stub, data)
    assert written
    await assert_full_and_nothing_left(stub, err, datasets_settings, objects_root)

    monkeypatch.undo()
    assert (await upload(stub, data)).dataset.state == dataset_pb2.DATASET_STATE_READY

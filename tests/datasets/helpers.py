"""Test data and client helpers for the datasets tests."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import unquote, urlparse

import grpc
import grpc.aio
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from tuneforge.v1 import dataset_pb2
from tuneforge.v1 import dataset_service_pb2 as pb

from services.datasets.component import DatasetsComponent
from services.kit.runtime import serve
from tuneforge_core.settings import KitSettings

# The upload limit the integration tests run the service with.
UPLOAD_LIMIT = 256 * 1024
# The longest line they accept, so a "huge single line" fits within the upload limit.
MAX_LINE_BYTES = 64 * 1024


def chat_example(i: int, *, system: bool = False) -> dict[str, object]:
    messages = [{"role": "user", "content": f"What is {i} + {i}?"},
                {"role": "assistant", "content": f"{i} + {i} is {2 * i}."}]
    if system:
        messages.insert(0, {"role": "system", "content": "You are a calculator."})
    return {"messages": messages}


def chat_lines(n: int, start: int = 0) -> list[str]:
    return [json.dumps(chat_example(i, system=i % 2 == 0)) for i in range(start, start + n)]


def jsonl(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_bytes(jsonl(lines))
    return path


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def upload_requests(metadata: pb.UploadDatasetMetadata, data: bytes,
                    chunk_size: int = 4096) -> Iterator[pb.UploadDatasetRequest]:
    yield pb.UploadDatasetRequest(metadata=metadata)
    for i in range(0, len(data), chunk_size):
        yield pb.UploadDatasetRequest(chunk=data[i:i + chunk_size])


def validate_requests(metadata: pb.UploadDatasetMetadata, data: bytes,
                      chunk_size: int = 4096) -> Iterator[pb.ValidateDatasetRequest]:
    yield pb.ValidateDatasetRequest(metadata=metadata)
    for i in range(0, len(data), chunk_size):
        yield pb.ValidateDatasetRequest(chunk=data[i:i + chunk_size])


def meta(organization: str = "acme", name: str = "support-chats",
         **kwargs: object) -> pb.UploadDatasetMetadata:
    return pb.UploadDatasetMetadata(organization=organization, name=name, **kwargs)  # type: ignore[arg-type]


class ErrorDetails:
    """The google.rpc.Status of a failed call, unpacked."""

    def __init__(self, err: grpc.aio.AioRpcError) -> None:
        self.code = err.code()
        self.message = err.details() or ""
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
        assert status is not None, "the error carries no google.rpc.Status"
        self.status: status_pb2.Status = status
        self.info = error_details_pb2.ErrorInfo()
        self.bad_request = error_details_pb2.BadRequest()
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                detail.Unpack(self.info)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                detail.Unpack(self.bad_request)

    @property
    def reason(self) -> str:
        return self.info.reason

    @property
    def fields(self) -> list[str]:
        return [v.field for v in self.bad_request.field_violations]


def local_path(uri: str) -> Path:
    parsed = urlparse(uri)
    assert parsed.scheme == "file", uri
    return Path(unquote(parsed.path))


def split_counts(dataset: dataset_pb2.Dataset) -> dict[str, int]:
    return {dataset_pb2.DatasetSplitKind.Name(s.kind).removeprefix("DATASET_SPLIT_KIND_").lower():
            s.example_count for s in dataset.splits}


def object_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []



@asynccontextmanager
async def serving(settings: KitSettings) -> AsyncIterator[str]:
    """Runs the datasets component until the block ends; yields its address."""
    stop = asyncio.Event()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve([DatasetsComponent], settings, name="datasets",
                                     on_ready=ready.set_result, stop=stop))
    done, _ = await asyncio.wait({ready, task}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    assert ready in done, "the datasets component did not start in 30 s"
    try:
        yield ready.result()
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)

"""Imports stuck on a source that never answers hold only their own pool: database-backed RPCs still answer
at once, one more import is refused with RESOURCE_EXHAUSTED naming the limit, and the stuck imports end
FAILED once their read timeout has passed."""

from __future__ import annotations

import asyncio
import socket
import socketserver
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import grpc.aio
import pytest
from tuneforge.v1 import dataset_pb2
from tuneforge.v1 import dataset_service_pb2 as pb
from tuneforge.v1.dataset_service_pb2_grpc import DatasetServiceStub

from services.datasets.settings import DatasetSettings
from tests.auth import service_credentials
from tests.datasets.helpers import ErrorDetails, object_files, serving
from tuneforge_core.settings import KitSettings

WORKERS = 3
READ_TIMEOUT_S = 1.5
PROCESSING = dataset_pb2.DATASET_STATE_PROCESSING


class Silent(socketserver.ThreadingTCPServer):
    """A loopback "S3" that accepts every connection and never answers it, except (with `answer_checks`)
    the one-byte ranged GET with which CreateDataset checks a source, so imports start and then hang."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, answer_checks: bool) -> None:
        self.answer_checks = answer_checks
        self.closing = threading.Event()
        self.requests: list[str] = []
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(socketserver.StreamRequestHandler):
    server: Silent

    def handle(self) -> None:
        while not self.server.closing.is_set():
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                line = self.rfile.readline()
                if not line:
                    return
                head += line
            request = head.decode("latin-1")
            self.server.requests.append(request.split("\r\n", 1)[0])
            if self.server.answer_checks and request.startswith("GET ") and "bytes=0-0" in request.lower():
                self.wfile.write(b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-0/4096\r\n"
                                 b"Content-Length: 1\r\nContent-Type: application/octet-stream\r\n\r\n{")
                self.wfile.flush()
                continue
            self.server.closing.wait()  # never answers
            return


@pytest.fixture
def silent_s3() -> Iterator[Silent]:
    server = Silent(answer_checks=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.closing.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def settings(kit_settings: KitSettings, monkeypatch: pytest.MonkeyPatch) -> DatasetSettings:
    # The silent server listens on loopback, which imports may reach only where the operator allows it.
    monkeypatch.setenv("TUNEFORGE_IMPORT_ENDPOINT_ALLOWLIST", "127.0.0.1")
    return DatasetSettings(**{**kit_settings.model_dump(), "import_endpoint_allowlist": "127.0.0.1",
                              "import_workers": WORKERS, "import_read_timeout_s": READ_TIMEOUT_S,
                              "import_connect_timeout_s": READ_TIMEOUT_S})


@pytest.fixture
async def stub(settings: DatasetSettings) -> AsyncIterator[DatasetServiceStub]:
    # What the process' services share: the loop's default executor, here as small as a 2-core machine's
    # would be busy. Imports that used it stalled every RPC (authentication and database calls) behind them.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=2))
    async with serving(settings) as address, grpc.aio.insecure_channel(
            address, interceptors=service_credentials()) as channel:
        yield DatasetServiceStub(channel)


def request(endpoint: str, name: str) -> pb.CreateDatasetRequest:
    return pb.CreateDatasetRequest(
        organization="acme", name=name,
        source=dataset_pb2.DatasetSource(s3_uri=f"s3://imports/{name}.jsonl", endpoint_url=endpoint))


async def test_stuck_imports_hold_only_their_pool_and_the_next_one_is_refused(
        stub: DatasetServiceStub, silent_s3: Silent, settings: DatasetSettings) -> None:
    started = time.monotonic()
    created = [(await stub.CreateDataset(request(silent_s3.endpoint, f"stuck-{k}"))).dataset
               for k in range(WORKERS)]
    assert all(d.state == PROCESSING for d in created)
    async with asyncio.timeout(5):  # every import is past its check, waiting on a source that never answers
        while True:
            if sum(line.startswith("HEAD ") for line in silent_s3.requests) >= WORKERS:
                break
            await asyncio.sleep(0.05)

    # Database-backed RPCs answer at once, again and again, while the imports hang.
    async with asyncio.timeout(1):
        for dataset in created:
            got = await stub.GetDataset(pb.GetDatasetRequest(organization="acme", dataset=dataset.id))
            assert got.dataset.state == PROCESSING
        listed = await stub.ListDatasets(pb.ListDatasetsRequest(organization="acme"))
        assert {d.id for d in listed.datasets} == {d.id for d in created}

    # One more import is refused at once, naming the limit; it left nothing behind.
    before = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateDataset(request(silent_s3.endpoint, "one-too-many"))
    assert time.monotonic() - before < 1
    err = ErrorDetails(caught.value)
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED, err.message
    assert err.reason == "QUOTA_EXCEEDED"
    assert dict(err.info.metadata) == {"limit": "import_workers", "value": str(WORKERS),
                                       "pool": "dataset imports"}
    assert f"TUNEFORGE_IMPORT_WORKERS={WORKERS}" in err.message
    listed = await stub.ListDatasets(pb.ListDatasetsRequest(organization="acme"))
    assert len(listed.datasets) == WORKERS

    # The stuck imports end FAILED once their read timeout (3 attempts) has passed, and free their places.
    async with asyncio.timeout(60):
        while True:
            states = [(await stub.GetDataset(pb.GetDatasetRequest(organization="acme", dataset=d.id))).dataset
                      for d in created]
            if all(s.state != PROCESSING for s in states):
                break
            await asyncio.sleep(0.2)
    assert time.monotonic() - started >= READ_TIMEOUT_S
    for dataset in states:
        assert dataset.state == dataset_pb2.DATASET_STATE_FAILED
        assert "did not answer in time" in dataset.failure_message, dataset.failure_message
    assert object_files(settings.data_dir / "tmp") == []
    objects = Path(settings.resolved_storage_url().removeprefix("file://"))
    assert object_files(objects / "datasets") == []

    # Room again: the next import is accepted.
    again = await stub.CreateDataset(request(silent_s3.endpoint, "after-the-timeouts"))
    assert again.dataset.state == PROCESSING


async def test_a_source_that_never_answers_the_check_fails_the_call_after_its_timeout(
        stub: DatasetServiceStub, silent_s3: Silent) -> None:
    silent_s3.answer_checks = False
    before = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateDataset(request(silent_s3.endpoint, "never-checked"))
    assert time.monotonic() - before >= READ_TIMEOUT_S
    err = ErrorDetails(caught.value)
    assert err.code == grpc.StatusCode.UNAVAILABLE and "did not answer in time" in err.message
    listed = await stub.ListDatasets(pb.ListDatasetsRequest(organization="acme"))
    assert list(listed.datasets) == []


def test_silent_server_accepts_and_never_answers(silent_s3: Silent) -> None:
    """The stand-in itself: a plain request gets no byte back."""
    with socket.create_connection(("127.0.0.1", silent_s3.server_address[1]), timeout=0.3) as conn:
        conn.sendall(b"HEAD /imports/x HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(TimeoutError):
            conn.recv(1)

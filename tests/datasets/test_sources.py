"""CreateDataset imports: S3 and GCS against a real seaweedfs S3 server, Hugging Face datasets saved to disk,
credentials that never leave sealed storage, and imports that are interrupted and resumed."""

from __future__ import annotations

import asyncio
import json
import logging
import stat
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from cryptography.fernet import Fernet
from google.protobuf.message import Message
from tuneforge.v1 import dataset_pb2
from tuneforge.v1 import dataset_service_pb2 as pb
from tuneforge.v1.dataset_service_pb2_grpc import DatasetServiceStub

from services.datasets.component import MIGRATIONS
from services.datasets.converters import source_to_proto
from services.datasets.domain import DatasetState
from services.datasets.imports import IMPORT_MANIFEST
from services.datasets.manager import DatasetManager
from services.datasets.settings import DatasetSettings
from services.datasets.sources import (
    HUB_ID_RE,
    MAX_CREDENTIAL,
    MAX_SOURCE_ADDRESS,
    Credentials,
    EndpointAllowlist,
    FetchSettings,
    HubSource,
    ImportCancelled,
    ObjectReader,
    ObjectSource,
    Sink,
    import_request_from_proto,
    parse_source,
)
from services.kit.credentials import KEY_FILE, CredentialCipher, CredentialsKeyError
from services.kit.db import Database
from tests.auth import service_credentials
from tests.datasets.helpers import (
    ErrorDetails,
    chat_lines,
    jsonl,
    object_files,
    serving,
    sha256,
    split_counts,
)
from tests.seaweed import free_port, seaweedfs
from tuneforge_core.errors import ResourceExhausted, Violations
from tuneforge_core.settings import KitSettings
from tuneforge_core.storage import LocalObjectStore

OWNER_KEY, OWNER_SECRET = "OWNERKEY", "owner-secret-7f3a9c1e5b"
OUTSIDER_KEY, OUTSIDER_SECRET = "OUTSIDERKEY", "outsider-secret-1c4e"
BUCKET = "imports"
LIMIT = 8 * 1024 * 1024
READY, FAILED, PROCESSING = (
    dataset_pb2.DATASET_STATE_READY,
    dataset_pb2.DATASET_STATE_FAILED,
    dataset_pb2.DATASET_STATE_PROCESSING,
)


# -- a real S3 server ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """seaweedfs with two identities: the owner of every bucket, and an outsider who may read only a bucket
    named "other" (so its reads of BUCKET are denied). Anonymous requests are denied."""
    identities = [
        {
            "name": "owner",
            "credentials": [{"accessKey": OWNER_KEY, "secretKey": OWNER_SECRET}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        },
        {
            "name": "outsider",
            "credentials": [{"accessKey": OUTSIDER_KEY, "secretKey": OUTSIDER_SECRET}],
            "actions": ["Read:other", "List:other"],
        },
    ]
    with seaweedfs(tmp_path_factory.mktemp("seaweed"), identities,
                   lambda endpoint: owner_client(endpoint).create_bucket(Bucket=BUCKET)) as endpoint:
        yield endpoint


def owner_client(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=OWNER_KEY,
        aws_secret_access_key=OWNER_SECRET,
    )


def put(endpoint: str, key: str, data: bytes) -> str:
    owner_client(endpoint).put_object(Bucket=BUCKET, Key=key, Body=data)
    return f"s3://{BUCKET}/{key}"


def big_chat_file(min_bytes: int) -> bytes:
    lines: list[str] = []
    size, start = 0, 0
    while size < min_bytes:
        batch = chat_lines(1000, start=start)
        lines += batch
        size += sum(len(line) + 1 for line in batch)
        start += 1000
    return jsonl(lines)


# -- the service -----------------------------------------------------------------------------------------


# seaweedfs listens on loopback, which imports may reach only where the operator allows it.
LOOPBACK_ALLOWED = "127.0.0.1"


@pytest.fixture
def settings(kit_settings: KitSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> DatasetSettings:
    (tmp_path / "hf").mkdir()
    # Both ways the service may read it: its settings, and the environment its own fields come from.
    monkeypatch.setenv("TUNEFORGE_IMPORT_ENDPOINT_ALLOWLIST", LOOPBACK_ALLOWED)
    return DatasetSettings(
        **{
            **kit_settings.model_dump(),
            "max_upload_bytes": LIMIT,
            "hf_local_root": tmp_path / "hf",
            "import_multipart_threshold_bytes": 256 * 1024,
            "import_multipart_chunk_bytes": 256 * 1024,
            "import_endpoint_allowlist": LOOPBACK_ALLOWED,
        }
    )


@pytest.fixture
async def stub(settings: DatasetSettings) -> AsyncIterator[DatasetServiceStub]:
    async with serving(settings) as address, grpc.aio.insecure_channel(
            address, interceptors=service_credentials()) as channel:
        yield DatasetServiceStub(channel)


async def failure(call: Any) -> ErrorDetails:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return ErrorDetails(caught.value)


def owner_credentials(**kwargs: str) -> pb.SourceCredentials:
    return pb.SourceCredentials(**{"access_key_id": OWNER_KEY, "secret_access_key": OWNER_SECRET, **kwargs})


def s3_request(uri: str, endpoint: str, name: str = "imported", **kwargs: Any) -> pb.CreateDatasetRequest:
    kwargs.setdefault("credentials", owner_credentials())
    return pb.CreateDatasetRequest(
        organization="acme",
        name=name,
        min_examples=10,
        source=dataset_pb2.DatasetSource(s3_uri=uri, endpoint_url=endpoint),
        **kwargs,
    )


async def settled(stub: DatasetServiceStub, dataset_id: str) -> dataset_pb2.Dataset:
    """The dataset once its import ended (READY or FAILED); fails after a minute."""
    async with asyncio.timeout(60):
        while True:
            request = pb.GetDatasetRequest(organization="acme", dataset=dataset_id)
            dataset = (await stub.GetDataset(request)).dataset
            if dataset.state != PROCESSING:
                return dataset
            await asyncio.sleep(0.05)


def assert_no_trace(settings: DatasetSettings, dataset_id: str) -> None:
    """Nothing of the import is left: no temp file, and no object (the sealed request included)."""
    assert object_files(settings.data_dir / "tmp") == []
    objects = Path(settings.resolved_storage_url().removeprefix("file://"))
    assert [p for p in object_files(objects) if dataset_id in str(p)] == []


def files_containing(root: Path, secret: bytes) -> list[Path]:
    return [p for p in object_files(root) if secret in p.read_bytes()]


# -- S3 ------------------------------------------------------------------------------------------------


@pytest.mark.s3
async def test_s3_import_becomes_ready_and_its_secrets_appear_nowhere(
    stub: DatasetServiceStub,
    s3_endpoint: str,
    settings: DatasetSettings,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="services")
    caplog.set_level(logging.INFO)
    data = jsonl(chat_lines(120))
    uri = put(s3_endpoint, "chats/support.jsonl", data)
    responses: list[Message] = []
    request = s3_request(uri, s3_endpoint, description="from S3", request_id="imp-1")
    created = await stub.CreateDataset(request)
    responses.append(created)
    assert created.dataset.state == PROCESSING
    assert created.dataset.source.s3_uri == uri
    assert created.dataset.format == dataset_pb2.DATASET_FORMAT_UNSPECIFIED

    dataset = await settled(stub, created.dataset.id)
    assert dataset.state == READY, dataset.failure_message
    assert dataset.format == dataset_pb2.DATASET_FORMAT_OPENAI_CHAT
    assert dataset.source.s3_uri == uri
    assert (dataset.size_bytes, dataset.sha256) == (len(data), sha256(data))
    assert sum(split_counts(dataset).values()) == 120
    again = await stub.CreateDataset(request)  # same request_id: the same dataset, nothing new
    assert again.dataset.id == dataset.id
    responses += [
        dataset,
        again,
        await stub.GetValidationReport(
            pb.GetValidationReportRequest(organization="acme", dataset=dataset.id)
        ),
        await stub.ListDatasets(pb.ListDatasetsRequest(organization="acme")),
    ]
    assert not [p for p in object_files(tmp_path / "objects") if p.name.startswith("import-request")]
    assert object_files(settings.data_dir / "tmp") == []
    assert OWNER_SECRET not in caplog.text
    for response in responses:
        assert OWNER_SECRET.encode() not in response.SerializeToString() and OWNER_SECRET not in str(response)
    assert files_containing(tmp_path, OWNER_SECRET.encode()) == []
    assert "importing from s3://" in caplog.text  # the log does say what happened


@pytest.mark.s3
async def test_multipart_object_is_read_in_ranges_and_imported(
    stub: DatasetServiceStub, s3_endpoint: str, settings: DatasetSettings, tmp_path: Path
) -> None:
    data = big_chat_file(5 * 1024 * 1024 + 100_000)
    client = owner_client(s3_endpoint)
    key = "big/multipart.jsonl"
    upload_id = client.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]
    cut = 5 * 1024 * 1024  # S3's smallest part but the last
    parts = [
        client.upload_part(Bucket=BUCKET, Key=key, UploadId=upload_id, PartNumber=n, Body=chunk)["ETag"]
        for n, chunk in ((1, data[:cut]), (2, data[cut:]))
    ]
    client.complete_multipart_upload(
        Bucket=BUCKET,
        Key=key,
        UploadId=upload_id,
        MultipartUpload={"Parts": [{"PartNumber": n, "ETag": etag} for n, etag in enumerate(parts, start=1)]},
    )
    assert client.head_object(Bucket=BUCKET, Key=key)["ETag"].strip('"').endswith("-2")  # a multipart object

    # The reader downloads it as concurrent ranged GETs of 256 KiB, in order into the hash.
    ranges: list[str] = []
    client.meta.events.register(
        "before-send.s3.GetObject", lambda request, **_: ranges.append(request.headers.get("Range", b""))
    )
    source = ObjectSource("s3", BUCKET, key, "us-east-1", s3_endpoint)
    reader = ObjectReader(source, Credentials(), FetchSettings(LIMIT, 256 * 1024, 256 * 1024), client=client)
    reader.check()
    size, digest = reader.fetch(tmp_path / "copy.jsonl", tmp_path, threading.Event())
    assert (size, digest) == (len(data), sha256(data))
    assert len([r for r in ranges if r]) >= len(data) // (256 * 1024)

    created = await stub.CreateDataset(s3_request(f"s3://{BUCKET}/{key}", s3_endpoint))
    dataset = await settled(stub, created.dataset.id)
    assert dataset.state == READY, dataset.failure_message
    assert (dataset.size_bytes, dataset.sha256) == (len(data), sha256(data))


@pytest.mark.s3
async def test_source_problems_get_their_status_and_leave_nothing(
    stub: DatasetServiceStub, s3_endpoint: str, settings: DatasetSettings
) -> None:
    uri = put(s3_endpoint, "chats/ok.jsonl", jsonl(chat_lines(20)))
    put(s3_endpoint, "chats/huge.jsonl", b"x" * (LIMIT + 1))
    cases: list[tuple[pb.CreateDatasetRequest, grpc.StatusCode, str, str]] = [
        (
            s3_request(f"s3://{BUCKET}/chats/missing.jsonl", s3_endpoint),
            grpc.StatusCode.NOT_FOUND,
            "NOT_FOUND",
            "source.s3_uri",
        ),
        (
            s3_request("s3://no-such-bucket/a.jsonl", s3_endpoint),
            grpc.StatusCode.NOT_FOUND,
            "NOT_FOUND",
            "source.s3_uri",
        ),
        (
            s3_request(uri, s3_endpoint, credentials=owner_credentials(secret_access_key="wrong")),
            grpc.StatusCode.UNAUTHENTICATED,
            "SOURCE_ACCESS_DENIED",
            "credentials.secret_access_key",
        ),
        (
            s3_request(uri, s3_endpoint, credentials=owner_credentials(access_key_id="NOBODY")),
            grpc.StatusCode.UNAUTHENTICATED,
            "SOURCE_ACCESS_DENIED",
            "credentials.access_key_id",
        ),
        (
            s3_request(
                uri,
                s3_endpoint,
                credentials=pb.SourceCredentials(
                    access_key_id=OUTSIDER_KEY, secret_access_key=OUTSIDER_SECRET
                ),
            ),
            grpc.StatusCode.PERMISSION_DENIED,
            "SOURCE_ACCESS_DENIED",
            "source.s3_uri",
        ),
        (
            s3_request(uri, s3_endpoint, credentials=pb.SourceCredentials()),
            grpc.StatusCode.PERMISSION_DENIED,
            "SOURCE_ACCESS_DENIED",
            "source.s3_uri",
        ),
        (
            s3_request(f"s3://{BUCKET}/chats/huge.jsonl", s3_endpoint),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "UPLOAD_TOO_LARGE",
            "source.s3_uri",
        ),
        (
            s3_request("s3:/imports/chats/ok.jsonl", s3_endpoint),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
            "source.s3_uri",
        ),
        (
            s3_request(f"s3://{BUCKET}/chats/", s3_endpoint),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
            "source.s3_uri",
        ),
        (
            s3_request(uri, f"http://127.0.0.1:{free_port()}"),
            grpc.StatusCode.UNAVAILABLE,
            "DEPENDENCY_UNAVAILABLE",
            "",
        ),
        (
            s3_request(uri, "http://user:pw@127.0.0.1:1"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
            "source.endpoint_url",
        ),
        (
            s3_request(uri, s3_endpoint, credentials=pb.SourceCredentials(access_key_id=OWNER_KEY)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
            "credentials.secret_access_key",
        ),
        (
            pb.CreateDatasetRequest(organization="acme", name="x"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
            "source",
        ),
    ]
    for request, code, reason, field in cases:
        err = await failure(stub.CreateDataset(request))
        assert (err.code, err.reason) == (code, reason), (request.source, err.message)
        assert not field or field in err.fields, (request.source, err.fields)
        assert OWNER_SECRET not in err.message and "wrong" not in err.message
    # Upload rules and source rules are reported together, under CreateDatasetRequest's field names.
    err = await failure(
        stub.CreateDataset(
            pb.CreateDatasetRequest(
                organization="acme",
                name="Bad Name!",
                source=dataset_pb2.DatasetSource(gcs_uri="gs://"),
                split=dataset_pb2.SplitConfig(train_fraction=2),
            )
        )
    )
    assert {"name", "source.gcs_uri", "split.train_fraction"} <= set(err.fields), err.fields
    listed = await stub.ListDatasets(pb.ListDatasetsRequest(organization="acme"))
    assert list(listed.datasets) == []
    assert object_files(Path(settings.resolved_storage_url().removeprefix("file://"))) == []
    assert object_files(settings.data_dir / "tmp") == []


@pytest.mark.s3
async def test_gcs_uri_is_read_through_the_s3_api(stub: DatasetServiceStub, s3_endpoint: str) -> None:
    """GCS itself cannot be reached here: the same client (path-style, HMAC keys as SigV4 credentials,
    no default CRC checksums) is pointed at seaweedfs through endpoint_url."""
    put(s3_endpoint, "gcs/chats.jsonl", jsonl(chat_lines(30)))
    created = await stub.CreateDataset(
        pb.CreateDatasetRequest(
            organization="acme",
            name="from-gcs",
            min_examples=10,
            credentials=owner_credentials(),
            source=dataset_pb2.DatasetSource(
                gcs_uri=f"gs://{BUCKET}/gcs/chats.jsonl", endpoint_url=s3_endpoint
            ),
        )
    )
    assert created.dataset.source.gcs_uri == f"gs://{BUCKET}/gcs/chats.jsonl"
    dataset = await settled(stub, created.dataset.id)
    assert dataset.state == READY, dataset.failure_message


@pytest.mark.s3
async def test_invalid_content_ends_failed_with_the_report(
    stub: DatasetServiceStub, s3_endpoint: str, settings: DatasetSettings
) -> None:
    lines = chat_lines(20)
    lines[6] = '{"messages": [{"role": "user", "content": "hi"}'
    uri = put(s3_endpoint, "chats/broken.jsonl", jsonl(lines))
    created = await stub.CreateDataset(s3_request(uri, s3_endpoint, name="broken"))
    dataset = await settled(stub, created.dataset.id)
    assert dataset.state == FAILED
    assert "line 7" in dataset.failure_message and dataset.validation.error_count >= 1
    report = (
        await stub.GetValidationReport(pb.GetValidationReportRequest(organization="acme", dataset=dataset.id))
    ).report
    assert any(issue.line == 7 for issue in report.issues)
    assert list(dataset.splits) == []
    assert_no_trace(settings, dataset.id)


@pytest.mark.s3
async def test_parquet_object_takes_the_upload_pipeline(stub: DatasetServiceStub, s3_endpoint: str) -> None:
    """The import hands the file to the upload pipeline, which detects the container by content."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([json.loads(line) for line in chat_lines(30)]), buffer)
    uri = put(s3_endpoint, "tables/chats.parquet", buffer.getvalue())
    created = await stub.CreateDataset(s3_request(uri, s3_endpoint, name="from-parquet"))
    dataset = await settled(stub, created.dataset.id)
    assert dataset.state == READY, dataset.failure_message
    assert dataset.format == dataset_pb2.DATASET_FORMAT_OPENAI_CHAT
    assert sum(split_counts(dataset).values()) == 30


# -- Hugging Face ----------------------------------------------------------------------------------------


def chat_rows(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [json.loads(line) for line in chat_lines(n, start)]


@pytest.fixture
def saved_dataset(settings: DatasetSettings) -> Path:
    import datasets

    assert settings.hf_local_root is not None
    path = settings.hf_local_root / "saved"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(chat_rows(40)),
            "test": datasets.Dataset.from_list(chat_rows(15, start=100)),
        }
    ).save_to_disk(str(path))
    return path


def hf_request(dataset: str, name: str = "from-hf", **source: Any) -> pb.CreateDatasetRequest:
    return pb.CreateDatasetRequest(
        organization="acme",
        name=name,
        min_examples=5,
        source=dataset_pb2.DatasetSource(huggingface_id=dataset, **source),
    )


async def test_hugging_face_dataset_saved_to_disk(
    stub: DatasetServiceStub, saved_dataset: Path, settings: DatasetSettings
) -> None:
    cases = [
        (hf_request(str(saved_dataset), "train-split"), 40),  # "train" by default
        (hf_request(f"{saved_dataset}:test", "test-split"), 15),
        (hf_request(str(saved_dataset), "first-rows", huggingface_split="train", max_rows=12), 12),
        (hf_request(str(saved_dataset), "streamed", streaming=True, max_rows=7), 7),
    ]
    for request, rows in cases:
        created = await stub.CreateDataset(request)
        assert created.dataset.source.huggingface_id.startswith(str(saved_dataset))
        dataset = await settled(stub, created.dataset.id)
        assert dataset.state == READY, dataset.failure_message
        assert sum(split_counts(dataset).values()) == rows, request.name
    assert object_files(settings.data_dir / "tmp") == []

    err = await failure(stub.CreateDataset(hf_request(str(saved_dataset), huggingface_split="dev")))
    assert (err.code, err.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["source.huggingface_split"])
    assert "test, train" in err.message or "train, test" in err.message
    err = await failure(stub.CreateDataset(hf_request(str(saved_dataset.parent / "nothing-here"))))
    assert (err.code, err.fields) == (grpc.StatusCode.NOT_FOUND, ["source.huggingface_id"])
    for outside in ("/etc", f"{saved_dataset}/../../..", "../relative", "not a valid id"):
        err = await failure(stub.CreateDataset(hf_request(outside)))
        assert (err.code, err.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["source.huggingface_id"]), (
            outside
        )


async def test_hugging_face_data_files_through_load_dataset(
    stub: DatasetServiceStub, settings: DatasetSettings
) -> None:
    assert settings.hf_local_root is not None
    folder = settings.hf_local_root / "files"
    folder.mkdir()
    (folder / "train.jsonl").write_bytes(jsonl(chat_lines(25)))
    for request, rows in (
        (hf_request(str(folder), "prepared"), 25),
        (hf_request(str(folder), "streamed", streaming=True, max_rows=9), 9),
    ):
        created = await stub.CreateDataset(request)
        dataset = await settled(stub, created.dataset.id)
        assert dataset.state == READY, dataset.failure_message
        assert sum(split_counts(dataset).values()) == rows
    # The import's own datasets cache lived in its temp dir and went with it.
    assert object_files(settings.data_dir / "tmp") == []


async def test_unreachable_hub_dataset_ends_failed(
    stub: DatasetServiceStub, caplog: pytest.LogCaptureFixture
) -> None:
    """No hub here (HF_HUB_OFFLINE=1): a hub id passes the call's checks; the import says why it failed."""
    caplog.set_level(logging.DEBUG, logger="services")
    request = hf_request("someone/some-dataset")
    request.credentials.huggingface_token = "hf_secret_token_123"
    created = await stub.CreateDataset(request)
    dataset = await settled(stub, created.dataset.id)
    assert dataset.state == FAILED
    assert "hf://someone/some-dataset" in dataset.failure_message, dataset.failure_message
    assert "hf_secret_token_123" not in dataset.failure_message + caplog.text
    # Nothing was validated: not "valid" for having no errors.
    assert not dataset.validation.valid and dataset.validation.error_count == 0


async def test_hub_id_naming_a_server_path_is_refused(stub: DatasetServiceStub) -> None:
    """load_dataset would read a folder of that name in the working directory before asking the hub."""
    shadow = next(p.name for p in sorted(Path.cwd().iterdir()) if HUB_ID_RE.match(p.name))
    err = await failure(stub.CreateDataset(hf_request(shadow)))
    assert (err.code, err.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["source.huggingface_id"])


async def test_a_tokenizer_an_upload_refuses_is_refused_before_the_import_starts(
    stub: DatasetServiceStub, settings: DatasetSettings
) -> None:
    """CreateDataset checks `tokenizer` as UploadDataset checks metadata.tokenizer, and names it as
    CreateDatasetRequest does; the import never starts (it used to, and said nothing until it failed)."""
    refused = (
        "../../etc",  # relative
        "/etc/passwd",  # outside every model root
        "file:///etc/passwd",
        "/proc/self/environ",
        "someorg/not-a-cached-model",  # a hub id that cannot be loaded here
    )
    for tokenizer in refused:
        request = hf_request("someorg/somedata")
        request.tokenizer = tokenizer
        err = await failure(stub.CreateDataset(request))
        assert (err.code, err.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["tokenizer"]), (
            tokenizer,
            err.message,
        )
        assert "tokenizer" in err.message and "metadata." not in err.message, err.message
    listed = await stub.ListDatasets(pb.ListDatasetsRequest(organization="acme"))
    assert list(listed.datasets) == []
    assert object_files(Path(settings.resolved_storage_url().removeprefix("file://"))) == []
    assert object_files(settings.data_dir / "tmp") == []


@pytest.mark.postgres
async def test_hugging_face_import_on_postgresql(
    settings: DatasetSettings, saved_dataset: Path, postgres_url: str
) -> None:
    on_postgres = DatasetSettings(**{**settings.model_dump(), "database_url": postgres_url})
    async with serving(on_postgres) as address, grpc.aio.insecure_channel(
            address, interceptors=service_credentials()) as channel:
        stub = DatasetServiceStub(channel)
        created = await stub.CreateDataset(hf_request(str(saved_dataset), max_rows=20))
        dataset = await settled(stub, created.dataset.id)
        assert dataset.state == READY, dataset.failure_message
        assert sum(split_counts(dataset).values()) == 20


# -- limits, interruption and resumption -----------------------------------------------------------------


def test_sink_enforces_the_limit_and_cancellation(tmp_path: Path) -> None:
    source = ObjectSource("s3", "b", "k.jsonl", "us-east-1", "")
    stop = threading.Event()
    with (tmp_path / "out").open("wb") as out:
        sink = Sink(out, source, 10, stop)
        sink.write(b"0123456789")
        with pytest.raises(ResourceExhausted) as caught:
            sink.write(b"x")
        assert [v.field for v in caught.value.violations] == ["source.s3_uri"]
        stop.set()
        with pytest.raises(ImportCancelled):
            Sink(out, source, 10, stop).write(b"x")


@pytest.mark.s3
async def test_object_that_outgrows_the_limit_while_read_is_cut_off(s3_endpoint: str, tmp_path: Path) -> None:
    """check() saw it fit; the download itself still stops at the limit (the object may have grown)."""
    data = big_chat_file(1024 * 1024)
    put(s3_endpoint, "big/grown.jsonl", data)
    source = ObjectSource("s3", BUCKET, "big/grown.jsonl", "us-east-1", s3_endpoint)
    credentials = Credentials(OWNER_KEY, OWNER_SECRET)
    reader = ObjectReader(source, credentials, FetchSettings(len(data) - 1, 256 * 1024, 256 * 1024))
    with pytest.raises(ResourceExhausted):
        reader.fetch(tmp_path / "copy.jsonl", tmp_path, threading.Event())
    assert (tmp_path / "copy.jsonl").stat().st_size < len(data)


@pytest.mark.s3
async def test_dataset_deleted_while_importing_leaves_nothing(
    stub: DatasetServiceStub, s3_endpoint: str, settings: DatasetSettings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="services.datasets")
    uri = put(s3_endpoint, "big/deleted.jsonl", big_chat_file(3 * 1024 * 1024))
    created = await stub.CreateDataset(s3_request(uri, s3_endpoint, name="short-lived"))
    await stub.DeleteDataset(pb.DeleteDatasetRequest(organization="acme", dataset=created.dataset.id))
    ended = f"dataset {created.dataset.id}: import ended"
    for _ in range(1200):
        if ended in caplog.text:
            break
        await asyncio.sleep(0.05)
    assert f"{ended} (dataset deleted)" in caplog.text
    err = await failure(
        stub.GetDataset(pb.GetDatasetRequest(organization="acme", dataset=created.dataset.id))
    )
    assert err.code == grpc.StatusCode.NOT_FOUND
    assert_no_trace(settings, created.dataset.id)


# -- interruption and resumption -------------------------------------------------------------------------


@pytest.mark.s3
async def test_interrupted_import_leaves_only_its_sealed_request_and_resumes(
    settings: DatasetSettings, s3_endpoint: str, tmp_path: Path
) -> None:
    data = big_chat_file(3 * 1024 * 1024)
    uri = put(s3_endpoint, "big/resume.jsonl", data)
    db = Database(settings.database_url_for("datasets"), "datasets")
    db.migrate(MIGRATIONS)
    store = LocalObjectStore(tmp_path / "objects")
    try:
        first = DatasetManager(db, store, settings)
        request = s3_request(uri, s3_endpoint, name="resumed")
        record = await first.imports.create(import_request_from_proto(request), request.SerializeToString())
        partial = settings.data_dir / "tmp"
        for _ in range(3000):  # until the download is under way (or the import ended: asserted below)
            if record.id not in first.imports.running or any(
                p.name == "source.jsonl" and p.stat().st_size for p in object_files(partial)
            ):
                break
            await asyncio.sleep(0.01)
        await first.imports.close()
        prefix = f"datasets/acme/{record.id}/"
        assert store.list_keys(prefix) == [prefix + IMPORT_MANIFEST]
        assert OWNER_SECRET.encode() not in store.get_bytes(prefix + IMPORT_MANIFEST)
        assert object_files(settings.data_dir / "tmp") == []
        assert (await first.get("acme", record.id)).state is DatasetState.PROCESSING

        second = DatasetManager(db, store, settings)  # the service started again
        assert await second.imports.resume() == 1
        await asyncio.gather(*(task for task, _ in second.imports.running.values()))
        done = await second.get("acme", record.id)
        assert done.state is DatasetState.READY, done.failure_message
        assert done.sha256 == sha256(data)
        assert IMPORT_MANIFEST not in " ".join(store.list_keys(prefix))
        assert await second.imports.resume() == 0
    finally:
        db.dispose()


# -- pure logic ------------------------------------------------------------------------------------------


def test_credentials_cipher_seals_rotates_and_refuses_wrong_keys(tmp_path: Path) -> None:
    generated = CredentialCipher.from_settings("", tmp_path)
    key_file = tmp_path / "secrets" / KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    sealed = generated.seal(b"secret")
    assert b"secret" not in sealed
    assert CredentialCipher.from_settings("", tmp_path).open(sealed) == b"secret"  # the key file is reused
    new = Fernet.generate_key().decode()
    assert CredentialCipher(f"{new},{key_file.read_text()}").open(sealed) == b"secret"  # rotation
    with pytest.raises(CredentialsKeyError):
        CredentialCipher(new).open(sealed)
    with pytest.raises(CredentialsKeyError):
        CredentialCipher("not-a-key")
    with pytest.raises(CredentialsKeyError):
        generated.open(sealed[:-3] + b"AAA")


def test_credentials_never_show_in_repr() -> None:
    shown = repr(Credentials("AKIA", "s3cr3t", "t0k3n", "hf_x"))
    assert not any(s in shown for s in ("AKIA", "s3cr3t", "t0k3n", "hf_x"))


@pytest.mark.parametrize(
    ("source", "field"),
    [
        (dataset_pb2.DatasetSource(s3_uri="s3://Bad_Bucket/key.jsonl"), "source.s3_uri"),
        (dataset_pb2.DatasetSource(s3_uri="https://bucket/key.jsonl"), "source.s3_uri"),
        (dataset_pb2.DatasetSource(s3_uri="s3://bucket"), "source.s3_uri"),
        (dataset_pb2.DatasetSource(gcs_uri="s3://bucket/key"), "source.gcs_uri"),
        (dataset_pb2.DatasetSource(s3_uri="s3://bucket/k", region="EU WEST"), "source.region"),
        (dataset_pb2.DatasetSource(s3_uri="s3://bucket/k", endpoint_url="ftp://host"), "source.endpoint_url"),
        (dataset_pb2.DatasetSource(s3_uri="s3://bucket/k", streaming=True), "source.streaming"),
        (dataset_pb2.DatasetSource(huggingface_id="a/b", endpoint_url="http://x"), "source.endpoint_url"),
        (dataset_pb2.DatasetSource(huggingface_id="a/b/c"), "source.huggingface_id"),
        (
            dataset_pb2.DatasetSource(huggingface_id="a/b", huggingface_split="a b"),
            "source.huggingface_split",
        ),
        (dataset_pb2.DatasetSource(huggingface_id="/data/x"), "source.huggingface_id"),  # no local root
        (dataset_pb2.DatasetSource(huggingface_id="a/b", max_rows=-1), "source.max_rows"),
        (dataset_pb2.DatasetSource(upload_filename="x.jsonl"), "source.upload_filename"),
    ],
)
def test_malformed_sources_name_their_field(source: dataset_pb2.DatasetSource, field: str) -> None:
    v = Violations()
    assert parse_source(v, source, Credentials(), None) is None
    assert field in [item.field for item in v.items]


LONG = MAX_SOURCE_ADDRESS + 1
Source = dataset_pb2.DatasetSource


@pytest.mark.parametrize(
    ("source", "field", "why"),
    [
        # Addresses over MAX_SOURCE_ADDRESS: a hub path and an endpoint had no limit at all.
        (Source(huggingface_id="/data/" + "a/" * LONG), "source.huggingface_id", "at most"),
        (Source(s3_uri="s3://bucket/k", endpoint_url="https://s3.amazonaws.com/" + "p" * LONG),
         "source.endpoint_url", "at most 2048 characters"),
        (dataset_pb2.DatasetSource(s3_uri="s3://bucket/" + "k" * LONG), "source.s3_uri", "at most 2048"),
        # urlparse drops tabs and line breaks, and leading blanks: these named another object than written.
        (dataset_pb2.DatasetSource(s3_uri="s3://buc\nket/key.jsonl"), "source.s3_uri", "control characters"),
        (dataset_pb2.DatasetSource(gcs_uri="gs://bucket/a\tb.jsonl"), "source.gcs_uri", "control characters"),
        (Source(s3_uri=" s3://bucket/key.jsonl"), "source.s3_uri", "begin with whitespace"),
        (dataset_pb2.DatasetSource(huggingface_id="/data/a\x01b"), "source.huggingface_id", "control"),
        (dataset_pb2.DatasetSource(s3_uri="s3://bucket/k", endpoint_url="http://minio\r\n.local"),
         "source.endpoint_url", "control characters"),
        # urlparse raised ValueError on these: the call failed INTERNAL.
        (Source(s3_uri="s3://[bucket/key.jsonl"), "source.s3_uri", "not a well-formed URL"),
        (Source(gcs_uri="gs://buck\uff0fet/key"), "source.gcs_uri", "not a well-formed URL"),
        (dataset_pb2.DatasetSource(s3_uri="s3://bucket/k", endpoint_url="http://[minio.local"),
         "source.endpoint_url", "not a well-formed URL"),
        (dataset_pb2.DatasetSource(s3_uri="s3://bucket/k", endpoint_url="https://s3\uff03.amazonaws.com/"),
         "source.endpoint_url", "not a well-formed URL"),
    ],
)
def test_overlong_and_malformed_addresses_are_refused_naming_their_field(
        source: dataset_pb2.DatasetSource, field: str, why: str) -> None:
    v = Violations()
    allowlist = EndpointAllowlist.parse("minio.local")
    assert parse_source(v, source, Credentials(), Path("/data"), allowlist) is None
    assert [(item.field, why in item.description) for item in v.items] == [(field, True)], v.items


def test_addresses_up_to_the_limit_are_read_as_before() -> None:
    v = Violations()
    bucket, key = "b" * 222, "k/" * 511 + "k"  # the longest S3 allows: about 1,250 characters
    parsed = parse_source(v, dataset_pb2.DatasetSource(s3_uri=f"s3://{bucket}/{key}"), Credentials(), None)
    assert not v.items and parsed is not None and parsed.uri == f"s3://{bucket}/{key}"
    local = "/data/" + "a/" * ((MAX_SOURCE_ADDRESS - 6) // 2)
    hub = parse_source(v, dataset_pb2.DatasetSource(huggingface_id=local), Credentials(), Path("/data"))
    assert len(local) <= MAX_SOURCE_ADDRESS and not v.items and isinstance(hub, HubSource)


@pytest.mark.parametrize("name", ["access_key_id", "secret_access_key", "session_token"])
def test_overlong_or_control_character_credentials_are_refused_without_showing_them(name: str) -> None:
    for secret in ("s" * (MAX_CREDENTIAL + 1), "line\nbreak"):
        v = Violations()
        given = {"access_key_id": "AKIA", "secret_access_key": "s3cr3t", name: secret}
        source = dataset_pb2.DatasetSource(s3_uri="s3://bucket/key.jsonl")
        assert parse_source(v, source, Credentials(**given), None) is None
        assert [item.field for item in v.items] == [f"credentials.{name}"]
        assert secret not in str(v.items)


async def test_create_dataset_answers_a_malformed_address_invalid_argument_not_internal(
        stub: DatasetServiceStub) -> None:
    for source, field in ((Source(s3_uri="s3://[bucket/a.jsonl"), "source.s3_uri"),
                          (Source(huggingface_id="/" + "x" * 5000), "source.huggingface_id")):
        err = await failure(stub.CreateDataset(pb.CreateDatasetRequest(organization="acme", name="imported",
                                                                       source=source)))
        assert (err.code, err.fields) == (grpc.StatusCode.INVALID_ARGUMENT, [field]), err.message
    assert not (await stub.ListDatasets(pb.ListDatasetsRequest(organization="acme"))).datasets


@pytest.mark.parametrize(
    ("endpoint", "allowlist", "why"),
    [
        ("http://169.254.169.254", "", "loopback, private or link-local"),  # cloud metadata
        ("http://127.0.0.1:8333", "", "loopback, private or link-local"),
        ("http://localhost:9000", "", "loopback, private or link-local"),
        ("http://[::1]:9000", "", "loopback, private or link-local"),
        ("http://10.0.0.5:9000", "127.0.0.1", "loopback, private or link-local"),
        ("https://minio.example.com", "", "not AWS S3, Google Cloud Storage"),
        ("https://s3-amazonaws.com", "", "not AWS S3, Google Cloud Storage"),  # a look-alike, not AWS
        ("http://s3.eu-west-1.amazonaws.com", "", "over https only"),
        ("http://minio.internal:9001", "minio.internal:9000", "not AWS S3, Google Cloud Storage"),
        ("https://s3.example.com/tenant-b", "https://s3.example.com/tenant-a", "not AWS S3"),
    ],
)
def test_endpoints_outside_the_allowlist_are_refused(endpoint: str, allowlist: str, why: str) -> None:
    v = Violations()
    source = dataset_pb2.DatasetSource(s3_uri="s3://bucket/key.jsonl", endpoint_url=endpoint)
    assert parse_source(v, source, Credentials(), None, EndpointAllowlist.parse(allowlist)) is None
    (item,) = v.items
    assert item.field == "source.endpoint_url" and why in item.description, item.description
    assert "TUNEFORGE_IMPORT_ENDPOINT_ALLOWLIST" in item.description or "https" in item.description


@pytest.mark.parametrize(
    ("endpoint", "allowlist"),
    [
        ("", ""),
        ("https://s3.eu-west-1.amazonaws.com", ""),
        ("https://my-bucket.s3.dualstack.us-east-1.amazonaws.com", ""),
        ("https://storage.googleapis.com", ""),
        ("http://127.0.0.1:8333", "127.0.0.1"),
        ("http://minio.internal:9000", "minio.internal:9000, 10.0.0.5"),
        ("http://10.0.0.5:1234", "minio.internal:9000, 10.0.0.5"),
        ("https://s3.example.com/tenant-a/", "https://s3.example.com/tenant-a"),
    ],
)
def test_default_and_allowed_endpoints_are_accepted(endpoint: str, allowlist: str) -> None:
    v = Violations()
    source = dataset_pb2.DatasetSource(s3_uri="s3://bucket/key.jsonl", endpoint_url=endpoint)
    parsed = parse_source(v, source, Credentials(), None, EndpointAllowlist.parse(allowlist))
    assert not v.items and parsed is not None


def test_the_allowlist_setting_is_checked_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="not a host"):
        DatasetSettings(import_endpoint_allowlist="host/with/path")
    monkeypatch.setenv("TUNEFORGE_IMPORT_ENDPOINT_ALLOWLIST", "10.1.2.3:9000")
    v = Violations()  # without an allowlist passed in, the environment's is used
    source = dataset_pb2.DatasetSource(s3_uri="s3://bucket/key.jsonl", endpoint_url="http://10.1.2.3:9000")
    assert parse_source(v, source, Credentials(), None) is not None and not v.items


async def test_create_dataset_refuses_an_internal_endpoint(stub: DatasetServiceStub) -> None:
    """Before any request leaves the server: the metadata service is never asked for anything."""
    request = s3_request("s3://imports/a.jsonl", "http://169.254.169.254/latest/meta-data")
    err = await failure(stub.CreateDataset(request))
    assert (err.code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert err.fields == ["source.endpoint_url"], err.fields


def test_well_formed_sources_and_what_datasets_show() -> None:
    v = Violations()
    gcs = parse_source(
        v, dataset_pb2.DatasetSource(gcs_uri="gs://my_bucket/dir/a b.jsonl"), Credentials(), None
    )
    assert gcs == ObjectSource("gcs", "my_bucket", "dir/a b.jsonl", "auto", "https://storage.googleapis.com")
    hub = parse_source(
        v,
        dataset_pb2.DatasetSource(huggingface_id="owner/set:validation", max_rows=5),
        Credentials(huggingface_token="t"),
        None,
    )
    assert hub == HubSource("owner/set", split="validation", max_rows=5)
    assert not v
    assert source_to_proto(gcs.uri).gcs_uri == "gs://my_bucket/dir/a b.jsonl"
    assert source_to_proto("s3://b/k").s3_uri == "s3://b/k"
    assert source_to_proto(hub.uri).huggingface_id == "owner/set:validation"
    assert source_to_proto("chats.jsonl").upload_filename == "chats.jsonl"

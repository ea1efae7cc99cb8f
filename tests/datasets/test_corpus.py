"""The corpus of bad datasets through the real service: the right error on the right line, the service
stays up, and nothing is written anywhere but the service's own scratch space (which is emptied)."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import grpc.aio
from google.protobuf import json_format
from tuneforge.v1 import dataset_pb2
from tuneforge.v1 import dataset_service_pb2 as pb
from tuneforge.v1.dataset_service_pb2_grpc import DatasetServiceStub

from services.datasets.settings import DatasetSettings
from tests.datasets.corpus import CORPUS, MIN_EXAMPLES, PNG, good, vision_row, vision_zip
from tests.datasets.helpers import ErrorDetails, local_path, meta, upload_requests, validate_requests

# Files the service may write outside datasets/: its database, the NATS store, the credentials key.
OWN_FILES = ("nats", ".db", ".db-wal", ".db-shm", "credentials.key")


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() and not any(part in str(p) for part in OWN_FILES)}


def _escaped(tmp_path: Path) -> bool:
    """Whether a zip-slip or absolute-path entry landed where the corpus aimed it."""
    return (tmp_path.parent / "evil.txt").exists() or Path("/tmp/tf-evil.txt").exists()


def _metadata(name: str, extra: dict[str, object]) -> pb.UploadDatasetMetadata:
    metadata = meta(name=name, min_examples=MIN_EXAMPLES)
    json_format.ParseDict(extra, metadata)
    return metadata


async def test_every_bad_dataset_gets_its_error_on_its_line(
    stub: DatasetServiceStub, datasets_settings: DatasetSettings, tmp_path: Path
) -> None:
    assert len({bad.code for bad in CORPUS}) >= 30 and len(CORPUS) >= 30
    before = _files(tmp_path)
    wrong: list[str] = []
    for i, bad in enumerate(CORPUS):
        metadata = _metadata(f"bad-{i}", bad.metadata)
        for call in (
            stub.UploadDataset(upload_requests(metadata, bad.data)),  # type: ignore[arg-type]
            stub.ValidateDataset(validate_requests(metadata, bad.data)),
        ):  # type: ignore[arg-type]
            try:
                result = await call
            except grpc.aio.AioRpcError as exc:
                err = ErrorDetails(exc)
                found = [
                    v.field
                    for v in err.bad_request.field_violations
                    if v.description.split(":")[0] == bad.code
                ]
                if (err.code, err.reason) != (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "DATASET_INVALID",
                ) or bad.location not in found:
                    wrong.append(
                        f"{bad.name}: {err.code} {err.reason} {err.message[:200]} "
                        f"{[(v.field, v.description[:60]) for v in err.bad_request.field_violations]}"
                    )
                continue
            # ValidateDataset answers with the report.
            issues = [(i.code, i.location()) for i in _issues(result.report)]
            if (bad.code, bad.location) not in issues or result.report.valid:
                wrong.append(f"{bad.name} (validate): {issues}")
    assert wrong == []
    # The service is still up, holds no dataset, and wrote nothing but its own bookkeeping.
    listed = await stub.ListDatasets(pb.ListDatasetsRequest(organization="acme"))
    assert list(listed.datasets) == []
    assert _files(tmp_path) == before
    assert not _escaped(tmp_path)


def _issues(report: dataset_pb2.ValidationReport) -> list[object]:
    from services.datasets.converters import report_from_proto

    return list(report_from_proto(report).issues)


async def test_a_vision_zip_stores_its_images_and_refers_to_them(stub: DatasetServiceStub) -> None:
    rows = [vision_row("img/a.png"), vision_row("img/b.png", "img/a.png"), vision_row("img/b.png")]
    data = vision_zip(rows, {"img/a.png": PNG, "img/b.png": PNG + b"b", "img/unused.png": PNG})
    response = await stub.UploadDataset(
        upload_requests(  # type: ignore[arg-type]
            meta(
                name="vision",
                min_examples=3,
                split=dataset_pb2.SplitConfig(train_fraction=1.0, validation_fraction=0, test_fraction=0),
            ),
            data,
        )
    )
    dataset = response.dataset
    assert (
        dataset.state == dataset_pb2.DATASET_STATE_READY
        and dataset.format == dataset_pb2.DATASET_FORMAT_OPENAI_CHAT
    )
    train = local_path(dataset.splits[0].uri)
    examples = [json.loads(line) for line in train.read_text().splitlines()]
    images = {uri for e in examples for uri in e["images"]}
    assert {local_path(u).read_bytes() for u in images} == {PNG, PNG + b"b"}
    root = train.parent
    assert (root / "source.zip").is_file() and not (root / "images" / "img" / "unused.png").exists()
    assert all(local_path(u).is_relative_to(root / "images") for u in images)
    assert examples[0]["messages"][0]["content"][0] == {"type": "image"}


async def test_options_and_a_separate_validation_dataset(stub: DatasetServiceStub) -> None:
    lines = [good(i) for i in range(10)]
    held_out = await stub.UploadDataset(
        upload_requests(  # type: ignore[arg-type]
            meta(name="held-out", min_examples=3), ("\n".join(lines[:4]) + "\n").encode()
        )
    )
    metadata = meta(
        name="main",
        min_examples=3,
        validation_dataset="held-out",
        options=dataset_pb2.DatasetOptions(max_samples=8, system_prompt="Be exact."),
    )
    response = await stub.UploadDataset(
        upload_requests(  # type: ignore[arg-type]
            metadata, ("\n".join(lines) + "\n").encode()
        )
    )
    dataset = response.dataset
    counts = {dataset_pb2.DatasetSplitKind.Name(s.kind): s.example_count for s in dataset.splits}
    # 8 kept examples split 0.95 / 0 / 0.05 (every non-zero fraction gets one), plus the 4 held out.
    assert counts == {
        "DATASET_SPLIT_KIND_TRAIN": 7,
        "DATASET_SPLIT_KIND_VALIDATION": 4,
        "DATASET_SPLIT_KIND_TEST": 1,
    }
    assert dataset.validation_dataset_id == held_out.dataset.id
    assert dataset.statistics.dropped_by_max_samples == 2
    assert dataset.options.max_samples == 8 and dataset.options.system_prompt == "Be exact."
    train = [json.loads(x) for x in local_path(dataset.splits[0].uri).read_text().splitlines()]
    assert all(e["messages"][0] == {"role": "system", "content": "Be exact."} for e in train)
    fetched = await stub.GetDataset(pb.GetDatasetRequest(organization="acme", dataset="main"))
    assert fetched.dataset.options == dataset.options


async def test_bad_options_name_their_fields(stub: DatasetServiceStub) -> None:
    metadata = meta(
        name="x",
        validation_dataset="nope",
        issue_limit=0,
        split=dataset_pb2.SplitConfig(validation_fraction=0.1),
        options=dataset_pb2.DatasetOptions(max_samples=0, prompt_template="{question}", lazy_tokenize=True,
                                           streaming=True, max_prompt_length=512),
    )
    try:
        await stub.UploadDataset(upload_requests(metadata, b""))  # type: ignore[arg-type]
    except grpc.aio.AioRpcError as exc:
        err = ErrorDetails(exc)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(err.fields) >= {
        "metadata.options.max_samples",
        "metadata.options.prompt_template",
        "metadata.issue_limit",
        "metadata.split.validation_fraction",
        # Stored and never used by training: refused rather than ignored.
        "metadata.options.lazy_tokenize",
        "metadata.options.streaming",
        "metadata.options.max_prompt_length",
    }
    missing = meta(name="y", validation_dataset="nope", min_examples=1)
    try:
        await stub.UploadDataset(upload_requests(missing, (good(1) + "\n").encode()))  # type: ignore[arg-type]
    except grpc.aio.AioRpcError as exc:
        err = ErrorDetails(exc)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.fields == ["metadata.validation_dataset"]


async def test_a_parquet_upload_with_a_column_mapping(stub: DatasetServiceStub, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    rows = [{"question": f"What is {i} + 1?", "answer": f"{i + 1}", "difficulty": i % 3} for i in range(20)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    metadata = _metadata("tabular", {"column_mapping": {"columns": {"prompt": "question"}}})
    response = await stub.UploadDataset(upload_requests(metadata, path.read_bytes()))  # type: ignore[arg-type]
    dataset = response.dataset
    assert dataset.format == dataset_pb2.DATASET_FORMAT_PROMPT_ONLY and dataset.statistics.example_count == 20
    root = local_path(dataset.splits[0].uri).parent
    assert (root / "source.parquet").read_bytes() == path.read_bytes()
    first = json.loads(local_path(dataset.splits[0].uri).read_text().splitlines()[0])
    assert set(first) == {"prompt", "answer", "difficulty"}


async def test_the_report_lists_at_most_issue_limit_issues(stub: DatasetServiceStub) -> None:
    data = ("\n".join(["nope"] * 5 + [good(i) for i in range(3)]) + "\n").encode()
    response = await stub.ValidateDataset(
        validate_requests(  # type: ignore[arg-type]
            _metadata("x", {"issueLimit": 2}), data
        )
    )
    report = response.report
    assert (report.error_count, len(report.issues), report.issues_truncated, report.issue_limit) == (
        5,
        2,
        True,
        2,
    )
    assert [i.line for i in report.issues] == [1, 2]

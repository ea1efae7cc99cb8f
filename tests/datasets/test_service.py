"""DatasetService through real gRPC stubs, against the component on SQLite, local storage and nats-server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import grpc.aio
import nats
import pytest
from google.protobuf import field_mask_pb2
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import dataset_pb2
from tuneforge.v1 import dataset_service_pb2 as pb
from tuneforge.v1.dataset_service_pb2_grpc import DatasetServiceStub

from services.datasets.settings import DatasetSettings
from tests.datasets.helpers import (
    UPLOAD_LIMIT,
    ErrorDetails,
    chat_lines,
    jsonl,
    local_path,
    meta,
    object_files,
    sha256,
    split_counts,
    upload_requests,
    validate_requests,
)
from tuneforge_core import subjects

READY = dataset_pb2.DATASET_STATE_READY


async def upload(stub: DatasetServiceStub, data: bytes, chunk_size: int = 4096,
                 **kwargs: object) -> pb.UploadDatasetResponse:
    return await stub.UploadDataset(upload_requests(meta(**kwargs), data, chunk_size))  # type: ignore[arg-type]


async def failure(call: object) -> ErrorDetails:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return ErrorDetails(caught.value)


def assert_nothing_left(settings: DatasetSettings, objects_root: Path) -> None:
    assert object_files(objects_root / "datasets") == []
    assert object_files(settings.data_dir / "tmp") == []


async def test_upload_in_chunks_makes_a_ready_dataset_with_three_splits(
        stub: DatasetServiceStub, datasets_settings: DatasetSettings) -> None:
    data = jsonl(chat_lines(200))
    response = await upload(stub, data, chunk_size=777, description="first try", filename="chats.jsonl",
                            size_bytes=len(data), sha256=sha256(data))
    dataset = response.dataset
    assert dataset.id.startswith("ds_") and dataset.state == READY
    assert dataset.format == dataset_pb2.DATASET_FORMAT_OPENAI_CHAT
    assert (dataset.size_bytes, dataset.sha256) == (len(data), sha256(data))
    assert dataset.source.upload_filename == "chats.jsonl"
    assert dataset.statistics.example_count == 200
    assert dataset.statistics.mean_messages_per_example == pytest.approx(2.5)
    assert not dataset.statistics.HasField("tokens")
    assert dataset.validation.valid and response.report.valid
    assert split_counts(dataset) == {"train": 160, "validation": 30, "test": 10}
    lines: list[bytes] = []
    for split in dataset.splits:
        path = local_path(split.uri)
        assert path.name == f"{dataset_pb2.DatasetSplitKind.Name(split.kind).split('_')[-1].lower()}.jsonl"
        assert path.parent.name == dataset.id and path.parent.parent.name == "acme"
        content = path.read_bytes().splitlines()
        assert len(content) == split.example_count
        lines += content
    assert len(set(lines)) == 200  # disjoint and complete
    assert all(json.loads(line)["messages"][-1]["role"] == "assistant" for line in lines)
    # The longest example's line, as uploaded or as normalized (which drops json.dumps' spaces).
    longest = dataset.statistics.longest_example_bytes
    assert max(map(len, lines)) <= longest <= max(map(len, data.splitlines()))
    assert (local_path(dataset.splits[0].uri).parent / "source.jsonl").read_bytes() == data
    assert object_files(datasets_settings.data_dir / "tmp") == []

    by_id = await stub.GetDataset(pb.GetDatasetRequest(organization="acme", dataset=dataset.id))
    by_name = await stub.GetDataset(pb.GetDatasetRequest(organization="acme", dataset="support-chats"))
    assert by_id.dataset == by_name.dataset == dataset
    stored = await stub.GetValidationReport(pb.GetValidationReportRequest(organization="acme",
                                                                          dataset=dataset.id))
    assert stored.report == response.report and stored.report.dataset_id == dataset.id
    assert stored.report.examples_checked == 200


async def test_malformed_line_7_names_it_and_leaves_nothing(
        stub: DatasetServiceStub, datasets_settings: DatasetSettings, objects_root: Path) -> None:
    lines = chat_lines(150)
    lines[6] = '{"messages": [{"role": "user", "content": "hi"}'
    err = await failure(upload(stub, jsonl(lines)))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.reason == "DATASET_INVALID" and err.info.domain == "tuneforge.dev"
    assert err.fields == ["line 7"]
    assert "INVALID_JSON" in err.bad_request.field_violations[0].description
    assert "line 7" in err.message
    listed = await stub.ListDatasets(pb.ListDatasetsRequest(organization="acme"))
    assert list(listed.datasets) == []
    assert_nothing_left(datasets_settings, objects_root)


async def test_many_bad_lines_list_the_first_100_and_count_all(stub: DatasetServiceStub) -> None:
    lines = chat_lines(300)
    for i in range(0, 300, 2):
        lines[i] = json.dumps({"messages": [{"role": "user", "content": "no answer"}]})
    for i in range(1, 200, 2):
        lines[i] = "[1, 2]"
    err = await failure(upload(stub, jsonl(lines)))
    assert err.reason == "DATASET_INVALID"
    assert len(err.fields) == 100
    assert err.fields[:3] == ["line 1: messages", "line 2", "line 3: messages"]
    assert "250 errors" in err.message and "first 100" in err.message
    assert err.info.metadata["error_count"] == "250"


async def test_field_errors_in_the_metadata(stub: DatasetServiceStub) -> None:
    data = jsonl(chat_lines(100))
    err = await failure(stub.UploadDataset(iter([pb.UploadDatasetRequest(chunk=data)])))
    assert (err.code, err.reason, err.fields) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT",
                                                   ["metadata"])
    err = await failure(upload(stub, data, organization="", name=""))
    assert err.fields == ["metadata.organization", "metadata.name"]
    split = dataset_pb2.SplitConfig(train_fraction=1.5, validation_fraction=0.1, test_fraction=0.05)
    err = await failure(upload(stub, data, split=split, sha256="abc"))
    assert err.fields == ["metadata.sha256", "metadata.split.train_fraction"]
    err = await failure(upload(stub, data, split=dataset_pb2.SplitConfig(train_fraction=0.9)))
    assert err.fields == ["metadata.split"] and "sum to 1" in err.message


async def test_checksum_mismatch_is_data_loss(
        stub: DatasetServiceStub, datasets_settings: DatasetSettings, objects_root: Path) -> None:
    data = jsonl(chat_lines(120))
    err = await failure(upload(stub, data, sha256=sha256(data + b"x")))
    assert (err.code, err.reason) == (grpc.StatusCode.DATA_LOSS, "CHECKSUM_MISMATCH")
    assert err.info.metadata["actual_sha256"] == sha256(data)
    err = await failure(upload(stub, data, size_bytes=len(data) + 1))
    assert (err.code, err.reason) == (grpc.StatusCode.DATA_LOSS, "CHECKSUM_MISMATCH")
    assert_nothing_left(datasets_settings, objects_root)


async def test_uploads_over_the_limit_are_refused(
        stub: DatasetServiceStub, datasets_settings: DatasetSettings, objects_root: Path) -> None:
    data = jsonl(chat_lines(100))
    err = await failure(upload(stub, data, size_bytes=UPLOAD_LIMIT + 1))
    assert (err.code, err.reason, err.fields) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "UPLOAD_TOO_LARGE",
                                                   ["metadata.size_bytes"])
    big = jsonl(chat_lines(4000))
    assert len(big) > UPLOAD_LIMIT
    err = await failure(upload(stub, big, chunk_size=64 * 1024))
    assert (err.code, err.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "UPLOAD_TOO_LARGE")
    assert err.info.metadata["limit_bytes"] == str(UPLOAD_LIMIT)
    assert_nothing_left(datasets_settings, objects_root)


async def test_names_are_unique_per_organization(stub: DatasetServiceStub) -> None:
    data = jsonl(chat_lines(100))
    await upload(stub, data)
    err = await failure(upload(stub, data))
    assert (err.code, err.reason, err.fields) == (grpc.StatusCode.ALREADY_EXISTS, "ALREADY_EXISTS",
                                                   ["metadata.name"])
    other = await upload(stub, data, organization="globex")
    assert other.dataset.state == READY


async def test_a_retry_with_the_same_request_id_returns_the_first_dataset(stub: DatasetServiceStub) -> None:
    data = jsonl(chat_lines(100))
    first = await upload(stub, data, request_id="req-1", sha256=sha256(data))
    again = await upload(stub, data, request_id="req-1", sha256=sha256(data))
    assert again.dataset == first.dataset and again.report == first.report
    listed = await stub.ListDatasets(pb.ListDatasetsRequest(organization="acme"))
    assert [d.id for d in listed.datasets] == [first.dataset.id]
    other = jsonl(chat_lines(100, start=1000))
    err = await failure(upload(stub, other, request_id="req-1", sha256=sha256(other)))
    assert (err.code, err.reason) == (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")


async def test_unknown_and_foreign_datasets_are_not_found(stub: DatasetServiceStub) -> None:
    err = await failure(stub.GetDataset(pb.GetDatasetRequest(organization="acme", dataset="nope")))
    assert (err.code, err.reason) == (grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
    dataset = (await upload(stub, jsonl(chat_lines(100)))).dataset
    for ref in (dataset.id, dataset.name):
        err = await failure(stub.GetDataset(pb.GetDatasetRequest(organization="globex", dataset=ref)))
        assert err.code == grpc.StatusCode.NOT_FOUND
        err = await failure(stub.DeleteDataset(pb.DeleteDatasetRequest(organization="globex", dataset=ref)))
        assert err.code == grpc.StatusCode.NOT_FOUND
    listed = await stub.ListDatasets(pb.ListDatasetsRequest(organization="globex"))
    assert list(listed.datasets) == []
    err = await failure(stub.GetDataset(pb.GetDatasetRequest(organization="acme")))
    assert err.fields == ["dataset"]


async def test_list_pages_newest_first(stub: DatasetServiceStub) -> None:
    created = []
    for i in range(5):
        response = await upload(stub, jsonl(chat_lines(3, start=10 * i)), name=f"set-{i}",
                                min_examples=1)
        created.append(response.dataset.id)
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await stub.ListDatasets(pb.ListDatasetsRequest(organization="acme", page_size=2,
                                                              page_token=token))
        pages += 1
        seen += [d.id for d in page.datasets]
        token = page.next_page_token
        if not token:
            break
    assert pages == 3 and seen == created[::-1]
    ready = await stub.ListDatasets(pb.ListDatasetsRequest(organization="acme", state=READY))
    assert len(ready.datasets) == 5
    failed = await stub.ListDatasets(pb.ListDatasetsRequest(
        organization="acme", state=dataset_pb2.DATASET_STATE_FAILED))
    assert list(failed.datasets) == []
    first = await stub.ListDatasets(pb.ListDatasetsRequest(organization="acme", page_size=2))
    err = await failure(stub.ListDatasets(pb.ListDatasetsRequest(
        organization="globex", page_size=2, page_token=first.next_page_token)))
    assert (err.reason, err.fields) == ("INVALID_PAGE_TOKEN", ["page_token"])


async def test_validate_returns_a_report_and_stores_nothing(
        stub: DatasetServiceStub, datasets_settings: DatasetSettings, objects_root: Path) -> None:
    lines = chat_lines(120)
    lines[9] = json.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant",
                                                                           "content": "y"}]})
    response = await stub.ValidateDataset(validate_requests(meta(), jsonl(lines), 500))
    report = response.report
    assert not report.valid and report.examples_checked == 120 and report.error_count == 1
    issue = report.issues[0]
    assert (issue.code, issue.line, issue.field, issue.message_index) == ("INVALID_ROLE", 10,
                                                                          "messages[0].role", 0)
    assert issue.severity == dataset_pb2.ISSUE_SEVERITY_ERROR
    good = await stub.ValidateDataset(validate_requests(meta(name=""), jsonl(chat_lines(120))))
    assert good.report.valid and good.report.statistics.example_count == 120
    listed = await stub.ListDatasets(pb.ListDatasetsRequest(organization="acme"))
    assert list(listed.datasets) == []
    assert_nothing_left(datasets_settings, objects_root)


async def test_update_split_and_delete(stub: DatasetServiceStub, objects_root: Path) -> None:
    dataset = (await upload(stub, jsonl(chat_lines(100)))).dataset
    updated = await stub.UpdateDataset(pb.UpdateDatasetRequest(
        organization="acme", dataset=dataset.id, description="cleaned",
        update_mask=field_mask_pb2.FieldMask(paths=["description"])))
    assert updated.dataset.description == "cleaned"
    err = await failure(stub.UpdateDataset(pb.UpdateDatasetRequest(
        organization="acme", dataset=dataset.id, update_mask=field_mask_pb2.FieldMask(paths=["name"]))))
    assert err.fields == ["update_mask"]

    config = dataset_pb2.SplitConfig(train_fraction=0.5, validation_fraction=0.5, test_fraction=0.0, seed=7)
    resplit = (await stub.SplitDataset(pb.SplitDatasetRequest(organization="acme", dataset=dataset.name,
                                                              split=config))).dataset
    assert split_counts(resplit) == {"train": 50, "validation": 50}
    assert all(local_path(s.uri).is_file() for s in [*resplit.splits, *dataset.splits])
    again = (await stub.SplitDataset(pb.SplitDatasetRequest(organization="acme", dataset=dataset.id,
                                                            split=config))).dataset
    assert again.splits[0].uri != resplit.splits[0].uri
    assert local_path(again.splits[0].uri).read_bytes() == local_path(resplit.splits[0].uri).read_bytes()
    err = await failure(stub.SplitDataset(pb.SplitDatasetRequest(
        organization="acme", dataset=dataset.id, split=dataset_pb2.SplitConfig(validation_fraction=-1))))
    assert "split.validation_fraction" in err.fields

    await stub.DeleteDataset(pb.DeleteDatasetRequest(organization="acme", dataset=dataset.id))
    assert object_files(objects_root / "datasets") == []
    err = await failure(stub.GetDataset(pb.GetDatasetRequest(organization="acme", dataset=dataset.id)))
    assert err.code == grpc.StatusCode.NOT_FOUND


async def test_dataset_changed_events_arrive_on_nats(stub: DatasetServiceStub, nats_url: str) -> None:
    dataset = (await upload(stub, jsonl(chat_lines(100)))).dataset
    await stub.DeleteDataset(pb.DeleteDatasetRequest(organization="acme", dataset=dataset.id))
    nc = await nats.connect(nats_url)
    try:
        sub = await nc.jetstream().subscribe(subjects.dataset_events(dataset.id), ordered_consumer=True)
        events = [events_pb2.DatasetChanged.FromString((await sub.next_msg(timeout=10)).data)
                  for _ in range(2)]
    finally:
        await nc.close()
    assert [e.deleted for e in events] == [False, True]
    assert events[0].dataset == dataset and events[1].dataset.id == dataset.id
    assert events[0].event_id != events[1].event_id


async def test_a_client_that_goes_away_leaves_nothing(
        stub: DatasetServiceStub, datasets_settings: DatasetSettings, objects_root: Path) -> None:
    async def slow_requests():  # type: ignore[no-untyped-def]
        yield pb.UploadDatasetRequest(metadata=meta())
        yield pb.UploadDatasetRequest(chunk=jsonl(chat_lines(50)))
        await asyncio.sleep(30)

    call = stub.UploadDataset(slow_requests())
    await asyncio.sleep(0.5)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await asyncio.sleep(0.5)
    assert_nothing_left(datasets_settings, objects_root)


async def test_concurrent_uploads_of_one_name_keep_one_dataset(
        stub: DatasetServiceStub, datasets_settings: DatasetSettings, objects_root: Path) -> None:
    data = jsonl(chat_lines(150))
    results = await asyncio.gather(*(upload(stub, data) for _ in range(3)), return_exceptions=True)
    created = [r.dataset for r in results if isinstance(r, pb.UploadDatasetResponse)]
    errors = [ErrorDetails(r) for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(created) == 1 and [e.reason for e in errors] == ["ALREADY_EXISTS"] * 2
    assert {p.relative_to(objects_root).parts[2] for p in object_files(objects_root / "datasets")} == {
        created[0].id}
    assert object_files(datasets_settings.data_dir / "tmp") == []


async def test_concurrent_retries_with_one_request_id_return_one_dataset(stub: DatasetServiceStub) -> None:
    data = jsonl(chat_lines(150))
    results = await asyncio.gather(*(upload(stub, data, request_id="same") for _ in range(3)))
    assert len({r.dataset.id for r in results}) == 1
    listed = await stub.ListDatasets(pb.ListDatasetsRequest(organization="acme"))
    assert len(listed.datasets) == 1


async def test_metadata_may_come_only_first(stub: DatasetServiceStub) -> None:
    requests = [pb.UploadDatasetRequest(metadata=meta()), pb.UploadDatasetRequest(chunk=b"{}\n"),
                pb.UploadDatasetRequest(metadata=meta())]
    err = await failure(stub.UploadDataset(iter(requests)))
    assert (err.code, err.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["metadata"])


async def test_resplit_of_a_dataset_stored_without_normalized_examples(stub: DatasetServiceStub) -> None:
    """Datasets uploaded before normalized.jsonl was kept are normalized again from their source."""
    dataset = (await upload(stub, jsonl(chat_lines(100)))).dataset
    root = local_path(dataset.splits[0].uri).parent
    (root / "normalized.jsonl").unlink()
    resplit = await stub.SplitDataset(pb.SplitDatasetRequest(
        organization="acme", dataset=dataset.id,
        split=dataset_pb2.SplitConfig(train_fraction=0.5, validation_fraction=0.5, test_fraction=0.0)))
    assert split_counts(resplit.dataset) == {"train": 50, "validation": 50}

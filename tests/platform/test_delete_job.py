"""DeleteJob on the platform as `tuneforge up` runs it (a real nats-server, the services, SQLite, local
storage): a final job with checkpoints and outputs in storage, metric points and log entries (reported over
NATS as a worker reports them) and the other services' copies is deleted, and none of its objects, rows or
metrics are left; deleting again is OK; a job that has not ended is FAILED_PRECONDITION; another
organization's job is NOT_FOUND; the call is in the audit log."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import job_pb2, metrics_pb2
from typer.testing import CliRunner

from services.cli.main import app
from services.client import TuneForgeClient
from tests.auth import make_key, org_client
from tests.platform.conftest import ORG, Seeded, chat_file
from tuneforge_core import nats as kit_nats
from tuneforge_core import subjects
from tuneforge_core.errors import FailedPrecondition, NotFound
from tuneforge_core.reasons import Reason
from tuneforge_core.storage import LocalObjectStore


def eventually(check: Callable[[], object], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():
                return
        except AssertionError:
            if time.monotonic() >= deadline:
                raise
        if time.monotonic() >= deadline:
            raise AssertionError(f"{getattr(check, '__name__', check)} did not hold within {timeout_s}s")
        time.sleep(0.1)


def rows(db: Path, sql: str, *args: object) -> list[tuple[object, ...]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return list(conn.execute(sql, args))


def count(db: Path, table: str, job_id: str, column: str = "job_id") -> int:
    return len(rows(db, f"SELECT 1 FROM {table} WHERE {column} = ?", job_id))


def report(seeded: Seeded, job_id: str, *, steps: range, attempt: int = 1) -> None:
    """Publishes points and log lines of the job on its worker subjects, as a worker does."""
    platform = seeded.platform

    async def send() -> None:
        assert platform.nats_url and platform.nats_auth
        nc = await kit_nats.connect(platform.nats_url, "test-worker", user="worker",
                                    password=platform.nats_auth.passwords["worker"])
        try:
            js = nc.jetstream()
            points = [metrics_pb2.MetricPoint(job_id=job_id, step=s, attempt=attempt, total_steps=10,
                                              loss=1.0 / s, kind=metrics_pb2.METRIC_KIND_TRAIN)
                      for s in steps]
            event_id = f"m-{uuid.uuid4().hex}"
            await kit_nats.publish(js, subjects.worker_metrics(job_id),
                                   events_pb2.MetricsReported(event_id=event_id, points=points), event_id)
            entries = [metrics_pb2.LogEntry(job_id=job_id, attempt=attempt, sequence=s, message=f"step {s}",
                                            level=metrics_pb2.LOG_LEVEL_INFO) for s in steps]
            event_id = f"l-{uuid.uuid4().hex}"
            await kit_nats.publish(js, subjects.worker_logs(job_id),
                                   events_pb2.LogsReported(event_id=event_id, entries=entries), event_id)
        finally:
            await nc.close()

    asyncio.run(send())


@pytest.fixture
def acme(seeded_platform: Seeded) -> Iterator[TuneForgeClient]:
    with org_client(seeded_platform.address, seeded_platform.platform.data_dir, ORG) as client:
        yield client


def new_job(client: TuneForgeClient, seeded: Seeded, name: str) -> job_pb2.Job:
    return client.create_job(job_pb2.JobSpec(base_model="Qwen/Qwen2.5-0.5B", dataset=seeded.dataset_ids[0]),
                             name=f"{name}-{uuid.uuid4().hex[:8]}")


def test_delete_job_removes_its_objects_rows_and_metrics(seeded_platform: Seeded,
                                                          acme: TuneForgeClient) -> None:
    seeded = seeded_platform
    data = seeded.platform.data_dir
    store = LocalObjectStore(data / "objects")
    doomed, kept = new_job(acme, seeded, "doomed"), new_job(acme, seeded, "kept")
    doomed = acme.cancel_job(doomed.id)
    assert doomed.state == job_pb2.JOB_STATE_CANCELLED
    prefix = f"jobs/{ORG}/{doomed.id}/"
    for key in ("checkpoints/checkpoint-5/adapter_model.safetensors",
                "checkpoints/checkpoint-5/trainer_state.json", "adapter/adapter_model.safetensors",
                "adapter/adapter_config.json", "merged/model.safetensors"):
        store.put_bytes(prefix + key, b"weights")
    store.put_bytes(f"jobs/{ORG}/{kept.id}/adapter/adapter_model.safetensors", b"other job")
    report(seeded, doomed.id, steps=range(1, 6))
    report(seeded, kept.id, steps=range(1, 3))

    def everything_is_there() -> bool:
        return (count(data / "metrics.db", "metrics_points", doomed.id) == 5
                and count(data / "metrics.db", "metrics_log_entries", doomed.id) == 5
                and rows(data / "datasets.db", "SELECT ended FROM datasets_job_usage WHERE job_id = ?",
                         doomed.id) == [(1,)]
                and count(data / "estimation.db", "estimation_jobs", doomed.id, "id") == 1
                # The other job's report too: what is checked of it at the end must have arrived.
                and count(data / "metrics.db", "metrics_points", kept.id) == 2
                and count(data / "metrics.db", "metrics_log_entries", kept.id) == 2)

    eventually(everything_is_there)
    assert len(list(acme.stream_metrics(doomed.id, follow=False))) == 5

    # A job that has not ended is refused, naming its state.
    with pytest.raises(FailedPrecondition) as refused:
        acme.delete_job(kept.id)
    assert refused.value.reason == Reason.JOB_STATE_CONFLICT
    assert "QUEUED" in refused.value.message and refused.value.metadata["state"] == "QUEUED"
    # Another organization finds neither job.
    with org_client(seeded.address, data, "bravo") as bravo:
        for ref in (doomed.id, doomed.name, kept.id):
            with pytest.raises(NotFound):
                bravo.delete_job(ref)

    response = acme.delete_job(doomed.name)
    assert (response.job, response.already_deleted) == (doomed.id, False)

    # At once: gone from the API.
    with pytest.raises(NotFound):
        acme.get_job(doomed.id)
    with pytest.raises(NotFound):
        list(acme.watch_job(doomed.id))
    with pytest.raises(NotFound):
        list(acme.stream_metrics(doomed.id, follow=False))
    assert doomed.id not in {j.id for j in acme.list_jobs(page_size=1000).jobs}
    assert not store.list_keys(prefix)
    assert not (data / "objects" / "jobs" / ORG / doomed.id).exists()

    # Soon: none of its rows anywhere (the jobs service keeps only a tombstone: id, organization, name).
    def nothing_left() -> bool:
        assert count(data / "metrics.db", "metrics_points", doomed.id) == 0
        assert count(data / "metrics.db", "metrics_log_entries", doomed.id) == 0
        assert count(data / "datasets.db", "datasets_job_usage", doomed.id) == 0
        assert count(data / "estimation.db", "estimation_jobs", doomed.id, "id") == 0
        assert count(data / "estimation.db", "estimation_calibrations", doomed.id) == 0
        assert count(data / "jobs.db", "jobs_jobs", doomed.id, "id") == 0
        assert rows(data / "jobs.db", "SELECT event_id FROM jobs_outbox WHERE subject = ? OR event_id = ?",
                    subjects.job_events(doomed.id), f"{doomed.id}.assignment") == []
        assert rows(data / "jobs.db", "SELECT purged_at IS NOT NULL FROM jobs_deletions WHERE job_id = ?",
                    doomed.id) == [(1,)]
        return True

    eventually(nothing_left)
    # The other job keeps everything.
    assert store.list_keys(f"jobs/{ORG}/{kept.id}/")
    assert count(data / "metrics.db", "metrics_points", kept.id) == 2
    assert acme.get_job(kept.id).state == job_pb2.JOB_STATE_QUEUED

    # A worker's message of the deleted job that arrives late stores nothing.
    report(seeded, doomed.id, steps=range(6, 8))
    report(seeded, kept.id, steps=range(3, 4))
    eventually(lambda: count(data / "metrics.db", "metrics_points", kept.id) == 3)
    assert count(data / "metrics.db", "metrics_points", doomed.id) == 0
    assert count(data / "metrics.db", "metrics_log_entries", doomed.id) == 0

    # Idempotent: by id and by name.
    again = acme.delete_job(doomed.id)
    assert (again.job, again.already_deleted) == (doomed.id, True)
    assert acme.delete_job(doomed.name).already_deleted
    with pytest.raises(NotFound):
        acme.delete_job("no-such-job")

    # The audit log has the calls, naming the job.
    events = [e for e in acme.list_audit_events(page_size=1000).events if e.method.endswith("/DeleteJob")]
    assert {(e.resource, e.code) for e in events} >= {(doomed.id, "OK"), (kept.id, "FAILED_PRECONDITION")}

    acme.cancel_job(kept.id)
    assert not acme.delete_job(kept.id).already_deleted
    eventually(lambda: not store.list_keys(f"jobs/{ORG}/{kept.id}/")
               and count(data / "metrics.db", "metrics_points", kept.id) == 0)


def test_tuneforge_datasets_delete_asks_first_and_refuses_a_dataset_in_use(seeded_platform: Seeded,
                                                                         tmp_path: Path) -> None:
    """`tuneforge datasets delete`: asks first (no: nothing deleted, exit 1), --yes deletes it and its files
    (GetDataset is NOT_FOUND after); a dataset a queued job trains on is refused with the reason;
    another organization's dataset is not found."""
    address, data_dir = seeded_platform.address, seeded_platform.platform.data_dir
    key = make_key(address, data_dir, ORG, "admin")
    runner = CliRunner()

    def cli(*args: str, answer: str | None = None, as_key: str = key) -> tuple[int, str]:
        result = runner.invoke(app, ["datasets", "delete", *args, "--address", address], input=answer,
                               env={"TUNEFORGE_API_KEY": as_key, "COLUMNS": "200",
                                    "TUNEFORGE_DATA_DIR": "/nonexistent"})
        return result.exit_code, " ".join(result.output.split())

    name = f"to-delete-{uuid.uuid4().hex[:8]}"
    with org_client(address, data_dir, ORG) as client:
        dataset = client.upload_dataset(chat_file(tmp_path / "chat.jsonl"), name).dataset
    code, out = cli(name, answer="n\n")
    assert code == 1 and "Delete dataset" in out, out
    code, out = cli(name, as_key=make_key(address, data_dir, "other-org", "admin"), answer="y\n")
    assert code == 2 and f"NOT_FOUND: dataset '{name}' was not found in organization 'other-org'" in out, out
    code, out = cli(name, "--yes")
    assert code == 0 and f"deleted dataset {dataset.id} ({name})" in out, out
    with org_client(address, data_dir, ORG) as client, pytest.raises(NotFound):
        client.get_dataset(dataset.id)
    code, out = cli(seeded_platform.dataset_ids[0], "--yes")  # the seeded jobs are queued on it
    assert code == 2 and "FAILED_PRECONDITION" in out and "is used by jobs that have not ended" in out, out

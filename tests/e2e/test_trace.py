"""One trace follows a job: CreateJob -> outbox relay publish -> the worker's assignment (prepare, train,
upload) -> the SUCCEEDED report applied by the jobs service and announced through the outbox again.

The platform runs as `tuneforge up` runs it, with TUNEFORGE_TRACING=file: the services process and the
worker append their ended spans to one JSON-lines file, read back once the platform has stopped."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from tuneforge.v1 import job_pb2

from tests.auth import org_client
from tests.e2e.conftest import lora_spec, start_platform, wait_final

pytestmark = pytest.mark.slow

Span = dict[str, Any]


def test_one_trace_follows_a_job_from_create_job_to_the_workers_last_upload(
        tmp_path: Path, tiny_assets: tuple[Path, Path]) -> None:
    model, data = tiny_assets
    trace_file = tmp_path / "trace.jsonl"
    platform = start_platform(tmp_path / "platform", workers=1, model=model, TUNEFORGE_TRACING="file",
                              TUNEFORGE_TRACING_FILE=str(trace_file), TUNEFORGE_LOG_FORMAT="json")
    try:
        with org_client(platform.address, platform.data_dir, "traced") as client:
            dataset = client.upload_dataset(data, "chat", request_id=str(uuid.uuid4())).dataset
            job = client.create_job(lora_spec(model, dataset.id, epochs=1), name="traced")
            final = wait_final(client, job.id)
            assert final.state == job_pb2.JOB_STATE_SUCCEEDED, final.error
    finally:
        platform.stop()  # every process has ended (and written) its spans

    spans: list[Span] = [json.loads(line) for line in trace_file.read_text().splitlines()]
    by_id = {s["span_id"]: s for s in spans}

    def only(**match: object) -> Span:
        found = [s for s in spans if all(s.get(k) == v for k, v in match.items())]
        assert len(found) == 1, (match, found)
        return found[0]

    def children(parent: Span, **match: object) -> list[Span]:
        return [s for s in spans if s["parent_span_id"] == parent["span_id"]
                and all(s.get(k) == v for k, v in match.items())]

    create = only(name="tuneforge.v1.JobService/CreateJob", kind="SERVER")
    trace_id = create["trace_id"]
    assert create["service"] == "tuneforge" and create["status"] != "ERROR"

    # CreateJob stored the job and its events in one span; the assignment left through the outbox in a
    # span that is that one's child ...
    [store] = children(create, name="store job and events")
    assert store["attributes"]["tuneforge.job_id"] == job.id
    [publish] = [s for s in children(store, kind="PRODUCER")
                 if str(s["attributes"]["messaging.destination.name"]).startswith("tuneforge.work.jobs.")]
    assert publish["attributes"]["messaging.message.id"] == f"{job.id}.assignment"
    # ... and the worker's delivery continues it, across processes, through the message's headers.
    [assignment] = children(publish, name=f"assignment {job.id}", kind="CONSUMER")
    assert assignment["service"] == "tuneforge-worker" and assignment["trace_id"] == trace_id
    assert assignment["attributes"]["tuneforge.attempt"] == 1
    [prepare] = children(assignment, name="prepare")
    [train] = children(assignment, name="train")
    [upload] = children(assignment, name="upload outputs")
    assert prepare["end_time_ns"] <= train["start_time_ns"]
    assert train["end_time_ns"] <= upload["start_time_ns"]
    assert all(s["status"] != "ERROR" for s in (assignment, prepare, train, upload))

    # The worker's reports (PREPARING ... SUCCEEDED) are applied in the jobs service as the delivery's
    # children; the last one announces the final state through the outbox, still in the same trace.
    reports = sorted(children(assignment, kind="CONSUMER", service="tuneforge"),
                     key=lambda s: s["start_time_ns"])
    assert reports and all(s["name"] == f"consume tuneforge.worker.jobs.{job.id}.status" for s in reports)
    assert reports[-1]["start_time_ns"] >= upload["end_time_ns"]
    announced = children(reports[-1], kind="PRODUCER")
    assert [s["attributes"]["messaging.destination.name"] for s in announced] == \
        [f"tuneforge.events.jobs.{job.id}"]

    # Every span of the chain is in the one trace, and each parent link resolves to a span of it.
    for s in (create, store, publish, assignment, prepare, train, upload, *reports, *announced):
        assert s["trace_id"] == trace_id
        assert s is create or by_id[s["parent_span_id"]]["trace_id"] == trace_id

    # The worker's JSON log lines written during the delivery carry the job and the trace.
    lines = [json.loads(line) for line in (platform.logs_dir / "worker-0.log").read_text().splitlines()
             if line.startswith("{")]
    assert any(line.get("job_id") == job.id and line.get("trace_id") == trace_id for line in lines)

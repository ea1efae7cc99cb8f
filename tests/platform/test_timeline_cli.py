"""`tuneforge jobs events` and `tuneforge jobs eval` against the platform as `tuneforge up` runs it: a job
is driven to SUCCEEDED by WorkerJobUpdates published on NATS as a worker publishes them (with timeline
events, phases and an evaluation report), and the CLI shows its timeline (table, JSON, and --follow until
it ends) and its report (metrics table, samples wrapped whole on a narrow terminal)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Callable

from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import evaluation_pb2, job_pb2
from typer.testing import CliRunner

from services.cli.main import app
from services.client import TuneForgeClient
from tests.auth import make_key
from tests.platform.conftest import ORG, Seeded
from tuneforge_core import nats as kit_nats
from tuneforge_core import subjects
from tuneforge_core.storage import LocalObjectStore

runner = CliRunner()
U = events_pb2.WorkerUpdateKind
E = job_pb2.JobEventType
LONG_ANSWER = " ".join(f"word{i}" for i in range(60))  # far wider than the terminal


def cli(seeded: Seeded, key: str, *args: str, columns: int = 200) -> tuple[int, str]:
    result = runner.invoke(app, [*args, "--address", seeded.address],
                           env={"TUNEFORGE_API_KEY": key, "COLUMNS": str(columns),
                                "TUNEFORGE_DATA_DIR": "/nonexistent"})
    return result.exit_code, result.output


def eventually(check: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "did not happen in time"
        time.sleep(0.05)


def send(seeded: Seeded, *updates: events_pb2.WorkerJobUpdate, heartbeat: bool = False) -> None:
    """Publishes the updates on the job's worker status subject, as a worker does; with `heartbeat`, first
    the worker's IDLE heartbeat (the fair scheduler hands a job to the work queue only for a free worker)."""
    platform = seeded.platform

    async def publish() -> None:
        assert platform.nats_url and platform.nats_auth
        nc = await kit_nats.connect(platform.nats_url, "test-worker", user="worker",
                                    password=platform.nats_auth.passwords["worker"])
        try:
            if heartbeat:
                beat = events_pb2.WorkerHeartbeat(worker_id="w-cli", hostname="test", gpu_type="cpu",
                                                  state=job_pb2.WORKER_STATE_IDLE, interval_seconds=5.0)
                await nc.publish(subjects.WORKER_HEARTBEATS, beat.SerializeToString())
                await nc.flush()
            js = nc.jetstream()
            for update in updates:
                await kit_nats.publish(js, subjects.worker_status(update.job_id), update, update.event_id)
        finally:
            await nc.close()

    asyncio.run(publish())


def update(job_id: str, kind: int, *events: job_pb2.JobEvent, phase: int = 0) -> events_pb2.WorkerJobUpdate:
    return events_pb2.WorkerJobUpdate(event_id=f"u-{uuid.uuid4().hex}", job_id=job_id, worker_id="w-cli",
                                      attempt=1, kind=events_pb2.WorkerUpdateKind.ValueType(kind),
                                      events=events, phase=job_pb2.JobPhase.ValueType(phase))


def succeeded(seeded: Seeded, job_id: str) -> events_pb2.WorkerJobUpdate:
    done = update(job_id, U.WORKER_UPDATE_KIND_SUCCEEDED,
                  job_pb2.JobEvent(type=E.JOB_EVENT_TYPE_EVALUATION_COMPLETED, metrics={"tuned_loss": 1.5}))
    store = LocalObjectStore(seeded.platform.data_dir / "objects")
    done.output.adapter_uri = store.uri(f"jobs/{ORG}/{job_id}/adapter")
    done.evaluation.CopyFrom(evaluation_pb2.EvaluationReport(
        status=evaluation_pb2.EVALUATION_STATUS_SUCCEEDED, split="test", example_count=12,
        primary_metric="loss", improved=True, base_metrics={"loss": 2.0, "perplexity": 7.39},
        tuned_metrics={"loss": 1.5, "perplexity": 4.48},
        samples=[evaluation_pb2.EvaluationSample(prompt="What is 2 + 2?", reference="4",
                                                 base_answer=LONG_ANSWER, tuned_answer="4")]))
    return done


def test_jobs_events_and_eval(seeded_platform: Seeded) -> None:
    seeded = seeded_platform
    admin = make_key(seeded.address, seeded.platform.data_dir, ORG, "admin")
    with TuneForgeClient(seeded.address, api_key=admin) as client:
        # HIGH: the organization's older jobs (the seeded ones) wait for a worker too; this one goes first.
        job_id, cancelled = (client.create_job(job_pb2.JobSpec(base_model="Qwen/Qwen2.5-0.5B",
                                                               dataset=seeded.dataset_ids[0]),
                                               name=f"{name}-{uuid.uuid4().hex[:8]}",
                                               priority=job_pb2.JOB_PRIORITY_HIGH).id
                             for name in ("story", "cancelled"))
        client.cancel_job(cancelled)

    # Before any worker: QUEUED, and the evaluation is PENDING.
    code, out = cli(seeded, admin, "jobs", "events", job_id)
    assert code == 0 and "QUEUED" in out, out
    code, out = cli(seeded, admin, "jobs", "eval", job_id)
    assert code == 0 and "PENDING" in out and job_id in out, out

    # A worker announces itself: the job goes to the work queue for it (its reason clears).
    send(seeded, heartbeat=True)
    eventually(lambda: '"status_message"' not in cli(seeded, admin, "jobs", "get", job_id, "--json")[1])
    send(seeded, update(job_id, U.WORKER_UPDATE_KIND_PREPARING,
                        job_pb2.JobEvent(type=E.JOB_EVENT_TYPE_MODEL_DOWNLOADED, size_bytes=2048)),
         update(job_id, U.WORKER_UPDATE_KIND_RUNNING,
                job_pb2.JobEvent(type=E.JOB_EVENT_TYPE_TRAINING_STARTED)))
    eventually(lambda: '"JOB_PHASE_TRAINING"' in cli(seeded, admin, "jobs", "get", job_id, "--json")[1])

    # --follow prints what happened so far, then each new event, and ends with the job.
    ender = threading.Timer(1.0, lambda: send(seeded, succeeded(seeded, job_id)))
    ender.start()
    try:
        code, out = cli(seeded, admin, "jobs", "events", job_id, "--follow")
    finally:
        ender.join()
    assert code == 0, out
    # One line an event, opening with its number (a long message wraps onto lines of its own).
    followed = [parts[3] for parts in map(str.split, out.splitlines())
                if len(parts) > 3 and parts[0].isdigit()]
    assert followed == ["QUEUED", "WORKER_ASSIGNED", "MODEL_DOWNLOADED", "TRAINING_STARTED",
                        "EVALUATION_COMPLETED", "SUCCEEDED"], out

    code, out = cli(seeded, admin, "jobs", "events", job_id, "--json")
    assert code == 0, out
    events = json.loads(out)["events"]
    assert [e["sequence"] for e in events] == ["1", "2", "3", "4", "5", "6"]  # int64 as JSON strings
    assert events[1]["worker_id"] == "w-cli" and events[2]["size_bytes"] == "2048"
    code, out = cli(seeded, admin, "jobs", "events", job_id)
    assert code == 0 and "SUCCEEDED" in out and "2.0 KiB" in out, out

    code, out = cli(seeded, admin, "jobs", "eval", job_id, columns=60)
    assert code == 0, out
    assert "SUCCEEDED" in out and "examples: 12" in out and "loss *" in out and "better" in out, out
    assert all(f"word{i}" in out for i in range(60)), out  # wrapped, never cut
    code, out = cli(seeded, admin, "jobs", "eval", job_id, "--json")
    assert code == 0, out
    report = json.loads(out)
    assert report["job"] == job_id and report["evaluation"]["tuned_metrics"]["loss"] == 1.5

    # A job that ended before training finished: SKIPPED, saying why.
    code, out = cli(seeded, admin, "jobs", "eval", cancelled)
    assert code == 0 and "SKIPPED" in out and "CANCELLED" in out, out
    code, out = cli(seeded, admin, "jobs", "events", "no-such-job")
    assert code == 2 and "NOT_FOUND" in out, out

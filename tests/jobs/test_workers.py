"""Workers' heartbeats in the jobs service, against a real SQLite database with the real migrations: a job
whose worker is lost goes back to QUEUED with a reason (or fails WORKER_LOST after its last delivery), a
queued job says when no worker would take it, and ListWorkers pages through what the heartbeats said."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import job_pb2

from services.jobs.component import MIGRATIONS
from services.jobs.manager import JobManager
from services.jobs.models import JobOutbox, JobRow
from services.jobs.workers import WorkerRules, span
from services.kit.db import Database
from services.kit.outbox import OutboxRelay
from tuneforge_core import states
from tuneforge_core.errors import InvalidArgument

S = job_pb2.JobState
U = events_pb2.WorkerUpdateKind
W = job_pb2.WorkerState
T0 = datetime(2026, 12, 1, 10, 0, 0, tzinfo=UTC)
RULES = WorkerRules(ack_wait_s=10.0, max_deliver=3, seen_window_s=300.0)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def manager(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobManager]:
    """The manager on SQLite, and on PostgreSQL where one is reachable (skipped with the reason if not)."""
    url = (f"sqlite:///{tmp_path / 'jobs.db'}" if request.param == "sqlite"
           else request.getfixturevalue("postgres_url"))
    db = Database(url, "jobs")
    db.migrate(MIGRATIONS)
    relay = OutboxRelay(db, js=None, model=JobOutbox)  # type: ignore[arg-type]
    manager = JobManager(db, relay, datasets=None, store=None, nc=None, workers=RULES)  # type: ignore[arg-type]
    manager.listening_since = T0 - timedelta(hours=1)
    yield manager
    db.dispose()


def insert_job(manager: JobManager, job_id: str = "job_1", gpu_type: str = "", gpu_count: int = 1,
               organization: str = "acme") -> None:
    spec = job_pb2.JobSpec(base_model="org/m", dataset="ds_1")
    spec.hardware.gpu_type, spec.hardware.gpu_count = gpu_type, gpu_count
    with manager.db.session() as s:
        s.add(JobRow(id=job_id, organization=organization, name=job_id, spec=spec.SerializeToString(),
                     state=S.JOB_STATE_QUEUED, revision=1, request_hash=""))


async def run_on(manager: JobManager, worker: str, attempt: int = 1, job_id: str = "job_1") -> None:
    for kind in (U.WORKER_UPDATE_KIND_PREPARING, U.WORKER_UPDATE_KIND_RUNNING):
        await manager.apply_worker_update(events_pb2.WorkerJobUpdate(
            event_id=f"{job_id}-{attempt}-{kind}", job_id=job_id, worker_id=worker, attempt=attempt,
            kind=kind))


def ts(value: datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(value)
    return out


def beat(worker: str, state: int = W.WORKER_STATE_IDLE, *, job: str = "", attempt: int = 0,
         gpu_type: str = "cpu", gpu_count: int = 0, started: datetime = T0 - timedelta(minutes=10),
         interval: float = 1.0) -> events_pb2.WorkerHeartbeat:
    return events_pb2.WorkerHeartbeat(
        worker_id=worker, hostname="host-a", gpu_type=gpu_type, gpu_count=gpu_count, state=state,
        job_id=job, attempt=attempt, started_at=ts(started), time=ts(T0), interval_seconds=interval)


async def test_a_job_whose_worker_goes_quiet_is_queued_again_then_taken_by_another(
    manager: JobManager,
) -> None:
    insert_job(manager)
    await run_on(manager, "w1")
    await manager.record_heartbeat(beat("w1", W.WORKER_STATE_BUSY, job="job_1", attempt=1), now=T0)
    # Quiet for less than the claim lasts (ack wait 10 s, more than 3 intervals of 1 s): still its job.
    assert await manager.check_workers(now=T0 + timedelta(seconds=9)) == 0
    assert (await manager.get("acme", "job_1")).state == S.JOB_STATE_RUNNING

    assert await manager.check_workers(now=T0 + timedelta(seconds=11)) == 1
    job = await manager.get("acme", "job_1")
    assert (job.state, job.attempt, job.worker_id) == (S.JOB_STATE_QUEUED, 1, "w1")
    assert job.status_message.startswith(
        "worker w1 stopped responding at 2026-12-01T10:00:00Z; waiting for another delivery (attempt 2 of 3)"
    ), job.status_message
    assert job.status_message.endswith("; no worker that would take it is alive"), job.status_message
    assert not job.HasField("error")
    assert await manager.check_workers(now=T0 + timedelta(seconds=12)) == 0, "said once, not every pass"

    await manager.record_heartbeat(beat("w2"), now=T0 + timedelta(seconds=13))
    await manager.check_workers(now=T0 + timedelta(seconds=14))
    job = await manager.get("acme", "job_1")
    assert job.status_message == (
        "worker w1 stopped responding at 2026-12-01T10:00:00Z; waiting for another delivery (attempt 2 of 3)"
    ), "a worker that takes it is alive again: only the requeue is left to say"
    await run_on(manager, "w2", attempt=2)
    job = await manager.get("acme", "job_1")
    assert (job.state, job.attempt, job.worker_id, job.status_message) == (S.JOB_STATE_RUNNING, 2, "w2", "")


async def test_the_last_delivery_lost_fails_the_job_worker_lost(manager: JobManager) -> None:
    insert_job(manager)
    await run_on(manager, "w1", attempt=3)
    await manager.record_heartbeat(beat("w1", W.WORKER_STATE_BUSY, job="job_1", attempt=3), now=T0)
    await manager.check_workers(now=T0 + timedelta(seconds=30))
    job = await manager.get("acme", "job_1")
    assert job.state == S.JOB_STATE_FAILED and job.status_message == ""
    info = error_details_pb2.ErrorInfo()
    assert job.error.details[0].Unpack(info) and info.reason == "WORKER_LOST"
    assert info.metadata["worker"] == "w1" and "delivered 3 times" in job.error.message


async def test_a_cancelling_job_whose_worker_is_lost_is_cancelled(manager: JobManager) -> None:
    insert_job(manager)
    await run_on(manager, "w1")
    await manager.cancel("acme", "job_1")
    await manager.record_heartbeat(beat("w1", W.WORKER_STATE_BUSY, job="job_1", attempt=1), now=T0)
    await manager.check_workers(now=T0 + timedelta(seconds=30))
    assert (await manager.get("acme", "job_1")).state == S.JOB_STATE_CANCELLED


async def test_a_worker_thought_lost_that_still_runs_the_job_takes_it_back(manager: JobManager) -> None:
    insert_job(manager)
    insert_job(manager, "job_2")
    await run_on(manager, "w1")
    await run_on(manager, "w9", job_id="job_2")
    for worker, job_id in (("w1", "job_1"), ("w9", "job_2")):
        await manager.record_heartbeat(beat(worker, W.WORKER_STATE_BUSY, job=job_id, attempt=1), now=T0)
    await manager.check_workers(now=T0 + timedelta(seconds=30))
    assert {(await manager.get("acme", j)).state for j in ("job_1", "job_2")} == {S.JOB_STATE_QUEUED}

    # w1's heartbeats come through again: the same delivery is still under way there.
    beat_back = beat("w1", W.WORKER_STATE_BUSY, job="job_1", attempt=1)
    assert await manager.record_heartbeat(beat_back, now=T0 + timedelta(seconds=31))
    job = await manager.get("acme", "job_1")
    assert (job.state, job.attempt, job.status_message) == (S.JOB_STATE_PREPARING, 1, "")
    # w9 says nothing but finishes: its result counts (the job passes through RUNNING on the way).
    done = events_pb2.WorkerJobUpdate(event_id="done", job_id="job_2", worker_id="w9", attempt=1,
                                      kind=U.WORKER_UPDATE_KIND_SUCCEEDED)
    assert await manager.apply_worker_update(done)
    assert (await manager.get("acme", "job_2")).state == S.JOB_STATE_SUCCEEDED


async def test_a_restarted_or_stopped_worker_holds_nothing_at_once(manager: JobManager) -> None:
    insert_job(manager)
    insert_job(manager, "job_2")
    await run_on(manager, "w1")
    await run_on(manager, "w2", job_id="job_2")
    await manager.record_heartbeat(beat("w1", W.WORKER_STATE_BUSY, job="job_1", attempt=1), now=T0)
    # The same id from a new process (as an embedded worker restarted with its id): the old one is gone.
    restarted = beat("w1", started=T0 + timedelta(seconds=2))
    assert await manager.record_heartbeat(restarted, now=T0 + timedelta(seconds=3))
    job = await manager.get("acme", "job_1")
    assert job.state == S.JOB_STATE_QUEUED
    assert job.status_message.startswith("worker w1 stopped responding at 2026-12-01T10:00:00Z")

    stopped = beat("w2", W.WORKER_STATE_STOPPED)
    assert await manager.record_heartbeat(stopped, now=T0 + timedelta(seconds=4))
    job = await manager.get("acme", "job_2")
    assert job.state == S.JOB_STATE_QUEUED
    assert job.status_message.startswith("worker w2 shut down at 2026-12-01T10:00:04Z; waiting for another "
                                         "delivery (attempt 2 of 3)")


async def test_silence_counts_only_while_the_service_listens(manager: JobManager) -> None:
    """A jobs service that was down (or cut off from NATS) heard no heartbeats: that is no lost worker."""
    insert_job(manager)
    await run_on(manager, "w1")
    await manager.record_heartbeat(beat("w1", W.WORKER_STATE_BUSY, job="job_1", attempt=1), now=T0)
    manager.listening_since = T0 + timedelta(minutes=30)  # restarted, or reconnected, half an hour later
    assert await manager.check_workers(now=T0 + timedelta(minutes=30, seconds=5)) == 0
    assert (await manager.get("acme", "job_1")).state == S.JOB_STATE_RUNNING
    await manager.check_workers(now=T0 + timedelta(minutes=30, seconds=11))
    assert (await manager.get("acme", "job_1")).state == S.JOB_STATE_QUEUED


async def test_a_queued_job_says_when_no_worker_would_take_it(manager: JobManager) -> None:
    insert_job(manager, "job_h100", gpu_type="nvidia-h100", gpu_count=2)
    insert_job(manager, "job_any")
    await manager.record_heartbeat(beat("cpu-1"), now=T0)
    await manager.check_workers(now=T0 + timedelta(seconds=1))
    h100 = await manager.get("acme", "job_h100")
    assert h100.status_message == "waiting for a worker with nvidia-h100 x2; none seen in the last 5 minutes"
    assert (await manager.get("acme", "job_any")).status_message == "", "the CPU worker takes it"

    gpu = beat("gpu-1", gpu_type="nvidia-h100", gpu_count=2)
    await manager.record_heartbeat(gpu, now=T0 + timedelta(seconds=2))
    await manager.check_workers(now=T0 + timedelta(seconds=3))
    assert (await manager.get("acme", "job_h100")).status_message == ""

    # Quiet past its claim: the reason names the last one seen.
    await manager.check_workers(now=T0 + timedelta(seconds=20))
    h100 = await manager.get("acme", "job_h100")
    assert h100.status_message == ("waiting for a worker with nvidia-h100 x2; none is alive (the last one, "
                                   "gpu-1, stopped responding at 2026-12-01T10:00:02Z)")
    job_any = await manager.get("acme", "job_any")
    assert job_any.status_message.startswith("waiting for a worker; none is alive (the last one, ")

    # A GPU of unknown type takes jobs of every GPU type, for as many GPUs as it counts: never fewer.
    await manager.record_heartbeat(beat("gpu-x", gpu_type="", gpu_count=1), now=T0 + timedelta(seconds=21))
    await manager.check_workers(now=T0 + timedelta(seconds=22))
    assert (await manager.get("acme", "job_h100")).status_message.endswith(
        "; the alive workers of that GPU type have at most 1 GPU")
    await manager.record_heartbeat(beat("gpu-y", gpu_type="", gpu_count=2), now=T0 + timedelta(seconds=23))
    await manager.check_workers(now=T0 + timedelta(seconds=24))
    assert (await manager.get("acme", "job_h100")).status_message == ""


async def test_just_started_the_reason_says_since_when_it_listened(manager: JobManager) -> None:
    manager.listening_since = T0
    insert_job(manager, gpu_type="nvidia-t4")
    await manager.check_workers(now=T0 + timedelta(seconds=12))
    assert (await manager.get("acme", "job_1")).status_message == (
        "waiting for a worker with nvidia-t4; none seen since 2026-12-01T10:00:00Z, when the jobs service "
        "began listening")
    assert [span(s) for s in (1, 59, 300, 7200)] == ["1 second", "59 seconds", "5 minutes", "2 hours"]


async def test_list_workers_pages_and_shows_a_job_only_to_its_organization(manager: JobManager) -> None:
    insert_job(manager, organization="acme")
    await run_on(manager, "w2")
    await manager.record_heartbeat(beat("w1"), now=T0)
    await manager.record_heartbeat(
        beat("w2", W.WORKER_STATE_BUSY, job="job_1", attempt=1, gpu_type="nvidia-h100", gpu_count=2),
        now=T0 + timedelta(seconds=5))
    page, token = await manager.list_workers("acme", 1, "", now=T0 + timedelta(seconds=12))
    assert [w.id for w in page] == ["w1"] and token
    assert (page[0].state, page[0].alive, page[0].gpu_type, page[0].gpu_count) == (
        W.WORKER_STATE_IDLE, False, "cpu", 0)
    page, token = await manager.list_workers("acme", 1, token, now=T0 + timedelta(seconds=12))
    (w2,) = page
    assert token == "" and (w2.id, w2.job, w2.attempt, w2.alive) == ("w2", "job_1", 1, True)
    assert w2.last_heartbeat_time.ToDatetime(tzinfo=UTC) == T0 + timedelta(seconds=5)
    assert w2.start_time.ToDatetime(tzinfo=UTC) == T0 - timedelta(minutes=10)
    others, _ = await manager.list_workers("other", 50, "")
    assert {w.id: w.job for w in others} == {"w1": "", "w2": ""}, "another organization's job stays hidden"
    with pytest.raises(InvalidArgument):
        await manager.list_workers("acme", 1, "forged.token")
    insert_job(manager, "job_2")
    _, jobs_token = await manager.list("acme", [], 1, "")
    with pytest.raises(InvalidArgument):  # a ListJobs token is no ListWorkers token
        await manager.list_workers("acme", 1, jobs_token)


async def test_long_gone_workers_are_forgotten(manager: JobManager) -> None:
    await manager.record_heartbeat(beat("old"), now=T0 - timedelta(days=2))
    await manager.record_heartbeat(beat("new"), now=T0)
    await manager.check_workers(now=T0)
    assert [w.id for w in (await manager.list_workers("acme", 50, ""))[0]] == ["new"]


def test_running_and_preparing_may_go_back_to_queued() -> None:
    for state in (S.JOB_STATE_PREPARING, S.JOB_STATE_RUNNING):
        assert states.can_move(state, S.JOB_STATE_QUEUED)
    assert not states.can_move(S.JOB_STATE_CANCELLING, S.JOB_STATE_QUEUED)
    assert not any(states.can_move(final, S.JOB_STATE_QUEUED) for final in states.FINAL)

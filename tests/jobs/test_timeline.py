"""The job's timeline, phase and evaluation report (services.jobs.timeline) against a real SQLite database
with the real migrations applied, driven by WorkerJobUpdates as the worker sends them: events numbered
without gaps in the order of the changes, recorded once however often an update comes, never from an
update the fence refuses; the phase a worker reports; the report a SUCCEEDED update carries, and what
GetJobEvaluation says before and without one; WatchJob's events; and DeleteJob taking the timeline along."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import func, select
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import evaluation_pb2, job_pb2, job_service_pb2

from services.jobs import timeline
from services.jobs.component import MIGRATIONS
from services.jobs.deletion import JobDeletions
from services.jobs.manager import JobManager
from services.jobs.models import JobEventRow, JobOutbox, JobRow
from services.jobs.timeline import JobTimeline
from services.kit.db import Database
from services.kit.outbox import OutboxRelay
from trainer_worker.reporting import hand_back_status
from tuneforge_core.errors import InvalidArgument, NotFound, error_status
from tuneforge_core.reasons import Reason
from tuneforge_core.storage import LocalObjectStore

S = job_pb2.JobState
U = events_pb2.WorkerUpdateKind
E = job_pb2.JobEventType
P = job_pb2.JobPhase
ES = evaluation_pb2.EvaluationStatus
ORG = "acme"


class FakeNats:
    """What JobManager.watch uses of NATS: a subscription that never delivers (the watch polls)."""

    class _Sub:
        async def unsubscribe(self) -> None:
            pass

    async def subscribe(self, subject: str, cb: Any = None) -> Any:
        return self._Sub()


@pytest.fixture
def manager(tmp_path: Path) -> JobManager:
    db = Database(f"sqlite:///{tmp_path / 'jobs.db'}", "jobs")
    db.migrate(MIGRATIONS)
    relay = OutboxRelay(db, js=None, model=JobOutbox)  # type: ignore[arg-type]
    store = LocalObjectStore(tmp_path / "objects")
    return JobManager(db, relay, datasets=None, store=store, nc=FakeNats())  # type: ignore[arg-type]


@pytest.fixture
def story(manager: JobManager) -> JobTimeline:
    return JobTimeline(manager.db)


def insert_job(manager: JobManager, job_id: str = "job_1", spec: job_pb2.JobSpec | None = None) -> None:
    """A QUEUED job as CreateJob leaves it, with its QUEUED event."""
    spec = spec or job_pb2.JobSpec(base_model="org/m", dataset="ds_1")
    with manager.db.session() as s:
        row = JobRow(id=job_id, organization=ORG, name=job_id, spec=spec.SerializeToString(),
                     state=S.JOB_STATE_QUEUED, revision=1, request_hash="")
        s.add(row)
        s.flush()
        timeline.on_created(s, row)


def event(type_: int, **fields: Any) -> job_pb2.JobEvent:
    return job_pb2.JobEvent(type=job_pb2.JobEventType.ValueType(type_), **fields)


def update(kind: int, event_id: str, *events: job_pb2.JobEvent, attempt: int = 1, worker: str = "w1",
           phase: int = 0, job_id: str = "job_1") -> events_pb2.WorkerJobUpdate:
    return events_pb2.WorkerJobUpdate(event_id=event_id, job_id=job_id, worker_id=worker, attempt=attempt,
                                      kind=events_pb2.WorkerUpdateKind.ValueType(kind), events=events,
                                      phase=job_pb2.JobPhase.ValueType(phase))


def succeeded(manager: JobManager, event_id: str, *events: job_pb2.JobEvent, attempt: int = 1,
              report: evaluation_pb2.EvaluationReport | None = None) -> events_pb2.WorkerJobUpdate:
    done = update(U.WORKER_UPDATE_KIND_SUCCEEDED, event_id, *events, attempt=attempt)
    done.output.adapter_uri = manager.store.uri("jobs/acme/job_1/adapter")
    done.output.kept_step = 20
    if report is not None:
        done.evaluation.CopyFrom(report)
    return done


REPORT = evaluation_pb2.EvaluationReport(
    status=ES.EVALUATION_STATUS_SUCCEEDED, split="test", example_count=10, primary_metric="loss",
    improved=True, base_metrics={"loss": 2.0}, tuned_metrics={"loss": 1.5},
    samples=[evaluation_pb2.EvaluationSample(prompt="2+2?", reference="4", base_answer="5",
                                             tuned_answer="4")])


async def events_of(story: JobTimeline, job: str = "job_1") -> list[job_pb2.JobEvent]:
    events, token = await story.list_events(ORG, job, 1000, "")
    assert not token
    return events


def types(events: list[job_pb2.JobEvent]) -> list[str]:
    return [E.Name(e.type).removeprefix("JOB_EVENT_TYPE_") for e in events]


async def phase(manager: JobManager) -> int:
    return (await manager.get(ORG, "job_1")).phase


async def test_a_run_is_told_in_order_without_gaps(manager: JobManager, story: JobTimeline) -> None:
    insert_job(manager)
    apply = manager.apply_worker_update
    assert await apply(update(U.WORKER_UPDATE_KIND_PREPARING, "u1", event(E.JOB_EVENT_TYPE_MODEL_DOWNLOADED,
                                                                          size_bytes=1000)))
    assert await phase(manager) == P.JOB_PHASE_DOWNLOADING
    assert await apply(update(U.WORKER_UPDATE_KIND_RUNNING, "u2", event(E.JOB_EVENT_TYPE_DATA_DOWNLOADED),
                              event(E.JOB_EVENT_TYPE_TRAINING_STARTED)))
    assert await phase(manager) == P.JOB_PHASE_TRAINING
    assert await apply(update(U.WORKER_UPDATE_KIND_PROGRESS, "u3", event(E.JOB_EVENT_TYPE_CHECKPOINT_SAVED,
                                                                         step=10, attempt=1)))
    assert await apply(update(U.WORKER_UPDATE_KIND_PROGRESS, "u4", event(E.JOB_EVENT_TYPE_EVALUATION_STARTED),
                              phase=P.JOB_PHASE_EVALUATING))
    assert await phase(manager) == P.JOB_PHASE_EVALUATING
    assert (await story.evaluation(ORG, "job_1"))[1].status == ES.EVALUATION_STATUS_PENDING
    assert await apply(succeeded(manager, "u5", event(E.JOB_EVENT_TYPE_EVALUATION_COMPLETED),
                                 event(E.JOB_EVENT_TYPE_UPLOADING, size_bytes=5), report=REPORT))
    job = await manager.get(ORG, "job_1")
    assert (job.state, job.phase) == (S.JOB_STATE_SUCCEEDED, P.JOB_PHASE_UNSPECIFIED)

    events = await events_of(story)
    assert types(events) == ["QUEUED", "WORKER_ASSIGNED", "MODEL_DOWNLOADED", "DATA_DOWNLOADED",
                             "TRAINING_STARTED", "CHECKPOINT_SAVED", "EVALUATION_STARTED",
                             "EVALUATION_COMPLETED", "UPLOADING", "SUCCEEDED"]
    assert [e.sequence for e in events] == list(range(1, 11))
    assert [e.attempt for e in events] == [0] + [1] * 9  # the worker's events take the update's attempt
    assert events[1].worker_id == "w1" and events[2].size_bytes == 1000 and events[5].step == 10
    assert events[-1].step == 20 and all(e.message for e in events if e.type in timeline.SERVICE_TYPES)
    assert all(e.time.seconds for e in events)
    job_id, report = await story.evaluation(ORG, "job_1")
    assert job_id == "job_1" and report == REPORT


async def test_a_redelivered_update_is_recorded_once(manager: JobManager, story: JobTimeline) -> None:
    insert_job(manager)
    first = update(U.WORKER_UPDATE_KIND_PREPARING, "u1", event(E.JOB_EVENT_TYPE_MODEL_DOWNLOADED),
                   event(E.JOB_EVENT_TYPE_SUCCEEDED))  # a type only the service records: dropped
    assert await manager.apply_worker_update(first)
    assert not await manager.apply_worker_update(first)
    # Even past the inbox, an update's events are recorded once: their source is unique per job.
    with manager.db.session() as s:
        row = s.get(JobRow, "job_1")
        assert row is not None
        assert not timeline.on_worker_update(s, row, first)
    assert types(await events_of(story)) == ["QUEUED", "WORKER_ASSIGNED", "MODEL_DOWNLOADED"]


async def test_a_fenced_update_leaves_no_events(manager: JobManager, story: JobTimeline) -> None:
    insert_job(manager)
    assert await manager.apply_worker_update(update(U.WORKER_UPDATE_KIND_RUNNING, "a1"))
    restarted = event(E.JOB_EVENT_TYPE_RESTARTED, step=10)  # reason and message left to the service
    assert await manager.apply_worker_update(update(U.WORKER_UPDATE_KIND_RUNNING, "b1", restarted,
                                                    attempt=2, worker="w2"))
    # The first delivery's worker still reports, and another worker claims the current attempt: refused.
    saved = event(E.JOB_EVENT_TYPE_CHECKPOINT_SAVED)
    assert not await manager.apply_worker_update(update(U.WORKER_UPDATE_KIND_PROGRESS, "a2", saved,
                                                        phase=P.JOB_PHASE_UPLOADING))
    assert not await manager.apply_worker_update(update(U.WORKER_UPDATE_KIND_PROGRESS, "c1", saved,
                                                        attempt=2, worker="w3"))
    events = await events_of(story)
    assert types(events) == ["QUEUED", "WORKER_ASSIGNED", "WORKER_ASSIGNED", "RESTARTED"]
    assert [(e.attempt, e.worker_id) for e in events[1:]] == [(1, "w1"), (2, "w2"), (2, "w2")]
    assert (events[3].reason, events[3].step) == ("WORKER_LOST", 10) and events[3].message
    assert await phase(manager) == P.JOB_PHASE_TRAINING


async def test_a_requeued_job_restarts_with_the_requeue_note(manager: JobManager, story: JobTimeline) -> None:
    insert_job(manager)
    assert await manager.apply_worker_update(update(U.WORKER_UPDATE_KIND_RUNNING, "a1"))
    # The worker shuts down: the job goes back to the queue (no event of its own), its phase cleared.
    assert await manager.record_heartbeat(events_pb2.WorkerHeartbeat(
        worker_id="w1", state=job_pb2.WORKER_STATE_STOPPED, interval_seconds=5))
    job = await manager.get(ORG, "job_1")
    assert (job.state, job.phase) == (S.JOB_STATE_QUEUED, P.JOB_PHASE_UNSPECIFIED)
    assert types(await events_of(story)) == ["QUEUED", "WORKER_ASSIGNED"]
    restarted = event(E.JOB_EVENT_TYPE_RESTARTED)
    assert await manager.apply_worker_update(update(U.WORKER_UPDATE_KIND_PREPARING, "b1", restarted,
                                                    attempt=2, worker="w2"))
    events = await events_of(story)
    assert types(events) == ["QUEUED", "WORKER_ASSIGNED", "WORKER_ASSIGNED", "RESTARTED"]
    assert events[3].reason == "WORKER_LOST"
    assert "w1" in events[3].message and "shut down" in events[3].message


def hand_back(event_id: str, *events: job_pb2.JobEvent, attempt: int = 1,
              worker: str = "w1") -> events_pb2.WorkerJobUpdate:
    """A drained worker's last update of its delivery, as trainer_worker sends it (JobRun._hand_back)."""
    last = update(U.WORKER_UPDATE_KIND_PROGRESS, event_id, *events, attempt=attempt, worker=worker,
                  phase=P.JOB_PHASE_TRAINING)
    last.progress.step = 12
    last.error.CopyFrom(hand_back_status(worker, "The worker shut down"))
    return last


def resumed(step: int, attempt: int, worker: str) -> job_pb2.JobEvent:
    """The RESTARTED event a worker sends (trainer_worker.story.AttemptStory.restarted): no reason."""
    return event(E.JOB_EVENT_TYPE_RESTARTED, step=step, worker_id=worker, attempt=attempt,
                 message=f"Attempt {attempt} started on worker {worker}, resuming from the checkpoint of "
                         f"step {step}.")


async def test_a_drained_workers_hand_back_restarts_the_job_as_drained_not_lost(
    manager: JobManager, story: JobTimeline
) -> None:
    """A worker drained by SIGTERM hands its job back (a PROGRESS carrying an error) and then says STOPPED;
    the next delivery's RESTARTED names it as drained, with no reason. A worker that then dies (no
    hand-back) still makes the next restart WORKER_LOST."""
    insert_job(manager)
    apply = manager.apply_worker_update
    assert await apply(update(U.WORKER_UPDATE_KIND_RUNNING, "a1"))
    assert await apply(hand_back("a2", event(E.JOB_EVENT_TYPE_CHECKPOINT_SAVED, step=10)))
    job = await manager.get(ORG, "job_1")
    assert (job.state, job.progress.step, job.phase) == (S.JOB_STATE_RUNNING, 12, P.JOB_PHASE_TRAINING)
    # Its DRAINING heartbeats, and then its last one: the job goes back to the queue, said as a hand-back.
    draining = events_pb2.WorkerHeartbeat(worker_id="w1", state=job_pb2.WORKER_STATE_DRAINING, job_id="job_1",
                                          attempt=1, interval_seconds=5)
    await manager.record_heartbeat(draining)
    assert await manager.record_heartbeat(events_pb2.WorkerHeartbeat(
        worker_id="w1", state=job_pb2.WORKER_STATE_STOPPED, interval_seconds=5))
    job = await manager.get(ORG, "job_1")
    assert job.state == S.JOB_STATE_QUEUED
    assert job.status_message.startswith("worker w1 was drained and handed the job back at ")
    # A DRAINING heartbeat that comes late does not take the handed-back job back to its worker.
    assert not await manager.record_heartbeat(draining)
    assert (await manager.get(ORG, "job_1")).state == S.JOB_STATE_QUEUED

    assert await apply(update(U.WORKER_UPDATE_KIND_PREPARING, "b1", attempt=2, worker="w2"))
    assert await apply(update(U.WORKER_UPDATE_KIND_PROGRESS, "b2", resumed(10, 2, "w2"), attempt=2,
                              worker="w2"))
    restarted = (await events_of(story))[-1]
    assert types([restarted]) == ["RESTARTED"]
    assert (restarted.reason, restarted.worker_id, restarted.step, restarted.attempt) == ("", "w2", 10, 2)
    assert restarted.message == ("Attempt 2 started on worker w2, resuming from the checkpoint of step 10. "
                                 "Attempt 1 ended because worker w1 was drained and handed the job back.")

    # w2 dies (its process comes back as a new one): no hand-back, so attempt 3 restarts WORKER_LOST.
    for started in (1, 2):
        beat = events_pb2.WorkerHeartbeat(worker_id="w2", state=job_pb2.WORKER_STATE_IDLE, interval_seconds=5)
        beat.started_at.FromSeconds(started)
        await manager.record_heartbeat(beat)
    assert (await manager.get(ORG, "job_1")).state == S.JOB_STATE_QUEUED
    assert await apply(update(U.WORKER_UPDATE_KIND_PREPARING, "c1", attempt=3, worker="w3"))
    assert await apply(update(U.WORKER_UPDATE_KIND_PROGRESS, "c2", resumed(10, 3, "w3"), attempt=3,
                              worker="w3"))
    lost = (await events_of(story))[-1]
    assert (types([lost]), lost.reason, lost.worker_id) == (["RESTARTED"], "WORKER_LOST", "w3")
    assert "drained" not in lost.message


async def test_a_hand_back_counts_even_when_the_next_delivery_starts_first(
    manager: JobManager, story: JobTimeline
) -> None:
    """The work queue hands the job on at once (NAK): the next worker may start before the drained one's
    STOPPED heartbeat arrives, or without it ever arriving."""
    insert_job(manager)
    apply = manager.apply_worker_update
    assert await apply(update(U.WORKER_UPDATE_KIND_RUNNING, "a1"))
    assert await apply(hand_back("a2"))
    assert await apply(update(U.WORKER_UPDATE_KIND_PREPARING, "b1", attempt=2, worker="w2"))
    assert await apply(update(U.WORKER_UPDATE_KIND_RUNNING, "b2", resumed(0, 2, "w2"), attempt=2,
                              worker="w2"))
    restarted = (await events_of(story))[-1]
    assert (types([restarted]), restarted.reason) == (["RESTARTED"], "")
    assert "worker w1 was drained and handed the job back" in restarted.message
    job = await manager.get(ORG, "job_1")
    assert (job.state, job.worker_id, job.attempt) == (S.JOB_STATE_RUNNING, "w2", 2)
    # The drained worker's STOPPED now changes nothing: the job is w2's.
    assert not await manager.record_heartbeat(events_pb2.WorkerHeartbeat(
        worker_id="w1", state=job_pb2.WORKER_STATE_STOPPED, interval_seconds=5))


async def test_events_or_a_phase_alone_are_a_change(manager: JobManager) -> None:
    insert_job(manager)
    assert await manager.apply_worker_update(update(U.WORKER_UPDATE_KIND_RUNNING, "u1"))
    before = await manager.get(ORG, "job_1")
    # A repeated RUNNING moves nothing, but its phase and events are news for watchers.
    assert await manager.apply_worker_update(update(U.WORKER_UPDATE_KIND_RUNNING, "u2",
                                                    event(E.JOB_EVENT_TYPE_EVALUATION_STARTED),
                                                    phase=P.JOB_PHASE_EVALUATING))
    after = await manager.get(ORG, "job_1")
    assert after.revision == before.revision + 1 and after.phase == P.JOB_PHASE_EVALUATING
    assert not await manager.apply_worker_update(update(U.WORKER_UPDATE_KIND_RUNNING, "u3",
                                                        phase=P.JOB_PHASE_EVALUATING))


async def test_cancel_and_failure_are_on_the_timeline(manager: JobManager, story: JobTimeline) -> None:
    insert_job(manager)
    await manager.apply_worker_update(update(U.WORKER_UPDATE_KIND_RUNNING, "u1"))
    await manager.cancel(ORG, "job_1")
    assert (await manager.get(ORG, "job_1")).phase == P.JOB_PHASE_TRAINING  # still stopping
    await manager.apply_worker_update(update(U.WORKER_UPDATE_KIND_CANCELLED, "u2"))
    assert types(await events_of(story))[-2:] == ["CANCEL_REQUESTED", "CANCELLED"]

    insert_job(manager, "job_2")
    await manager.cancel(ORG, "job_2")
    assert types(await events_of(story, "job_2")) == ["QUEUED", "CANCELLED"]

    insert_job(manager, "job_3")
    await manager.apply_worker_update(update(U.WORKER_UPDATE_KIND_RUNNING, "v1", job_id="job_3"))
    failed = update(U.WORKER_UPDATE_KIND_FAILED, "v2", job_id="job_3")
    failed.error.CopyFrom(error_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "CUDA out of memory at step 3.",
                                       Reason.OUT_OF_MEMORY))
    await manager.apply_worker_update(failed)
    last = (await events_of(story, "job_3"))[-1]
    assert (types([last]), last.reason, last.message) == (["FAILED"], "OUT_OF_MEMORY",
                                                          "CUDA out of memory at step 3.")

    insert_job(manager, "job_4")
    await manager.apply_worker_update(update(U.WORKER_UPDATE_KIND_RUNNING, "w1", job_id="job_4"))
    assert await manager.fail_lost("job_4", 5)
    last = (await events_of(story, "job_4"))[-1]
    assert (types([last]), last.reason) == (["FAILED"], "WORKER_LOST")


async def test_evaluation_pending_and_skipped(manager: JobManager, story: JobTimeline) -> None:
    insert_job(manager)
    report = (await story.evaluation(ORG, "job_1"))[1]
    assert report.status == ES.EVALUATION_STATUS_PENDING and "QUEUED" in report.message
    await manager.cancel(ORG, "job_1")
    report = (await story.evaluation(ORG, "job_1"))[1]
    assert report.status == ES.EVALUATION_STATUS_SKIPPED and "CANCELLED" in report.message

    off = job_pb2.JobSpec(base_model="org/m", dataset="ds_1",
                          evaluation=job_pb2.EvaluationConfig(enabled=False))
    insert_job(manager, "job_2", spec=off)
    await manager.apply_worker_update(update(U.WORKER_UPDATE_KIND_RUNNING, "u1", job_id="job_2"))
    done = update(U.WORKER_UPDATE_KIND_SUCCEEDED, "u2", job_id="job_2")
    done.output.adapter_uri = manager.store.uri("jobs/acme/job_2/adapter")
    assert await manager.apply_worker_update(done)  # no report sent
    report = (await story.evaluation(ORG, "job_2"))[1]
    assert report.status == ES.EVALUATION_STATUS_SKIPPED and "enabled" in report.message
    with pytest.raises(NotFound):
        await story.evaluation("bravo", "job_2")


async def test_list_job_events_pages(manager: JobManager, story: JobTimeline) -> None:
    insert_job(manager)
    await manager.apply_worker_update(update(U.WORKER_UPDATE_KIND_RUNNING, "u1",
                                             *[event(E.JOB_EVENT_TYPE_CHECKPOINT_SAVED, step=s)
                                               for s in range(1, 6)]))
    seen: list[int] = []
    token = ""
    while True:
        page, token = await story.list_events(ORG, "job_1", 3, token)
        seen += [e.sequence for e in page]
        if not token:
            break
    assert seen == list(range(1, 8))
    page, _ = await story.list_events(ORG, "job_1", 0, "", after_sequence=5)
    assert [e.sequence for e in page] == [6, 7]
    _, token = await story.list_events(ORG, "job_1", 2, "")
    with pytest.raises(InvalidArgument) as bad:
        await story.list_events(ORG, "job_1", 2, token, after_sequence=1)  # another query's token
    assert bad.value.reason == Reason.INVALID_PAGE_TOKEN
    with pytest.raises(InvalidArgument):
        await story.list_events(ORG, "job_1", 2, "garbage")
    with pytest.raises(InvalidArgument):
        await story.list_events(ORG, "job_1", 2, "", after_sequence=-1)
    with pytest.raises(NotFound):
        await story.list_events("bravo", "job_1", 2, "")


async def test_watch_carries_the_events_since_the_previous_response(manager: JobManager,
                                                                  story: JobTimeline) -> None:
    insert_job(manager)
    await manager.apply_worker_update(update(U.WORKER_UPDATE_KIND_PREPARING, "u1",
                                             event(E.JOB_EVENT_TYPE_MODEL_DOWNLOADED)))
    responses: list[job_service_pb2.WatchJobResponse] = []

    async def follow() -> None:
        async for response in story.watch(ORG, manager.watch(ORG, "job_1", poll_interval_s=0.02)):
            responses.append(response)

    watching = asyncio.create_task(follow())
    await asyncio.sleep(0.1)
    await manager.apply_worker_update(update(U.WORKER_UPDATE_KIND_RUNNING, "u2",
                                             event(E.JOB_EVENT_TYPE_TRAINING_STARTED)))
    await asyncio.sleep(0.1)
    await manager.apply_worker_update(succeeded(manager, "u3", event(E.JOB_EVENT_TYPE_UPLOADING)))
    await asyncio.wait_for(watching, 5)
    assert types(list(responses[0].events)) == ["QUEUED", "WORKER_ASSIGNED", "MODEL_DOWNLOADED"]
    assert responses[-1].job.state == S.JOB_STATE_SUCCEEDED
    sent = [e for r in responses for e in r.events]
    assert [e.sequence for e in sent] == list(range(1, 7))  # each event once, in order
    assert types(sent)[3:] == ["TRAINING_STARTED", "UPLOADING", "SUCCEEDED"]
    revisions = [r.job.revision for r in responses]
    assert revisions == sorted(set(revisions))


async def test_delete_job_takes_its_timeline(manager: JobManager, story: JobTimeline) -> None:
    insert_job(manager)
    insert_job(manager, "job_2")
    await manager.cancel(ORG, "job_1")
    deletions = JobDeletions(manager.db, manager.relay, manager.store, publish_wait_s=0)
    await deletions.delete(ORG, "job_1")
    with manager.db.session() as s:
        left = dict(s.execute(select(JobEventRow.job_id, func.count()).group_by(JobEventRow.job_id)).all())
    assert left == {"job_2": 1}


@pytest.mark.postgres
async def test_the_timeline_on_postgres(postgres_url: str) -> None:
    db = Database(postgres_url, "jobs")
    db.migrate(MIGRATIONS)
    manager = JobManager(db, OutboxRelay(db, js=None, model=JobOutbox),  # type: ignore[arg-type]
                         datasets=None, store=None, nc=None)  # type: ignore[arg-type]
    story = JobTimeline(db)
    try:
        insert_job(manager, "job_pg_timeline")
        running = update(U.WORKER_UPDATE_KIND_RUNNING, "pg-u1", event(E.JOB_EVENT_TYPE_TRAINING_STARTED),
                         job_id="job_pg_timeline")
        assert await manager.apply_worker_update(running)
        assert not await manager.apply_worker_update(running)
        await manager.cancel(ORG, "job_pg_timeline")
        events = await events_of(story, "job_pg_timeline")
        assert types(events) == ["QUEUED", "WORKER_ASSIGNED", "TRAINING_STARTED", "CANCEL_REQUESTED"]
        assert [e.sequence for e in events] == [1, 2, 3, 4]
    finally:
        db.dispose()

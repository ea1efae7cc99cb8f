"""Draining a worker, against a real nats-server with real training: the first SIGTERM stops the pulling
and says DRAINING at once; an idle worker exits, a busy one lets its job finish (TUNEFORGE_WORKER_DRAIN_
TIMEOUT_S) and takes no other, or hands it back when its drain time runs out, at a second SIGTERM, or at
once with no drain time, and another worker resumes it from its last checkpoint. The job's log says which."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import AsyncIterator

import pytest
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import job_pb2

from services.jobs.component import JobsComponent
from services.jobs.models import JobRow
from services.jobs.timeline import JobTimeline
from tests.jobs.served import served_jobs
from tests.worker.test_agent import FAST_HYPERPARAMETERS, Heartbeats, Platform, platform  # noqa: F401
from trainer_worker.agent import Agent, AgentSettings
from trainer_worker.checkpointing import CheckpointStore
from tuneforge_core import subjects
from tuneforge_core.settings import KitSettings

U = events_pb2.WorkerUpdateKind
W = job_pb2.WorkerState
E = job_pb2.JobEventType


@pytest.fixture
async def jobs_service(kit_settings: KitSettings, platform: Platform) -> AsyncIterator[JobsComponent]:  # noqa: F811
    """The real jobs component on the platform's nats-server and object store: it reads the workers'
    updates and heartbeats and keeps the jobs' timelines."""
    assert kit_settings.storage_url == platform.store.root.resolve().as_uri()
    async with served_jobs(kit_settings, "jobs-drain-test") as (jobs, _address):
        yield jobs


def _insert_job(jobs: JobsComponent, job_id: str) -> None:
    """The job's row as CreateJob leaves it (its assignment is what `Platform.assign` publishes)."""
    spec = job_pb2.JobSpec(base_model="acme/m", dataset="ds_1")
    with jobs.manager.db.session() as s:
        s.add(JobRow(id=job_id, organization="acme", name=job_id, spec=spec.SerializeToString(),
                     state=job_pb2.JOB_STATE_QUEUED, revision=1, request_hash=""))


def _messages(tf: Platform, job_id: str) -> list[str]:
    """The job's log lines the agents reported (LogsReported)."""
    return [e.message for e in tf.events.entries if e.job_id == job_id]


async def _exit_code(agent: subprocess.Popen[bytes], within_s: float = 30) -> int:
    return await asyncio.to_thread(agent.wait, within_s)


async def test_an_idle_worker_says_draining_at_once_and_stops(platform: Platform) -> None:  # noqa: F811
    """No waiting for the next interval: the jobs service stops counting on it the moment it is asked."""
    heartbeats = await platform.heartbeats()
    settings = AgentSettings(nats_url=platform.nats_url, data_dir=platform.tmp_path / "w",
                             storage_url=platform.store.root.as_uri(), worker_id="w-idle",
                             worker_heartbeat_interval_s=60, worker_drain_timeout_s=600)
    agent = Agent(settings, platform.js, platform.store, platform.nc)
    running = asyncio.create_task(agent.run())
    await heartbeats.wait_for("w-idle", W.WORKER_STATE_IDLE)
    agent.request_stop()
    stopped_at = time.monotonic()
    await asyncio.wait_for(running, 10)
    assert time.monotonic() - stopped_at < 5, "an idle worker waits for no drain"
    await heartbeats.wait_for("w-idle", W.WORKER_STATE_STOPPED)
    received = heartbeats.received
    assert [h.state for h in received] == [W.WORKER_STATE_IDLE, W.WORKER_STATE_DRAINING,
                                           W.WORKER_STATE_STOPPED]
    assert all(h.pool == "default" for h in received)


async def _start_running(tf: Platform, heartbeats: Heartbeats, name: str, job_id: str,
                         drain_timeout_s: float) -> subprocess.Popen[bytes]:
    """An agent with that drain time, once it trains `job_id`."""
    agent = tf.start_agent(name, {"TUNEFORGE_WORKER_DRAIN_TIMEOUT_S": str(drain_timeout_s)})
    deadline = time.monotonic() + 120
    while not any(u.job_id == job_id and u.worker_id == name and u.kind == U.WORKER_UPDATE_KIND_RUNNING
                  for u in tf.events.updates):
        assert time.monotonic() < deadline, tf.logs()
        await asyncio.sleep(0.05)
    await heartbeats.wait_for(name, W.WORKER_STATE_BUSY)
    return agent


@pytest.mark.slow
async def test_a_draining_worker_finishes_its_job_and_takes_no_other(platform: Platform) -> None:  # noqa: F811
    heartbeats = await platform.heartbeats()
    await platform.assign("job_first", {**FAST_HYPERPARAMETERS, "max_steps": 100})
    await platform.assign("job_next", {**FAST_HYPERPARAMETERS, "max_steps": 5})
    agent = await _start_running(platform, heartbeats, "w1", "job_first", drain_timeout_s=600)

    agent.send_signal(signal.SIGTERM)
    draining = await heartbeats.wait_for("w1", W.WORKER_STATE_DRAINING)
    assert (draining.job_id, draining.attempt) == ("job_first", 1), "still running its job"
    await platform.events.wait_for("job_first", "SUCCEEDED", within_s=300)
    assert await _exit_code(agent) == 0, platform.logs()
    await heartbeats.wait_for("w1", W.WORKER_STATE_STOPPED)

    kinds = platform.events.kinds("job_first")
    assert kinds[-1] == "SUCCEEDED" and {u.attempt for u in platform.events.updates} == {1}, kinds
    assert any(m.startswith("The worker is draining: it takes no new job and lets this one run for up to "
                            "600s more") for m in _messages(platform, "job_first"))
    assert platform.events.kinds("job_next") == [], "never pulled"
    consumer = await platform.js.consumer_info(subjects.STREAM_WORK, subjects.trainers_consumer(""))
    assert (consumer.num_pending, consumer.num_ack_pending, consumer.num_redelivered) == (1, 0, 0)
    assert await platform.pending_work(within_s=0) == 1, "job_next stays in the queue"


@pytest.mark.slow
async def test_with_no_drain_time_the_job_goes_back_and_another_worker_resumes_it(
    platform: Platform, jobs_service: JobsComponent,  # noqa: F811
) -> None:
    """...and the job's timeline says the restart followed a drain, not a lost worker (it said
    WORKER_LOST, as if the worker had died): the drained worker's last update is its hand-back."""
    heartbeats = await platform.heartbeats()
    hp = {**FAST_HYPERPARAMETERS, "max_steps": 200, "save_steps": 10, "save_total_limit": 2}
    _insert_job(jobs_service, "job_moved")
    await platform.assign("job_moved", hp)
    first = await _start_running(platform, heartbeats, "w1", "job_moved", drain_timeout_s=0)
    checkpoints = CheckpointStore(platform.store, "jobs/acme/job_moved")
    deadline = time.monotonic() + 120
    while not (await asyncio.to_thread(checkpoints.steps))[0]:
        assert time.monotonic() < deadline, platform.logs()
        await asyncio.sleep(0.05)

    first.send_signal(signal.SIGTERM)
    assert await _exit_code(first) == 0, platform.logs()
    draining = await heartbeats.wait_for("w1", W.WORKER_STATE_DRAINING)
    assert draining.job_id == "job_moved"
    (handed_back,) = [m for m in _messages(platform, "job_moved") if m.startswith("The worker shut down")]
    stored = (await asyncio.to_thread(checkpoints.steps))[0][-1]
    assert handed_back == f"The worker shut down; the job goes back to the queue and resumes from the " \
                         f"checkpoint of step {stored}."
    assert "FAILED" not in platform.events.kinds("job_moved")

    platform.start_agent("w2")
    await platform.events.wait_for("job_moved", "SUCCEEDED", within_s=300)
    done = platform.events.update("job_moved", U.WORKER_UPDATE_KIND_SUCCEEDED)
    assert (done.worker_id, done.attempt, done.progress.step) == ("w2", 2, 200)
    resumed = [m for m in _messages(platform, "job_moved") if m.startswith("Resuming from the checkpoint")]
    assert resumed == [f"Resuming from the checkpoint of step {stored}."]
    assert await platform.pending_work() == 0

    last = [u for u in platform.events.updates if u.job_id == "job_moved" and u.attempt == 1][-1]
    assert (last.kind, last.worker_id, last.error.message) == (
        U.WORKER_UPDATE_KIND_PROGRESS, "w1",
        "The worker shut down: worker w1 was drained and handed the job back to the queue.")
    deadline = time.monotonic() + 30
    while (job := await jobs_service.manager.get("acme", "job_moved")).state != job_pb2.JOB_STATE_SUCCEEDED:
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.1)
    events, _ = await JobTimeline(jobs_service.db).list_events("acme", "job_moved", 1000, "")
    (restarted,) = [e for e in events if e.type == E.JOB_EVENT_TYPE_RESTARTED]
    assert (restarted.reason, restarted.worker_id, restarted.attempt, restarted.step) == ("", "w2", 2, stored)
    assert restarted.message == (
        f"Attempt 2 started on worker w2, resuming from the checkpoint of step {stored}. Attempt 1 ended "
        "because worker w1 was drained and handed the job back.")


@pytest.mark.slow
async def test_the_drain_time_running_out_or_a_second_signal_hands_the_job_back(
    platform: Platform,  # noqa: F811
) -> None:
    heartbeats = await platform.heartbeats()
    await platform.assign("job_long", {**FAST_HYPERPARAMETERS, "max_steps": 100_000})

    first = await _start_running(platform, heartbeats, "w1", "job_long", drain_timeout_s=2)
    first.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert await _exit_code(first) == 0, platform.logs()
    assert 2 <= time.monotonic() - signalled < 25, "it drained for 2 s, then stopped the training"
    assert "The worker drained for 2s and the job had not finished; the job goes back to the queue and " \
           "starts again from the beginning (no checkpoint was stored)." in _messages(platform, "job_long")

    second = await _start_running(platform, heartbeats, "w2", "job_long", drain_timeout_s=600)
    second.send_signal(signal.SIGTERM)
    await heartbeats.wait_for("w2", W.WORKER_STATE_DRAINING)
    second.send_signal(signal.SIGTERM)
    assert await _exit_code(second) == 0, platform.logs()
    assert any(m.startswith("The worker was asked again to stop while draining; the job goes back")
               for m in _messages(platform, "job_long"))
    assert {u.attempt for u in platform.events.updates} == {1, 2}
    assert not {"FAILED", "SUCCEEDED", "CANCELLED"} & set(platform.events.kinds("job_long"))
    assert await platform.pending_work(within_s=0) == 1, "back in the queue for the next worker"

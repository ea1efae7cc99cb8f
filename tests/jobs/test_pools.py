"""Worker pools and priorities in the jobs service's rules, on a real SQLite database with the real
migrations (and PostgreSQL where one is reachable): CreateJob's checks of spec.hardware.pool, priority and
the declared pools (TUNEFORGE_WORKER_POOLS), what heartbeats say of a worker's pool and GPUs, draining
workers, and ListPools' counts scoped to the caller's organization. The datasets service is a stand-in
that returns READY datasets; what goes to the work queue is read from the outbox."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import job_pb2, job_service_pb2

from services.jobs.component import MIGRATIONS
from services.jobs.manager import JobManager
from services.jobs.models import JobOutbox
from services.jobs.quotas import JobQuotas
from services.jobs.scheduler import SchedulerConfig, parse_worker_pools
from services.jobs.settings import JobSettings
from services.kit.db import Database
from services.kit.outbox import OutboxRelay
from tests.jobs.test_create import Datasets
from tuneforge_core import subjects
from tuneforge_core.errors import InvalidArgument
from tuneforge_core.settings import KitSettings
from tuneforge_core.storage import LocalObjectStore

S = job_pb2.JobState
W = job_pb2.WorkerState
P = job_pb2.JobPriority


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def manager(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobManager]:
    url = (f"sqlite:///{tmp_path / 'jobs.db'}" if request.param == "sqlite"
           else request.getfixturevalue("postgres_url"))
    db = Database(url, "jobs")
    db.migrate(MIGRATIONS)
    datasets = Datasets()
    datasets.add("data", validation=False)
    relay = OutboxRelay(db, js=None, model=JobOutbox)  # type: ignore[arg-type]
    yield JobManager(db, relay, datasets, LocalObjectStore(tmp_path / "objects"), nc=None,  # type: ignore[arg-type]
                     quotas=JobQuotas(max_queued_jobs_per_org=0, max_running_jobs_per_org=0),
                     scheduler=SchedulerConfig(mode="fair"))
    db.dispose()


async def create(manager: JobManager, org: str = "acme", *, pool: str = "", gpu_type: str = "",
                 gpu_count: int = 0, priority: int = 0) -> job_pb2.Job:
    spec = job_pb2.JobSpec(base_model="org/model", dataset="data")
    spec.hardware.pool, spec.hardware.gpu_type = pool, gpu_type
    if gpu_count:
        spec.hardware.gpu_count = gpu_count
    return await manager.create(job_service_pb2.CreateJobRequest(
        organization=org, spec=spec, priority=priority))  # type: ignore[arg-type]


def work_subjects(manager: JobManager) -> dict[str, str]:
    """The subject each dispatched job's assignment went to, by job id."""
    with manager.db.session() as s:
        rows = s.execute(select(JobOutbox.subject, JobOutbox.payload).order_by(JobOutbox.id)).all()
    return {events_pb2.JobAssignment.FromString(payload).job_id: subject for subject, payload in rows
            if subject.startswith(subjects.WORK_JOBS_PREFIX)}


async def beat(manager: JobManager, worker: str, *, pool: str = "", state: int = W.WORKER_STATE_IDLE,
               gpu_type: str = "cpu", gpu_count: int = 0, memory: int = 0, name: str = "") -> None:
    await manager.record_heartbeat(events_pb2.WorkerHeartbeat(
        worker_id=worker, hostname="h", gpu_type=gpu_type, gpu_count=gpu_count, state=state,  # type: ignore[arg-type]
        pool=pool, gpu_memory_bytes=memory, gpu_name=name, interval_seconds=2.0))


async def test_pool_and_priority_are_validated_naming_the_field(manager: JobManager) -> None:
    for bad in ("Pool", "-a", "a--b", "a_b", "x" * 41):
        with pytest.raises(InvalidArgument) as info:
            await create(manager, pool=bad)
        assert [v.field for v in info.value.violations] == ["spec.hardware.pool"]
    with pytest.raises(InvalidArgument) as info:
        await create(manager, priority=7)
    assert [v.field for v in info.value.violations] == ["priority"]
    assert "7 is not a JobPriority" in info.value.violations[0].description
    # Unset is stored as NORMAL; the others as given.
    assert (await create(manager)).priority == P.JOB_PRIORITY_NORMAL
    assert (await create(manager, priority=P.JOB_PRIORITY_HIGH)).priority == P.JOB_PRIORITY_HIGH
    assert (await manager.list("acme", [], 10, ""))[0][0].priority == P.JOB_PRIORITY_HIGH


async def test_with_declared_pools_a_job_no_pool_can_run_is_refused(manager: JobManager) -> None:
    manager.scheduler = SchedulerConfig(mode="fair", pools=tuple(parse_worker_pools(
        "default:cpu,gpu-a:nvidia-h100x8,gpu-b:nvidia-t4x1")))
    cases = [({"pool": "gpu-c"}, "spec.hardware.pool", "no worker pool is named 'gpu-c'"),
             ({"gpu_type": "nvidia-a100"}, "spec.hardware.gpu_type", "no worker has nvidia-a100 GPUs"),
             ({"gpu_type": "nvidia-t4", "gpu_count": 2}, "spec.hardware.gpu_count",
              "asks for 2 nvidia-t4 GPUs, but the workers have at most 1; the largest pool available is "
              "gpu-b (nvidia-t4 x1)"),
             ({"gpu_type": "nvidia-h100", "pool": "gpu-b"}, "spec.hardware.gpu_type",
              "no worker in pool gpu-b has nvidia-h100 GPUs")]
    for kwargs, field, reason in cases:
        with pytest.raises(InvalidArgument) as info:
            await create(manager, **kwargs)  # type: ignore[arg-type]
        found = [(v.field, reason in v.description) for v in info.value.violations]
        assert found == [(field, True)], info.value
    big = await create(manager, gpu_type="nvidia-h100", gpu_count=8, pool="gpu-a")
    assert big.state == S.JOB_STATE_QUEUED
    assert (await create(manager, pool="default")).state == S.JOB_STATE_QUEUED
    # Without declared pools any valid job waits for a worker.
    manager.scheduler = SchedulerConfig(mode="fair")
    waiting = await create(manager, pool="gpu-c", gpu_type="nvidia-a100", gpu_count=8)
    assert waiting.state == S.JOB_STATE_QUEUED
    assert waiting.status_message.startswith(
        "waiting for a worker with nvidia-a100 x8 in pool gpu-c; none seen ")


def test_the_settings_validate_pools_weights_and_scheduler_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNEFORGE_WORKER_POOLS", "default:cpu,gpu-a:nvidia-h100x8")
    monkeypatch.setenv("TUNEFORGE_ORG_WEIGHTS", "acme=3")
    settings = JobSettings.from_kit(KitSettings())
    config = SchedulerConfig.from_settings(settings.scheduler, settings.org_weights, settings.worker_pools)
    assert config.fair and config.weights == {"acme": 3.0} and len(config.pools) == 2
    monkeypatch.setenv("TUNEFORGE_WORKER_POOLS", "gpu-a:h100")
    with pytest.raises(ValueError, match="TUNEFORGE_WORKER_POOLS"):
        JobSettings.from_kit(KitSettings())
    monkeypatch.delenv("TUNEFORGE_WORKER_POOLS")
    with pytest.raises(ValueError, match="TUNEFORGE_ORG_WEIGHTS"):
        JobSettings.model_validate({"org_weights": "acme=0"})
    with pytest.raises(ValueError, match="scheduler"):
        JobSettings.model_validate({"scheduler": "lottery"})
    assert JobSettings().scheduler == "fair"


async def test_a_heartbeat_records_pool_and_gpus_and_a_draining_worker_takes_nothing(
        manager: JobManager) -> None:
    await beat(manager, "w-gpu", pool="gpu-a", gpu_type="nvidia-h100", gpu_count=8, memory=80 * 2**30,
               name="NVIDIA H100 80GB HBM3", state=W.WORKER_STATE_DRAINING)
    await beat(manager, "w-cpu")  # no pool: the default one
    workers = {w.id: w for w in (await manager.list_workers("acme", 10, ""))[0]}
    assert (workers["w-gpu"].pool, workers["w-gpu"].gpu_memory_bytes, workers["w-gpu"].gpu_name) == (
        "gpu-a", 80 * 2**30, "NVIDIA H100 80GB HBM3")
    assert workers["w-gpu"].alive and workers["w-gpu"].state == W.WORKER_STATE_DRAINING
    assert (workers["w-cpu"].pool, workers["w-cpu"].gpu_memory_bytes, workers["w-cpu"].gpu_name) == (
        "default", 0, "")
    # The draining worker is alive but takes no new job: a job for its pool waits, saying why.
    job = await create(manager, pool="gpu-a", gpu_type="nvidia-h100")
    assert job.id not in work_subjects(manager)
    assert job.status_message == ("waiting for a free worker: the alive workers that would take it are all "
                                  "draining (finishing their jobs before they stop)")
    # Once it is back to IDLE (here: a new worker of the pool), the job goes on its pool's route.
    await beat(manager, "w-gpu-2", pool="gpu-a", gpu_type="nvidia-h100", gpu_count=1)
    assert work_subjects(manager)[job.id] == "tuneforge.work.jobs.pool-gpu-a.nvidia-h100"
    # A job that names no pool goes on the shared route, to the CPU worker.
    anywhere = await create(manager)
    assert work_subjects(manager)[anywhere.id] == "tuneforge.work.jobs.any"


async def test_list_pools_counts_and_shows_another_organizations_jobs_only_as_numbers(
        manager: JobManager) -> None:
    await beat(manager, "a1", pool="cpu-a")
    await beat(manager, "b1", pool="cpu-b", state=W.WORKER_STATE_DRAINING)
    ours = [await create(manager, "acme", pool="cpu-a") for _ in range(3)]  # one goes to a1, two wait
    theirs = await create(manager, "umbrella", pool="cpu-a")
    await create(manager, "umbrella", pool="cpu-b")
    await create(manager, "umbrella", pool="gpu-x", gpu_type="nvidia-t4")  # a pool no worker announces
    await create(manager, "acme")  # no pool: counted wherever a worker would take it
    assert work_subjects(manager) == {ours[0].id: "tuneforge.work.jobs.pool-cpu-a.any"}

    def counts(pool: job_pb2.WorkerPool) -> tuple[int, ...]:
        return (pool.workers_alive, pool.workers_idle, pool.workers_busy, pool.workers_draining,
                pool.queued_jobs, pool.queued_jobs_own, pool.running_jobs, pool.max_gpu_count)

    acme = {(p.name, p.gpu_type): counts(p) for p in await manager.list_pools("acme")}
    assert acme == {
        # a1 is free until it takes its job (ours[0], dispatched and not yet taken, is counted queued).
        ("cpu-a", "cpu"): (1, 1, 0, 0, 5, 4, 0, 0),
        ("cpu-b", "cpu"): (1, 0, 0, 1, 2, 1, 0, 0),
        ("gpu-x", "nvidia-t4"): (0, 0, 0, 0, 1, 0, 0, 0),
    }
    umbrella = {(p.name, p.gpu_type): (p.queued_jobs, p.queued_jobs_own)
                for p in await manager.list_pools("umbrella")}
    assert umbrella == {("cpu-a", "cpu"): (5, 1), ("cpu-b", "cpu"): (2, 1), ("gpu-x", "nvidia-t4"): (1, 1)}
    answer = b"".join(p.SerializeToString() for p in await manager.list_pools("umbrella"))
    assert ours[0].id.encode() not in answer and b"acme" not in answer and theirs.id.encode() not in answer
    with pytest.raises(InvalidArgument):
        await manager.list_pools("")


async def test_a_worker_whose_job_ended_takes_the_next_before_its_next_heartbeat(manager: JobManager) -> None:
    await beat(manager, "w1")
    first, second = await create(manager), await create(manager)
    assert list(work_subjects(manager)) == [first.id]

    async def update(kind: events_pb2.WorkerUpdateKind.ValueType) -> None:
        done = events_pb2.WorkerJobUpdate(event_id=f"{first.id}-{kind}", job_id=first.id, worker_id="w1",
                                          attempt=1, kind=kind)
        if kind == events_pb2.WORKER_UPDATE_KIND_SUCCEEDED:
            done.output.adapter_uri = manager.store.uri(f"jobs/acme/{first.id}/adapter")
        assert await manager.apply_worker_update(done)

    await update(events_pb2.WORKER_UPDATE_KIND_PREPARING)
    await manager.record_heartbeat(events_pb2.WorkerHeartbeat(
        worker_id="w1", gpu_type="cpu", state=W.WORKER_STATE_BUSY, job_id=first.id, attempt=1))
    assert list(work_subjects(manager)) == [first.id]  # busy: the second waits
    await update(events_pb2.WORKER_UPDATE_KIND_SUCCEEDED)  # its heartbeat still says BUSY with the first
    assert list(work_subjects(manager)) == [first.id, second.id]


async def test_cancelling_a_job_not_yet_taken_lets_the_next_take_its_worker(manager: JobManager) -> None:
    await beat(manager, "w1")
    first, second = await create(manager), await create(manager)
    assert list(work_subjects(manager)) == [first.id]
    assert second.status_message == (
        "waiting for a free worker: the worker that would take it is busy; 1 job ahead of it")
    await manager.cancel("acme", first.id)
    assert list(work_subjects(manager)) == [first.id, second.id]
    assert (await manager.get("acme", second.id)).status_message == ""


async def test_one_worker_goes_round_the_organizations(manager: JobManager) -> None:
    """A single worker: each time it frees, no organization runs anything (a tie); the one whose last
    dispatch is longest ago goes, so organization B's one job does not wait behind A's older ones."""
    await beat(manager, "w1")
    a = [await create(manager, "org-a") for _ in range(3)]
    b = await create(manager, "org-b")
    for attempt, job in enumerate([a[0], b, a[1]], start=1):
        assert list(work_subjects(manager))[-1] == job.id
        for kind in (events_pb2.WORKER_UPDATE_KIND_PREPARING, events_pb2.WORKER_UPDATE_KIND_SUCCEEDED):
            update = events_pb2.WorkerJobUpdate(event_id=f"{job.id}-{kind}", job_id=job.id, worker_id="w1",
                                                attempt=1, kind=kind)
            update.output.adapter_uri = manager.store.uri(f"jobs/{job.organization}/{job.id}/adapter")
            assert await manager.apply_worker_update(update), attempt
    assert list(work_subjects(manager)) == [a[0].id, b.id, a[1].id, a[2].id]

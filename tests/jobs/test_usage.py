"""Job.usage and GetUsage against a real SQLite database with the real migrations (and PostgreSQL where one
is reachable): an attempt is priced by the hardware its worker's heartbeat names (a CPU worker at the CPU
rate, a GPU worker at the catalog's price times its GPUs), attempts lost to a dead worker add up, and
GetUsage buckets an organization's jobs into aligned UTC periods."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import select
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import estimation_pb2, job_pb2, job_service_pb2

from services.estimation.catalog import Catalog
from services.jobs import usage
from services.jobs.component import MIGRATIONS
from services.jobs.deletion import JobDeletions
from services.jobs.manager import JobManager
from services.jobs.models import JobOutbox, JobRow
from services.jobs.usage import PriceBook, get_usage
from services.jobs.workers import WorkerRules
from services.kit.db import Database
from services.kit.outbox import OutboxRelay
from tuneforge_core.errors import InvalidArgument
from tuneforge_core.settings import KitSettings
from tuneforge_core.storage import LocalObjectStore

S = job_pb2.JobState
U = events_pb2.WorkerUpdateKind
W = job_pb2.WorkerState
P = job_service_pb2.UsagePeriodUnit
T0 = datetime(2026, 12, 1, 10, 0, 0, tzinfo=UTC)  # a Tuesday
RULES = WorkerRules(ack_wait_s=10.0, max_deliver=3, seen_window_s=300.0)
CATALOG = Catalog.load()
H100 = CATALOG.hardware("nvidia-h100").hourly_usd  # type: ignore[union-attr]
L4 = CATALOG.hardware("nvidia-l4").hourly_usd  # type: ignore[union-attr]
CPU_RATE = 0.25


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(usage, "utcnow", clock)
    return clock


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def manager(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobManager]:
    url = (f"sqlite:///{tmp_path / 'jobs.db'}" if request.param == "sqlite"
           else request.getfixturevalue("postgres_url"))
    db = Database(url, "jobs")
    db.migrate(MIGRATIONS)
    relay = OutboxRelay(db, js=None, model=JobOutbox)  # type: ignore[arg-type]
    manager = JobManager(db, relay, datasets=None, store=None, nc=None, workers=RULES)  # type: ignore[arg-type]
    manager.listening_since = T0 - timedelta(hours=1)
    manager.prices = PriceBook(cpu_hourly_usd=CPU_RATE)
    manager.prices.update({h.gpu_type: h.hourly_usd for h in CATALOG.hardware_options()})
    yield manager
    db.dispose()


def insert_job(manager: JobManager, job_id: str = "job_1", gpu_type: str = "", gpu_count: int = 0,
               organization: str = "acme", **columns: object) -> None:
    spec = job_pb2.JobSpec(base_model="org/m", dataset="ds_1")
    spec.hardware.gpu_type, spec.hardware.gpu_count = gpu_type, gpu_count
    with manager.db.session() as s:
        s.add(JobRow(id=job_id, organization=organization, name=job_id, spec=spec.SerializeToString(),
                     state=columns.pop("state", S.JOB_STATE_QUEUED), revision=1, request_hash="", **columns))


def ts(value: datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(value)
    return out


async def beat(manager: JobManager, worker: str, *, gpu_type: str = "cpu", gpu_count: int = 0,
               job: str = "", attempt: int = 0, at: datetime = T0) -> None:
    await manager.record_heartbeat(events_pb2.WorkerHeartbeat(
        worker_id=worker, hostname="h", gpu_type=gpu_type, gpu_count=gpu_count,
        state=W.WORKER_STATE_BUSY if job else W.WORKER_STATE_IDLE, job_id=job, attempt=attempt,
        started_at=ts(T0 - timedelta(hours=2)), time=ts(at), interval_seconds=1.0), now=at)


async def update(manager: JobManager, worker: str, kind: int, *, attempt: int = 1, job_id: str = "job_1",
                 tokens: int = 0, n: int = 0) -> None:
    await manager.apply_worker_update(events_pb2.WorkerJobUpdate(
        event_id=f"{job_id}-{attempt}-{kind}-{n}", job_id=job_id, worker_id=worker, attempt=attempt,
        kind=events_pb2.WorkerUpdateKind.ValueType(kind), tokens_trained=tokens))


async def run_on(manager: JobManager, worker: str, attempt: int = 1, job_id: str = "job_1") -> None:
    for kind in (U.WORKER_UPDATE_KIND_PREPARING, U.WORKER_UPDATE_KIND_RUNNING):
        await update(manager, worker, kind, attempt=attempt, job_id=job_id)


async def test_a_cpu_worker_is_priced_at_the_cpu_rate_not_a_gpus(manager: JobManager, clock: Clock) -> None:
    insert_job(manager, gpu_type="")  # names no GPU type: any worker
    await beat(manager, "cpu-1")
    await run_on(manager, "cpu-1")
    clock.now = T0 + timedelta(minutes=30)
    live = (await manager.get("acme", "job_1")).usage
    assert (live.hardware, live.gpu_count, live.hourly_usd) == ("cpu", 0, CPU_RATE)
    assert live.run_time.ToTimedelta() == timedelta(minutes=30), "the running attempt counts up to now"
    assert live.cost_usd == pytest.approx(CPU_RATE / 2) and live.gpu_hours == 0

    await update(manager, "cpu-1", U.WORKER_UPDATE_KIND_PROGRESS, tokens=400)
    clock.now = T0 + timedelta(hours=1)
    await update(manager, "cpu-1", U.WORKER_UPDATE_KIND_SUCCEEDED, tokens=1000)
    clock.now = T0 + timedelta(hours=5)  # long after: an ended job's usage does not grow
    done = (await manager.get("acme", "job_1")).usage
    assert done.run_time.ToTimedelta() == timedelta(hours=1)
    assert done.cost_usd == pytest.approx(CPU_RATE) and done.tokens_trained == 1000
    assert not done.HasField("estimated_duration") and done.estimated_cost_usd == 0


async def test_a_gpu_worker_is_priced_at_the_catalog_price_of_the_gpus_the_job_asked_for(
    manager: JobManager, clock: Clock
) -> None:
    insert_job(manager, gpu_type="nvidia-h100", gpu_count=2)
    await beat(manager, "gpu-8", gpu_type="nvidia-h100", gpu_count=8)
    await run_on(manager, "gpu-8")
    clock.now = T0 + timedelta(minutes=90)
    await update(manager, "gpu-8", U.WORKER_UPDATE_KIND_FAILED)
    job = await manager.get("acme", "job_1")
    assert job.state == S.JOB_STATE_FAILED
    u = job.usage
    assert (u.hardware, u.gpu_count) == ("nvidia-h100", 2) and u.hourly_usd == pytest.approx(2 * H100)
    assert u.cost_usd == pytest.approx(1.5 * 2 * H100) and u.gpu_hours == pytest.approx(3.0)


async def test_a_worker_not_heard_yet_is_filled_in_by_its_next_heartbeat(
    manager: JobManager, clock: Clock
) -> None:
    insert_job(manager)
    await run_on(manager, "new-worker")
    assert (await manager.get("acme", "job_1")).usage.hardware == ""
    await beat(manager, "new-worker", gpu_type="nvidia-l4", gpu_count=1, job="job_1", attempt=1)
    clock.now = T0 + timedelta(hours=2)
    u = (await manager.get("acme", "job_1")).usage
    assert (u.hardware, u.gpu_count) == ("nvidia-l4", 1)
    assert u.cost_usd == pytest.approx(2 * L4), "the whole attempt is priced, not only after the heartbeat"


async def test_a_requeued_job_adds_up_its_attempts(manager: JobManager, clock: Clock) -> None:
    insert_job(manager)
    await beat(manager, "cpu-1", job="job_1", attempt=1)
    await run_on(manager, "cpu-1")
    await update(manager, "cpu-1", U.WORKER_UPDATE_KIND_PROGRESS, tokens=300)
    clock.now = T0 + timedelta(minutes=10)
    assert await manager.check_workers(now=T0 + timedelta(minutes=10)) == 1  # cpu-1 went quiet
    queued = await manager.get("acme", "job_1")
    assert queued.state == S.JOB_STATE_QUEUED
    assert queued.usage.run_time.ToTimedelta() == timedelta(minutes=10)
    clock.now = T0 + timedelta(minutes=40)  # waiting in the queue costs nothing
    assert (await manager.get("acme", "job_1")).usage.run_time.ToTimedelta() == timedelta(minutes=10)

    at = T0 + timedelta(minutes=40)
    await beat(manager, "gpu-1", gpu_type="nvidia-l4", gpu_count=1, at=at)
    await run_on(manager, "gpu-1", attempt=2)
    await update(manager, "gpu-1", U.WORKER_UPDATE_KIND_PROGRESS, attempt=2, tokens=200)
    clock.now = T0 + timedelta(minutes=70)
    await update(manager, "gpu-1", U.WORKER_UPDATE_KIND_SUCCEEDED, attempt=2, tokens=900)
    u = (await manager.get("acme", "job_1")).usage
    assert u.run_time.ToTimedelta() == timedelta(minutes=40)
    assert u.cost_usd == pytest.approx(CPU_RATE / 6 + L4 / 2)
    assert (u.hardware, u.gpu_count) == ("nvidia-l4", 1), "the last attempt's"
    assert u.hourly_usd == pytest.approx(L4)
    assert u.tokens_trained == 900


async def test_a_newer_delivery_before_the_lost_one_was_noticed_closes_the_older_attempt(
    manager: JobManager, clock: Clock
) -> None:
    insert_job(manager)
    await beat(manager, "cpu-1")
    await run_on(manager, "cpu-1")
    clock.now = T0 + timedelta(minutes=20)
    await run_on(manager, "cpu-2", attempt=2)
    clock.now = T0 + timedelta(minutes=30)
    await update(manager, "cpu-2", U.WORKER_UPDATE_KIND_CANCELLED, attempt=2)
    u = (await manager.get("acme", "job_1")).usage
    assert u.run_time.ToTimedelta() == timedelta(minutes=30)


async def test_create_keeps_the_admission_estimate(tmp_path: Path) -> None:
    from tests.jobs.test_create import Datasets
    from tuneforge_core.storage import LocalObjectStore

    class Fits:
        async def check(self, org: str, spec: job_pb2.JobSpec, dataset: object) -> estimation_pb2.HardwareFit:
            fit = estimation_pb2.HardwareFit(gpu_type="nvidia-h100", gpu_count=1, fits=True)
            fit.cost.total_usd, fit.time.total_seconds = 12.5, 5400.0
            return fit

    db = Database(f"sqlite:///{tmp_path / 'jobs.db'}", "jobs")
    db.migrate(MIGRATIONS)
    datasets = Datasets()
    datasets.add("d", validation=True)
    relay = OutboxRelay(db, js=None, model=JobOutbox)  # type: ignore[arg-type]
    manager = JobManager(db, relay, datasets, LocalObjectStore(tmp_path / "o"), nc=None,  # type: ignore[arg-type]
                         hardware=Fits())  # type: ignore[arg-type]
    spec = job_pb2.JobSpec(base_model="org/m", dataset="d")
    spec.hardware.gpu_type = "nvidia-h100"
    job = await manager.create(job_service_pb2.CreateJobRequest(organization="acme", spec=spec,
                                                                validate_only=True))
    assert job.usage.estimated_cost_usd == 12.5
    assert job.usage.estimated_duration.ToTimedelta() == timedelta(seconds=5400)
    db.dispose()


def request(start: datetime | None = None, end: datetime | None = None, unit: int = P.USAGE_PERIOD_UNIT_DAY,
            organization: str = "acme") -> job_service_pb2.GetUsageRequest:
    out = job_service_pb2.GetUsageRequest(organization=organization, period=P.ValueType(unit))
    if start:
        out.start_time.CopyFrom(ts(start))
    if end:
        out.end_time.CopyFrom(ts(end))
    return out


def counts(period: job_service_pb2.UsagePeriod) -> dict[int, int]:
    return {c.state: c.count for c in period.jobs_by_state}


async def test_get_usage_buckets_jobs_by_the_period_they_ended_in(manager: JobManager, clock: Clock) -> None:
    day = timedelta(days=1)
    # Created on day 1, ended on day 2: one GPU hour at 3 USD and 500 tokens.
    insert_job(manager, "a", create_time=T0, end_time=T0 + day, state=S.JOB_STATE_SUCCEEDED,
               usage_run_seconds=3600.0, usage_cost_usd=3.0, usage_gpu_count=1, usage_tokens=500)
    insert_job(manager, "b", create_time=T0 + day, end_time=T0 + day, state=S.JOB_STATE_FAILED,
               usage_run_seconds=1800.0, usage_cost_usd=0.05, usage_tokens=10)
    # Created on day 2 and still running now (day 3), 2 hours so far on a CPU worker.
    now = T0 + 2 * day
    clock.now = now
    insert_job(manager, "c", create_time=T0 + day, state=S.JOB_STATE_RUNNING, usage_hardware="cpu",
               usage_hourly_usd=0.5, usage_running_since=now - timedelta(hours=2))
    insert_job(manager, "theirs", organization="other", create_time=T0, end_time=T0 + day,
               state=S.JOB_STATE_SUCCEEDED, usage_run_seconds=99999.0, usage_cost_usd=999.0)
    insert_job(manager, "old", create_time=T0 - 60 * day, end_time=T0 - 50 * day, state=S.JOB_STATE_SUCCEEDED,
               usage_cost_usd=7.0)

    report = await get_usage(manager.db, request(T0, now + timedelta(hours=1)), now=now)
    starts = [p.start_time.ToDatetime(UTC) for p in report.periods]
    assert starts == [datetime(2026, 12, d, tzinfo=UTC) for d in (1, 2, 3)], "aligned to UTC days"
    day1, day2, day3 = report.periods
    assert (day1.jobs_created, day2.jobs_created, day3.jobs_created) == (1, 2, 0)
    assert counts(day1) == {} and counts(day2) == {S.JOB_STATE_SUCCEEDED: 1, S.JOB_STATE_FAILED: 1}
    assert day2.gpu_hours == pytest.approx(1.0) and day2.compute_hours == pytest.approx(1.5)
    assert day2.cost_usd == pytest.approx(3.05) and day2.tokens_trained == 510
    assert counts(day3) == {S.JOB_STATE_RUNNING: 1}
    assert day3.compute_hours == pytest.approx(2.0) and day3.cost_usd == pytest.approx(1.0)
    assert report.total.jobs_created == 3 and report.total.cost_usd == pytest.approx(4.05)
    assert report.total.start_time == day1.start_time and report.total.end_time == day3.end_time

    # Default range: the last 30 days to now, by day.
    default = await get_usage(manager.db, request(), now=now)
    assert len(default.periods) == 31 and default.total.cost_usd == pytest.approx(4.05)
    # Weeks start on Monday; months are calendar months.
    weeks = await get_usage(manager.db, request(T0, now, P.USAGE_PERIOD_UNIT_WEEK), now=now)
    assert [p.start_time.ToDatetime(UTC) for p in weeks.periods] == [datetime(2026, 11, 30, tzinfo=UTC)]
    months = await get_usage(manager.db, request(datetime(2026, 11, 15, tzinfo=UTC),
                                                 datetime(2027, 1, 2, tzinfo=UTC), P.USAGE_PERIOD_UNIT_MONTH),
                             now=now)
    bounds = [(p.start_time.ToDatetime(UTC).month, p.end_time.ToDatetime(UTC).month) for p in months.periods]
    assert bounds == [(11, 12), (12, 1), (1, 2)]
    assert months.periods[1].cost_usd == pytest.approx(4.05) and months.periods[1].jobs_created == 3


async def test_a_deleted_job_still_counts_in_get_usage(manager: JobManager, clock: Clock,
                                                       tmp_path: Path) -> None:
    """What a job used was used: DeleteJob's tombstone keeps its final state, times and usage, and GetUsage
    counts them as it counted the job (another organization's deleted job stays out)."""
    day = timedelta(days=1)
    insert_job(manager, "a", create_time=T0, end_time=T0 + day, state=S.JOB_STATE_SUCCEEDED,
               usage_run_seconds=3600.0, usage_cost_usd=3.0, usage_gpu_count=2, usage_tokens=500)
    insert_job(manager, "b", create_time=T0 + day, end_time=T0 + day, state=S.JOB_STATE_CANCELLED,
               usage_run_seconds=1800.0, usage_cost_usd=0.05, usage_tokens=10)
    insert_job(manager, "theirs", organization="other", create_time=T0, end_time=T0 + day,
               state=S.JOB_STATE_SUCCEEDED, usage_run_seconds=99999.0, usage_cost_usd=999.0)
    now = T0 + 2 * day
    clock.now = now
    before = await get_usage(manager.db, request(T0, now), now=now)
    deletions = JobDeletions(manager.db, manager.relay, LocalObjectStore(tmp_path / "objects"))
    for organization, ref in (("acme", "a"), ("acme", "b"), ("other", "theirs")):
        await manager.db.run(lambda session, o=organization, r=ref: deletions._delete(session, o, r))
    assert not await manager.db.run(lambda session: session.scalars(select(JobRow)).all())
    after = await get_usage(manager.db, request(T0, now), now=now)
    assert after == before
    assert after.total.cost_usd == pytest.approx(3.05) and after.total.gpu_hours == pytest.approx(2.0)
    assert after.total.tokens_trained == 510 and after.total.jobs_created == 2
    assert counts(after.periods[1]) == {S.JOB_STATE_SUCCEEDED: 1, S.JOB_STATE_CANCELLED: 1}


async def test_get_usage_refuses_empty_and_too_long_ranges(manager: JobManager) -> None:
    with pytest.raises(InvalidArgument) as info:
        await get_usage(manager.db, request(T0, T0))
    assert [v.field for v in info.value.violations] == ["end_time"]
    with pytest.raises(InvalidArgument) as info:
        await get_usage(manager.db, request(T0, T0 + timedelta(days=367)))
    assert [v.field for v in info.value.violations] == ["start_time"]
    assert "366" in info.value.violations[0].description
    ok = await get_usage(manager.db, request(T0, T0 + timedelta(days=365), P.USAGE_PERIOD_UNIT_DAY))
    assert len(ok.periods) == 366, "aligned days: the first starts before start_time"
    with pytest.raises(InvalidArgument) as info:
        await get_usage(manager.db, request(T0, T0 + timedelta(days=1), organization=""))
    assert [v.field for v in info.value.violations] == ["organization"]


# -- over gRPC and the CLI -----------------------------------------------------------------------------


def test_get_usage_over_grpc_and_the_cli(kit_settings: KitSettings) -> None:
    from typer.testing import CliRunner

    from services.cli.main import app
    from services.jobs.settings import JobSettings
    from tests.jobs.test_artifacts import ORG, served_jobs

    now = datetime.now(UTC)
    with served_jobs(JobSettings(**kit_settings.model_dump())) as served:
        spec = job_pb2.JobSpec(base_model="org/m", dataset="ds_1").SerializeToString()
        with served.component.manager.db.session() as s:
            s.add(JobRow(id="job_u1", organization=ORG, name="u1", spec=spec, state=S.JOB_STATE_SUCCEEDED,
                         revision=1, request_hash="", create_time=now - timedelta(hours=3),
                         end_time=now - timedelta(minutes=1), usage_hardware="nvidia-h100", usage_gpu_count=2,
                         usage_run_seconds=7200.0, usage_cost_usd=27.6, usage_tokens=123456))
        with served.client() as acme:
            report = acme.get_usage(period=P.USAGE_PERIOD_UNIT_MONTH)
        assert report.total.jobs_created == 1 and report.total.gpu_hours == pytest.approx(4.0)
        with served.client(served.bravo_key) as bravo:
            theirs = bravo.get_usage()
        assert theirs.total.jobs_created == 0 and theirs.total.cost_usd == 0, "another organization's"

        runner = CliRunner()
        env = {"TUNEFORGE_API_KEY": served.acme_key, "TUNEFORGE_ADDRESS": served.address, "COLUMNS": "200"}
        result = runner.invoke(app, ["usage", "--since", f"{now - timedelta(days=1):%Y-%m-%d}"], env=env)
        assert result.exit_code == 0, result.output
        total = next(line for line in result.output.splitlines() if "TOTAL" in line)
        cells = [c.strip() for c in total.split("│")[1:-1]]
        assert cells == ["TOTAL", "1", "1", "0", "0", "4.00", "2.00", "27.60", "123,456"], result.output
        result = runner.invoke(app, ["usage", "--period", "week", "--json"], env=env)
        assert result.exit_code == 0, result.output
        assert '"costUsd": 27.6' in result.output or '"cost_usd": 27.6' in result.output, result.output
        result = runner.invoke(app, ["usage", "--since", "2026-12-02", "--until", "2026-12-01"], env=env)
        assert result.exit_code == 2 and "end_time" in result.output, result.output
        result = runner.invoke(app, ["usage", "--period", "year"], env=env)
        assert result.exit_code == 2

"""GetJob and ListJobs read through SQLAlchemy Core (services.jobs.repository.JobReader) and answer exactly
what the ORM path answers: every field of the Job, the same organization scoping (another organization's
job is NOT_FOUND, by id and by name, and never listed), the same pages, the same errors, and a read after
a write sees the write. On SQLite and on PostgreSQL; then through the served component over gRPC, where
every call is authenticated."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import grpc.aio
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from tuneforge.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc

from services.jobs import usage
from services.jobs.component import MIGRATIONS, JobsComponent
from services.jobs.converters import job_to_proto
from services.jobs.manager import JobManager
from services.jobs.models import JobOutbox, JobRow
from services.jobs.repository import JobRepository
from services.kit.db import Database
from services.kit.outbox import OutboxRelay
from tests.auth import service_credentials
from tests.jobs.served import served_jobs
from tuneforge_core.errors import InvalidArgument, NotFound
from tuneforge_core.settings import KitSettings

S = job_pb2.JobState
ORG, OTHER = "acme", "globex"
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Job.usage counts a running attempt up to now: one `now` for both paths compared."""
    monkeypatch.setattr(usage, "utcnow", lambda: NOW)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    url = f"sqlite:///{tmp_path / 'jobs.db'}" if request.param == "sqlite" \
        else request.getfixturevalue("postgres_url")
    database = Database(url, "jobs")
    database.migrate(MIGRATIONS)
    yield database
    database.dispose()


@pytest.fixture
def manager(db: Database) -> JobManager:
    relay = OutboxRelay(db, js=None, model=JobOutbox)  # type: ignore[arg-type]
    return JobManager(db, relay, datasets=None, store=None, nc=None)  # type: ignore[arg-type]


def add_job(db: Database, job_id: str, name: str, *, organization: str = ORG, state: int = S.JOB_STATE_QUEUED,
            full: bool = False) -> None:
    """A job row; `full` fills every column a Job is built from (error, progress, output, labels, times,
    a running attempt's usage)."""
    spec = job_pb2.JobSpec(base_model="meta-llama/Llama-3.2-1B-Instruct", dataset="ds_1")
    spec.hyperparameters.epochs = 2
    row = JobRow(id=job_id, organization=organization, name=name, spec=spec.SerializeToString(), state=state,
                 revision=1, request_hash="", create_time=NOW - timedelta(hours=2),
                 update_time=NOW - timedelta(hours=1))
    if full:
        row.description = "a job with everything"
        row.labels = {"team": "research", "cost-center": "42"}
        row.attempt, row.worker_id, row.revision, row.phase = 2, "worker-7", 9, job_pb2.JOB_PHASE_TRAINING
        row.status_message = "resumed from checkpoint 3"
        row.error = status_pb2.Status(code=code_pb2.CANCELLED, message="nothing").SerializeToString()
        row.progress = job_pb2.JobProgress(step=30, total_steps=100, eta_seconds=50.0).SerializeToString()
        row.output = job_pb2.JobOutput(adapter_uri="file:///objects/jobs/acme/x/adapter").SerializeToString()
        row.start_time, row.end_time = NOW - timedelta(minutes=90), NOW - timedelta(minutes=1)
        row.usage_hardware, row.usage_gpu_count, row.usage_hourly_usd = "nvidia-l4", 2, 1.2
        row.usage_run_seconds, row.usage_cost_usd, row.usage_tokens = 600.0, 0.4, 123_456
        row.usage_running_since = NOW - timedelta(minutes=30)
        row.estimated_cost_usd, row.estimated_seconds = 3.5, 5400.0
    with db.session() as s:
        s.add(row)


def orm_job(db: Database, organization: str, ref: str) -> job_pb2.Job | None:
    """The Job as GetJob built it from the ORM."""
    with db.session() as s:
        row = JobRepository(s).find(organization, ref)
        return job_to_proto(row) if row is not None else None


def orm_page(db: Database, organization: str, states: Sequence[int], before: str | None, limit: int
             ) -> list[job_pb2.Job]:
    with db.session() as s:
        return [job_to_proto(r) for r in JobRepository(s).list(organization, states, before, limit)]


async def test_get_job_answers_what_the_orm_answers(db: Database, manager: JobManager) -> None:
    add_job(db, "job_001", "plain")
    add_job(db, "job_002", "everything", state=S.JOB_STATE_RUNNING, full=True)
    for ref in ("job_001", "plain", "job_002", "everything"):
        job = await manager.get(ORG, ref)
        assert job == orm_job(db, ORG, ref)
    full = await manager.get(ORG, "everything")
    assert dict(full.labels) == {"team": "research", "cost-center": "42"} and full.revision == 9
    assert full.progress.step == 30 and full.error.code == code_pb2.CANCELLED
    assert full.start_time.ToDatetime(UTC) == NOW - timedelta(minutes=90)
    assert full.usage.run_time.ToTimedelta() == timedelta(minutes=40)  # 600 s done + 30 min running
    assert full.usage.gpu_hours == pytest.approx(40 / 60 * 2)


async def test_another_organizations_job_is_not_found(db: Database, manager: JobManager) -> None:
    add_job(db, "job_100", "theirs", organization=OTHER)
    add_job(db, "job_101", "ours")
    for ref in ("job_100", "theirs", "job_999", "nope"):
        with pytest.raises(NotFound):
            await manager.get(ORG, ref)
    assert (await manager.get(OTHER, "theirs")).id == "job_100"
    jobs, _ = await manager.list(ORG, [], 0, "")
    assert [j.id for j in jobs] == ["job_101"]


async def test_an_id_wins_over_another_jobs_name(db: Database, manager: JobManager) -> None:
    """By id first, else by name: as JobRepository.find."""
    add_job(db, "job_200", "first")
    add_job(db, "job_201", "job_200")  # a name that is another job's id
    assert (await manager.get(ORG, "job_200")).name == "first"
    assert (await manager.get(ORG, "job_200")) == orm_job(db, ORG, "job_200")


async def test_concurrent_lookups_read_together_answer_each_alone(db: Database, manager: JobManager) -> None:
    """Lookups that arrive together are read in groups (JobLookups); each gets what it would get alone:
    by id, by name, another organization's (not found), and an id that is only a name in another one."""
    for i in range(6):
        add_job(db, f"job_5{i:02d}", f"name-{i}", full=i % 2 == 0)
    add_job(db, "job_600", "name-0", organization=OTHER)  # the same name in another organization
    add_job(db, "job_601", "job_502", organization=OTHER)  # named like one of ours
    add_job(db, "job_602", "job_601")  # ours, named like theirs
    wanted = [(ORG, f"job_5{i:02d}") for i in range(6)] + [(ORG, f"name-{i}") for i in range(6)] + [
        (ORG, "job_600"), (OTHER, "job_600"), (OTHER, "name-0"), (OTHER, "job_502"), (ORG, "job_601"),
        (ORG, "missing"), (OTHER, "name-1")] * 3

    async def get(organization: str, ref: str) -> job_pb2.Job | None:
        try:
            return await manager.get(organization, ref)
        except NotFound:
            return None

    answers = await asyncio.gather(*(get(organization, ref) for organization, ref in wanted))
    for (organization, ref), answer in zip(wanted, answers, strict=True):
        assert answer == orm_job(db, organization, ref), (organization, ref)
    assert (answers[wanted.index((OTHER, "job_502"))] or job_pb2.Job()).id == "job_601"
    assert (answers[wanted.index((ORG, "job_601"))] or job_pb2.Job()).id == "job_602"
    assert answers[wanted.index((ORG, "job_600"))] is None


async def test_list_jobs_pages_equal_the_orm_pages(db: Database, manager: JobManager) -> None:
    states = [S.JOB_STATE_QUEUED, S.JOB_STATE_RUNNING, S.JOB_STATE_SUCCEEDED]
    for i in range(23):
        add_job(db, f"job_{i:03d}", f"job-{i}", state=states[i % 3], full=i % 5 == 0)
    add_job(db, "job_900", "not-ours", organization=OTHER)
    for wanted in ([], [S.JOB_STATE_RUNNING], [S.JOB_STATE_SUCCEEDED, S.JOB_STATE_QUEUED]):
        for size in (1, 4, 50):
            token, before, seen = "", None, []
            while True:
                page, token = await manager.list(ORG, wanted, size, token)
                assert page == orm_page(db, ORG, wanted, before, size)
                seen += [j.id for j in page]
                if not token:
                    break
                before = page[-1].id
            expected = [f"job_{i:03d}" for i in range(22, -1, -1) if not wanted or states[i % 3] in wanted]
            assert seen == expected


async def test_bad_reads_name_the_field(manager: JobManager) -> None:
    for organization, ref, field in (("", "job_1", "organization"), (ORG, "", "job")):
        with pytest.raises(InvalidArgument) as caught:
            await manager.get(organization, ref)
        assert [v.field for v in caught.value.violations] == [field]
    with pytest.raises(InvalidArgument) as caught:
        await manager.list(ORG, [S.JOB_STATE_RUNNING, 99], 0, "")
    assert [v.field for v in caught.value.violations] == ["states[1]"]
    for token in ("garbage", "e30.AAAA"):
        with pytest.raises(InvalidArgument) as caught:
            await manager.list(ORG, [], 0, token)
        assert [v.field for v in caught.value.violations] == ["page_token"]
    with pytest.raises(InvalidArgument):
        await manager.list(ORG, [], -1, "")


async def test_a_read_after_a_write_sees_the_write(db: Database, manager: JobManager) -> None:
    add_job(db, "job_300", "to-cancel")
    before = await manager.get(ORG, "job_300")
    cancelled = await manager.cancel(ORG, "to-cancel")
    after = await manager.get(ORG, "job_300")
    assert after.state == S.JOB_STATE_CANCELLED and after.revision == before.revision + 1
    assert after == cancelled == orm_job(db, ORG, "job_300")
    page, _ = await manager.list(ORG, [S.JOB_STATE_CANCELLED], 0, "")
    assert [j.id for j in page] == ["job_300"]
    # Concurrent reads while the row changes: every answer is a committed revision, never a mix.
    add_job(db, "job_301", "busy")

    def bump(revision: int) -> None:
        with db.session() as s:
            row = JobRepository(s).get("job_301", for_update=True)
            assert row is not None
            row.revision, row.status_message = revision, f"revision {revision}"

    async def writes() -> None:
        for revision in range(2, 12):
            await asyncio.to_thread(bump, revision)

    async def reads() -> list[job_pb2.Job]:
        return [await manager.get(ORG, "job_301") for _ in range(30)]

    _, seen = await asyncio.gather(writes(), reads())
    assert all(j.status_message in ("", f"revision {j.revision}") for j in seen)
    assert (await manager.get(ORG, "job_301")).revision == 11


# ---- over gRPC -----------------------------------------------------------------------------------------


@pytest.fixture
async def served(kit_settings: KitSettings) -> AsyncIterator[tuple[JobsComponent, str]]:
    async with served_jobs(kit_settings, "jobs-light-reads-test") as running:
        yield running


def violations(exc: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(exc)
    assert status is not None
    out: list[str] = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            out += [v.field for v in bad.field_violations]
    return out


async def test_served_reads_are_authenticated_and_scoped(served: tuple[JobsComponent, str]) -> None:
    component, address = served
    add_job(component.db, "job_400", "served", full=True)
    add_job(component.db, "job_401", "elsewhere", organization=OTHER)
    async with grpc.aio.insecure_channel(address, interceptors=service_credentials()) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        got = await stub.GetJob(job_service_pb2.GetJobRequest(organization=ORG, job="served"))
        assert got.job == orm_job(component.db, ORG, "job_400")
        listed = await stub.ListJobs(job_service_pb2.ListJobsRequest(organization=ORG))
        assert [j.id for j in listed.jobs] == ["job_400"]
        for ref in ("job_401", "elsewhere"):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetJob(job_service_pb2.GetJobRequest(organization=ORG, job=ref))
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetJob(job_service_pb2.GetJobRequest(organization=ORG, job=""))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and violations(caught.value) == ["job"]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListJobs(job_service_pb2.ListJobsRequest(organization=ORG, page_token="x"))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violations(caught.value) == ["page_token"]
    async with grpc.aio.insecure_channel(address) as anonymous:
        stub = job_service_pb2_grpc.JobServiceStub(anonymous)
        for call in (stub.GetJob(job_service_pb2.GetJobRequest(organization=ORG, job="job_400")),
                     stub.ListJobs(job_service_pb2.ListJobsRequest(organization=ORG))):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED

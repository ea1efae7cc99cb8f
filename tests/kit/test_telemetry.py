"""/metrics of a real services process (the identity and jobs components, real NATS, SQLite) scraped over
HTTP: RPCs counted by service, method and final gRPC code (mapped errors, refused credentials and streams
included), jobs by state and the pools' queues from the jobs service; and JSON log lines with organization
and job id."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import json
import logging
import socket
import sys
import urllib.request
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import grpc
import grpc.aio
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tuneforge.v1 import (
    api_key_service_pb2_grpc,
    identity_pb2,
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
)

from services.identity.component import IdentityComponent
from services.jobs.component import MIGRATIONS, JobsComponent
from services.jobs.models import JobRow
from services.kit import auth
from services.kit.db import Database
from services.kit.identity import Principal
from services.kit.outbox import utcnow
from services.kit.runtime import AddressInUse, ListenError, serve, tune_interpreter
from services.kit.telemetry import OrganizationFilter, RpcStats
from tests.kit.test_auth import bearer, create_key
from tuneforge_core import logs
from tuneforge_core.settings import KitSettings

S = job_pb2.JobState
JOBS = "tuneforge.v1.JobService"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def seed_jobs(settings: KitSettings, states: dict[str, int], held: dict[str, str] | None = None) -> None:
    """Job rows in the jobs service's own database, as CreateJob and the workers left them; `held`: QUEUED
    jobs the scheduler still holds (no worker free for them), by the worker pool they name."""
    db = Database(settings.database_url_for("jobs"), "jobs")
    db.migrate(MIGRATIONS)
    now = utcnow()
    with db.session() as s:
        for job_id, state in {**states, **dict.fromkeys(held or {}, S.JOB_STATE_QUEUED)}.items():
            spec = job_pb2.JobSpec(base_model="meta-llama/Llama-3.2-1B-Instruct", dataset="ds_1")
            spec.hardware.pool = (held or {}).get(job_id, "")
            s.add(JobRow(id=job_id, organization="acme", name=job_id, spec=spec.SerializeToString(),
                         state=state, revision=1, request_hash="", create_time=now - timedelta(hours=1),
                         update_time=now - timedelta(minutes=10), dispatched=job_id not in (held or {}),
                         assignment=b"" if job_id in (held or {}) else None))
        s.commit()
    db.dispose()


@contextlib.asynccontextmanager
async def serving(settings: KitSettings, freeze_heap: bool = False) -> AsyncIterator[str]:
    stop = asyncio.Event()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve([IdentityComponent, JobsComponent], settings, name="telemetry-test",
                                     on_ready=ready.set_result, stop=stop, freeze_heap=freeze_heap))
    waiting: set[asyncio.Future[Any]] = {ready, task}
    done, _ = await asyncio.wait(waiting, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    try:
        yield ready.result()
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def scrape(port: int) -> Samples:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            return str(response.read().decode())

    text = await asyncio.to_thread(get)
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def rpc_count(samples: Samples, method: str, code: str, service: str = JOBS) -> float:
    return value(samples, "tuneforge_rpc_duration_seconds_count", service=service, method=method, code=code)


async def test_metrics_endpoint_counts_rpcs_by_code_and_jobs_by_state(kit_settings: KitSettings) -> None:
    port = free_port()
    settings = kit_settings.model_copy(update={"metrics_port": port})
    seed_jobs(settings, {"job_q1": S.JOB_STATE_QUEUED, "job_q2": S.JOB_STATE_QUEUED,
                         "job_r1": S.JOB_STATE_RUNNING, "job_s1": S.JOB_STATE_SUCCEEDED},
              held={"job_h1": "cpu-b", "job_h2": "cpu-b"})
    async with serving(settings) as address, grpc.aio.insecure_channel(address) as channel:
        before = await scrape(port)
        keys = api_key_service_pb2_grpc.ApiKeyServiceStub(channel)
        key = bearer(await create_key(keys, "acme", identity_pb2.ROLE_ADMIN))
        jobs = job_service_pb2_grpc.JobServiceStub(channel)
        for _ in range(2):
            listed = await jobs.ListJobs(job_service_pb2.ListJobsRequest(), metadata=key)
        assert len(listed.jobs) == 6
        await jobs.GetJob(job_service_pb2.GetJobRequest(job="job_r1"), metadata=key)
        with pytest.raises(grpc.aio.AioRpcError) as bad:  # no model, no dataset: field violations
            await jobs.CreateJob(job_service_pb2.CreateJobRequest(), metadata=key)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as missing:  # a stream, failed by the error mapping
            async for _ in jobs.WatchJob(job_service_pb2.WatchJobRequest(job="job_nope"), metadata=key):
                pass
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as anonymous:  # refused before the handler runs
            await jobs.ListJobs(job_service_pb2.ListJobsRequest())
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
        after = await scrape(port)

    def delta(method: str, code: str, service: str = JOBS) -> float:
        return rpc_count(after, method, code, service) - rpc_count(before, method, code, service)

    assert delta("ListJobs", "OK") == 2
    assert delta("GetJob", "OK") == 1
    assert delta("CreateJob", "INVALID_ARGUMENT") == 1
    assert delta("CreateJob", "OK") == 0
    assert delta("WatchJob", "NOT_FOUND") == 1
    assert delta("ListJobs", "UNAUTHENTICATED") == 1
    assert delta("CreateApiKey", "OK", "tuneforge.v1.ApiKeyService") == 1
    # The histogram has its buckets per label set, and the counter agrees with it.
    labels = {"service": JOBS, "method": "CreateJob", "code": "INVALID_ARGUMENT"}
    inf = value(after, "tuneforge_rpc_duration_seconds_bucket", **labels, le="+Inf")
    assert inf == rpc_count(after, "CreateJob", "INVALID_ARGUMENT")
    assert value(after, "tuneforge_rpc_requests_total", **labels) == inf
    assert value(after, "tuneforge_rpc_duration_seconds_sum", **labels) > 0
    # Jobs by state from the jobs service's database, every state present.
    assert value(after, "tuneforge_jobs", state="QUEUED") == 4
    assert value(after, "tuneforge_jobs", state="RUNNING") == 1
    assert value(after, "tuneforge_jobs", state="SUCCEEDED") == 1
    assert ("tuneforge_jobs", frozenset({("state", "FAILED")})) in after
    assert value(after, "tuneforge_jobs", state="FAILED") == 0
    assert value(after, "tuneforge_jobs_oldest_update_age_seconds", state="RUNNING") >= 600
    # The "any" pool's consumer exists (the jobs service ensures it) with nothing queued and no worker.
    assert ("tuneforge_work_queue_pending", frozenset({("pool", "any")})) in after
    assert value(after, "tuneforge_work_queue_pending", pool="any") == 0
    assert value(after, "tuneforge_pool_workers", pool="any") == 0
    # Jobs the fair scheduler holds back (no worker free) wait in their pool's queue all the same.
    assert value(after, "tuneforge_work_queue_pending", pool="pool-cpu-b.any") == 2
    assert value(after, "tuneforge_pool_workers", pool="pool-cpu-b.any") == 0


async def test_a_taken_metrics_port_is_a_clear_error(kit_settings: KitSettings) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = kit_settings.model_copy(update={"metrics_port": taken.getsockname()[1]})
        with pytest.raises(ListenError) as refused:
            async with serving(settings):
                pass
        assert isinstance(refused.value, AddressInUse)
        assert f"127.0.0.1:{taken.getsockname()[1]} is already in use" in str(refused.value)


def test_json_log_lines_carry_organization_and_job_id() -> None:
    out = io.StringIO()
    handler = logs.handler("json", [OrganizationFilter()], stream=out)
    logger = logging.getLogger("tuneforge.test.telemetry")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        logger.info("outside any call")
        caller = Principal(organization="acme", role=identity_pb2.ROLE_MEMBER, name="key:k")
        token = auth._principal.set(caller)
        try:
            logger.info("job %s queued", "job_1", extra={"job_id": "job_1"})
            with logs.job_context("job_2"):
                logger.warning("from the context")
        finally:
            auth._principal.reset(token)
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["message"] for line in lines] == ["outside any call", "job job_1 queued", "from the context",
                                                   "failed"]
    for line in lines:
        assert {"timestamp", "level", "logger", "message"} <= set(line)
        assert line["logger"] == "tuneforge.test.telemetry"
    assert "organization" not in lines[0] and "job_id" not in lines[0]
    assert (lines[1]["organization"], lines[1]["job_id"], lines[1]["level"]) == ("acme", "job_1", "INFO")
    assert (lines[2]["organization"], lines[2]["job_id"], lines[2]["level"]) == ("acme", "job_2", "WARNING")
    assert "ValueError: boom" in lines[3]["exc_info"]


def test_an_unknown_log_format_is_refused() -> None:
    with pytest.raises(ValueError, match="TUNEFORGE_LOG_FORMAT"):
        logs.handler("xml")


async def test_a_service_process_freezes_its_heap_once_serving(kit_settings: KitSettings) -> None:
    """What lives once a service serves is kept out of the collector's full passes (gc.freeze): without it,
    each full collection of the services process paused it 120-155 ms while it fanned points out."""
    gc.unfreeze()
    try:
        async with serving(kit_settings):
            assert gc.get_freeze_count() == 0  # in a test process only when asked
        async with serving(kit_settings, freeze_heap=True):
            assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()


def test_a_service_process_sets_the_gil_switch_interval_from_its_settings(
        monkeypatch: pytest.MonkeyPatch) -> None:
    before = sys.getswitchinterval()
    try:
        tune_interpreter(KitSettings())
        assert sys.getswitchinterval() == pytest.approx(0.0005)  # the default, 0.5 ms
        monkeypatch.setenv("TUNEFORGE_GIL_SWITCH_INTERVAL_MS", "2")
        tune_interpreter(KitSettings())
        assert sys.getswitchinterval() == pytest.approx(0.002)
        monkeypatch.setenv("TUNEFORGE_GIL_SWITCH_INTERVAL_MS", "0")
        with pytest.raises(ValueError, match="gil_switch_interval_ms"):
            KitSettings()
    finally:
        sys.setswitchinterval(before)


def test_rpc_durations_fall_in_the_buckets_prometheus_would_put_them_in() -> None:
    """RpcStats counts without prometheus_client's Histogram: a duration equal to a bound is in that bound's
    bucket (`le`), the buckets are cumulative, past the last bound only in +Inf, and the request counter is
    the histogram's count."""
    from prometheus_client import CollectorRegistry, generate_latest

    stats = RpcStats()
    registry = CollectorRegistry()
    registry.register(stats)
    for seconds in (0.0005, 0.001, 0.0011, 0.05, 400.0):
        stats.observe("tuneforge.v1.JobService", "GetJob", "OK", seconds)
    stats.observe("tuneforge.v1.JobService", "GetJob", "NOT_FOUND", 0.002)
    samples = {(sample.name, frozenset(sample.labels.items())): sample.value
               for family in text_string_to_metric_families(generate_latest(registry).decode())
               for sample in family.samples}
    ok = {"service": "tuneforge.v1.JobService", "method": "GetJob", "code": "OK"}

    def bucket(le: str) -> float:
        return samples[("tuneforge_rpc_duration_seconds_bucket", frozenset({**ok, "le": le}.items()))]

    assert [bucket(le) for le in ("0.001", "0.0025", "0.01", "0.05", "0.1", "300.0", "+Inf")] == [
        2, 3, 3, 4, 4, 4, 5]
    assert samples[("tuneforge_rpc_duration_seconds_count", frozenset(ok.items()))] == 5
    assert samples[("tuneforge_rpc_requests_total", frozenset(ok.items()))] == 5
    assert samples[("tuneforge_rpc_duration_seconds_sum", frozenset(ok.items()))] == pytest.approx(400.0526)
    assert stats.count("tuneforge.v1.JobService", "GetJob", "NOT_FOUND") == 1
    assert stats.count("tuneforge.v1.JobService", "GetJob", "CANCELLED") == 0

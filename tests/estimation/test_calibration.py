"""Calibration: finished jobs' measurements, recorded from real JobChanged events on a real nats-server,
change later estimates of the same model family on the same GPU type, and say so (CALIBRATED)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from tuneforge.v1 import estimation_pb2, estimation_service_pb2, job_pb2

from services.estimation.calibration import MIN_MEMORY_FACTOR, WINDOW, CalibrationStore, factors, measure
from services.estimation.catalog import Catalog
from services.estimation.component import MIGRATIONS_DIR
from services.estimation.estimator import memory_per_gpu, tokens_per_second, utilization
from services.estimation.models import CalibrationRow
from services.estimation.spec import resolve_setup
from services.kit.db import Database
from tests.estimation.conftest import ORG, EstimationStack, publish_job

CATALOG = Catalog.load()
CALIBRATED = estimation_pb2.ESTIMATE_SOURCE_CALIBRATED
PRIOR = estimation_pb2.ESTIMATE_SOURCE_PRIOR


def job_spec(
    base_model: str = "meta-llama/Llama-3.2-1B-Instruct", gpu_type: str = "nvidia-a100-40gb"
) -> job_pb2.JobSpec:
    spec = job_pb2.JobSpec(base_model=base_model, dataset="chats")
    spec.hardware.gpu_type = gpu_type
    spec.hyperparameters.max_seq_length = 1024
    return spec


def prior_of(spec: job_pb2.JobSpec) -> tuple[float, int]:
    """What the prior predicts for the spec: tokens/s at full length, and the peak torch would measure."""
    resolved = resolve_setup(spec, CATALOG)
    hardware = CATALOG.hardware(spec.hardware.gpu_type or "cpu")
    assert hardware is not None
    arch, setup = resolved.model.architecture, resolved.setup
    return (
        tokens_per_second(arch, setup, hardware, setup.sequence_length),
        memory_per_gpu(arch, setup, hardware).measured_part,
    )


def finished(job_id: str, spec: job_pb2.JobSpec, **metrics: float) -> job_pb2.Job:
    job = job_pb2.Job(id=job_id, organization=ORG, spec=spec, state=job_pb2.JOB_STATE_SUCCEEDED)
    job.output.final_metrics.update(metrics)
    return job


def row(tps: tuple[float, float] | None = None, peak: tuple[int, int] | None = None) -> CalibrationRow:
    return CalibrationRow(
        measured_tokens_per_second=tps[0] if tps else None,
        predicted_tokens_per_second=tps[1] if tps else None,
        measured_peak_bytes=peak[0] if peak else None,
        predicted_peak_bytes=peak[1] if peak else None,
    )


def test_factors_take_the_median_pace_and_the_worst_memory() -> None:
    rows = [row((50, 100), (110, 100)), row((80, 100), (70, 100)), row((60, 100)), row(peak=(95, 100))]
    calibration = factors(rows)
    assert calibration is not None and calibration.jobs == 4
    assert calibration.throughput == pytest.approx(0.6)  # median of 0.5, 0.8, 0.6
    assert calibration.memory == pytest.approx(1.1)  # the largest: memory must not be under-estimated
    # Jobs that all needed far less never shrink the estimate below 90% of the prior.
    assert factors([row(peak=(50, 100))]).memory == MIN_MEMORY_FACTOR  # type: ignore[union-attr]
    # A ratio no real job gives (it barely ran) is a measurement error and is ignored.
    assert factors([row((1, 1000))]) is None
    assert factors([]) is None


def test_measure_a_finished_job() -> None:
    spec = job_spec()
    predicted_tps, predicted_peak = prior_of(spec)
    job = finished("job_a", spec, train_tokens_per_second=1234.0, peak_gpu_memory_bytes=5e9)
    measurement = measure(job, CATALOG)
    assert measurement is not None
    assert (measurement.family, measurement.gpu_type, measurement.adapter) == (
        "llama",
        "nvidia-a100-40gb",
        "lora",
    )
    assert measurement.measured_tokens_per_second == 1234.0 and measurement.measured_peak_bytes == 5e9
    assert measurement.predicted_tokens_per_second == pytest.approx(predicted_tps)
    assert measurement.predicted_peak_bytes == predicted_peak

    # Throughput from the Trainer's own counters when the worker did not report it.
    job = finished("job_b", spec, num_input_tokens_seen=100_000, train_runtime=50.0)
    assert measure(job, CATALOG).measured_tokens_per_second == 2000.0  # type: ignore[union-attr]

    # A CPU worker (no GPU type, no GPU peak): its resident set against the whole predicted footprint.
    cpu_job = finished("job_c", job_spec(gpu_type=""), peak_rss_bytes=3e9, train_tokens_per_second=50.0)
    measurement = measure(cpu_job, CATALOG)
    assert measurement is not None and measurement.gpu_type == "cpu"
    resolved = resolve_setup(cpu_job.spec, CATALOG)
    cpu = CATALOG.hardware("cpu")
    assert cpu is not None
    assert (
        measurement.predicted_peak_bytes
        == memory_per_gpu(resolved.model.architecture, resolved.setup, cpu).total
    )

    # Nothing measured, or a model this service cannot size: no calibration, no error.
    assert measure(finished("job_d", spec), CATALOG) is None
    assert measure(finished("job_e", job_spec("acme/unknown"), train_tokens_per_second=1.0), CATALOG) is None


async def estimate(
    stack: EstimationStack, spec: job_pb2.JobSpec
) -> estimation_service_pb2.EstimateJobResponse:
    return await stack.estimation.EstimateJob(
        estimation_service_pb2.EstimateJobRequest(organization=ORG, spec=spec, tokens_per_epoch=1_000_000)
    )


async def wait_calibrated(
    stack: EstimationStack, spec: job_pb2.JobSpec, jobs: int
) -> estimation_service_pb2.EstimateJobResponse:
    for _ in range(200):
        response = await estimate(stack, spec)
        if response.estimate.calibration_jobs == jobs:
            return response
        await asyncio.sleep(0.05)
    raise AssertionError(f"no estimate calibrated by {jobs} jobs")


async def test_finished_jobs_calibrate_later_estimates(estimation_stack: EstimationStack) -> None:
    stack = estimation_stack
    spec = job_spec()
    prior = await estimate(stack, spec)
    assert prior.source == PRIOR and prior.estimate.source == PRIOR and prior.estimate.calibration_jobs == 0
    assert prior.estimate.memory_per_gpu.calibration_adjustment == 0

    # A job that ran at half the predicted pace and peaked 20% above the predicted memory.
    predicted_tps, predicted_peak = prior_of(spec)
    job = finished(
        "job_calibrating",
        spec,
        train_tokens_per_second=0.5 * predicted_tps,
        peak_gpu_memory_bytes=1.2 * predicted_peak,
        train_runtime=100.0,
    )
    # Changes that are not a success are read and ignored.
    running = replace_state(job, job_pb2.JOB_STATE_RUNNING)
    await publish_job(stack, running, "evt_running")
    await publish_job(stack, job, "evt_done")

    calibrated = await wait_calibrated(stack, spec, 1)
    assert calibrated.source == CALIBRATED and calibrated.estimate.source == CALIBRATED
    # The same family on the same GPU type, another model and length: time doubles, memory grows 20%.
    other = job_spec("meta-llama/Llama-3.2-3B-Instruct")
    other.hyperparameters.max_seq_length = 2048
    response = await wait_calibrated(stack, other, 1)
    resolved = resolve_setup(other, CATALOG)
    a100 = CATALOG.hardware("nvidia-a100-40gb")
    assert a100 is not None
    assert response.estimate.time.utilization == pytest.approx(0.5 * utilization(resolved.setup, a100))
    prior_memory = memory_per_gpu(resolved.model.architecture, resolved.setup, a100)
    memory = response.estimate.memory_per_gpu
    assert memory.calibration_adjustment == pytest.approx(0.2 * prior_memory.measured_part, rel=1e-6)
    assert memory.total == prior_memory.total + memory.calibration_adjustment

    # Another family, or the same family on another GPU type, stays a prior.
    assert (await estimate(stack, job_spec("Qwen/Qwen2.5-7B-Instruct"))).source == PRIOR
    assert (await estimate(stack, job_spec(gpu_type="nvidia-h100"))).source == PRIOR
    stack.datasets.add("chats", examples=100, train=90, train_tokens=50_000)
    plan = await stack.estimation.PlanJob(estimation_service_pb2.PlanJobRequest(organization=ORG, spec=spec))
    sources = {f.gpu_type: f.source for f in plan.fits}
    assert sources["nvidia-a100-40gb"] == CALIBRATED and sources["nvidia-h100"] == PRIOR

    # The same job again (a redelivery, or a repeated event) is recorded once; a second job counts.
    await publish_job(stack, job, "evt_done_again")
    second = finished("job_second", spec, train_tokens_per_second=0.7 * predicted_tps)
    await publish_job(stack, second, "evt_second")
    response = await wait_calibrated(stack, spec, 2)
    assert response.estimate.time.utilization == pytest.approx(
        0.6 * utilization(resolve_setup(spec, CATALOG).setup, a100)
    )  # median of 0.5 and 0.7


def replace_state(job: job_pb2.Job, state: int) -> job_pb2.Job:
    copy = job_pb2.Job()
    copy.CopyFrom(job)
    copy.state = state  # type: ignore[assignment]
    return copy


def test_calibration_never_lets_utilization_pass_peak() -> None:
    arch = CATALOG.model("meta-llama/Llama-3.2-1B")
    assert arch is not None
    a100 = CATALOG.hardware("nvidia-a100-40gb")
    assert a100 is not None
    from services.estimation.estimator import Calibration, Setup

    assert utilization(Setup(), a100, calibration=Calibration(jobs=1, throughput=10.0)) == 1.0
    assert utilization(replace(Setup(), adapter="full"), a100) == 0.40


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'estimation.db'}"
    return request.getfixturevalue("postgres_url")


async def test_the_store_on_its_migrated_database(database_url: str) -> None:
    """The migrations apply (twice: every start runs them) and the store records once per job and keeps
    the most recent WINDOW jobs per GPU type, on SQLite and on PostgreSQL."""
    db = Database(database_url, "estimation")
    try:
        db.migrate(MIGRATIONS_DIR)
        db.migrate(MIGRATIONS_DIR)
        store = CalibrationStore(db)
        spec = job_spec()
        predicted_tps, predicted_peak = prior_of(spec)
        for number in range(WINDOW + 5):
            # The oldest five ran at a quarter of the pace; the latest WINDOW at half.
            pace = 0.25 if number < 5 else 0.5
            job = finished(
                f"job_{number:03d}",
                spec,
                train_tokens_per_second=pace * predicted_tps,
                peak_gpu_memory_bytes=1.1 * predicted_peak,
            )
            measurement = measure(job, CATALOG)
            assert measurement is not None
            measurement = replace(
                measurement, recorded_at=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=number)
            )
            assert await store.record(measurement)
        assert not await store.record(measurement)  # the same job again
        calibrations = await store.for_family("llama")
        assert set(calibrations) == {"nvidia-a100-40gb"}
        assert calibrations["nvidia-a100-40gb"].jobs == WINDOW
        assert calibrations["nvidia-a100-40gb"].throughput == pytest.approx(0.5)
        assert calibrations["nvidia-a100-40gb"].memory == pytest.approx(1.1)
        assert await store.for_family("qwen") == {}
    finally:
        db.dispose()

"""CreateJob (the jobs service's manager, on a real SQLite database) refuses a speed option set ON that no
worker of the spec's pool could honour, with INVALID_ARGUMENT naming spec.speed.<field>; the same options on
a GPU pool are accepted and queued as given."""

from __future__ import annotations

from pathlib import Path

from tuneforge.v1 import job_pb2

from services.jobs.manager import JobManager
from tests.jobs.test_create import create, manager, refused, roots, spec, store  # noqa: F401 (fixtures)
from tuneforge_core.reasons import Reason


async def test_speed_options_a_cpu_pool_cannot_honour_are_invalid_arguments(
    manager: JobManager, roots: Path  # noqa: F811
) -> None:
    job = spec(roots / "tiny")
    job.speed.attention = job_pb2.ATTENTION_IMPLEMENTATION_FLASH_ATTENTION_2
    job.speed.liger_kernels = job_pb2.SPEED_MODE_ON
    error = await refused(manager, job)
    assert error.reason == Reason.INVALID_ARGUMENT
    assert sorted(v.field for v in error.violations) == ["spec.speed.attention", "spec.speed.liger_kernels"]
    job.hardware.gpu_type = "nvidia-h100"
    job.speed.padding_free = job_pb2.SPEED_MODE_ON  # without packing
    error = await refused(manager, job)
    assert [v.field for v in error.violations] == ["spec.speed.padding_free"]
    job.hyperparameters.packing = True
    created = await create(manager, job)
    assert created.state == job_pb2.JOB_STATE_QUEUED
    assert created.spec.speed == job.speed

"""Conversions between the jobs service's rows and tuneforge.v1 messages (Job, Worker)."""

from __future__ import annotations

from typing import cast

from google.rpc import status_pb2
from tuneforge.v1 import job_pb2

from services.jobs.models import JobRow, WorkerRow
from services.jobs.repository import JobRecord
from services.jobs.usage import job_usage
from services.jobs.workers import pool_of
from services.kit.protos import to_timestamp


def job_to_proto(row: JobRow | JobRecord) -> job_pb2.Job:
    """The Job of an ORM row, or of a read-only row of `JOB_COLUMNS` (GetJob and ListJobs read those:
    services.jobs.repository.JobReader); both name their attributes as JobRow does."""
    job = job_pb2.Job(
        id=row.id, organization=row.organization, name=row.name, description=row.description,
        state=job_pb2.JobState.ValueType(row.state), attempt=row.attempt, worker_id=row.worker_id,
        revision=row.revision,
        labels=row.labels or {}, status_message=row.status_message or "",
        phase=job_pb2.JobPhase.ValueType(row.phase or 0),
        priority=job_pb2.JobPriority.ValueType(row.priority or job_pb2.JOB_PRIORITY_NORMAL),
    )
    job.spec.ParseFromString(row.spec)
    if row.error:
        job.error.CopyFrom(status_pb2.Status.FromString(row.error))
    if row.progress:
        job.progress.ParseFromString(row.progress)
    if row.output:
        job.output.ParseFromString(row.output)
    for field, value in (("create_time", row.create_time), ("start_time", row.start_time),
                         ("end_time", row.end_time), ("update_time", row.update_time)):
        if value is not None:
            getattr(job, field).CopyFrom(to_timestamp(value))
    # Live: a running attempt counts up to now. job_usage reads only JOB_COLUMNS' usage attributes.
    job.usage.CopyFrom(job_usage(cast(JobRow, row)))
    return job


def worker_to_proto(row: WorkerRow, organization: str, alive: bool) -> job_pb2.Worker:
    """A worker as `organization` sees it: its job only when that job is the organization's own."""
    worker = job_pb2.Worker(
        id=row.id, hostname=row.hostname, gpu_type=row.gpu_type, gpu_count=row.gpu_count,
        state=job_pb2.WorkerState.ValueType(row.state), alive=alive, pool=pool_of(row),
        gpu_memory_bytes=row.gpu_memory_bytes or 0, gpu_name=row.gpu_name or "",
        multi_node=bool(row.multi_node),
    )
    if row.job_id and row.job_organization == organization:
        worker.job, worker.attempt = row.job_id, row.attempt
    if row.started_at is not None:
        worker.start_time.CopyFrom(to_timestamp(row.started_at))
    worker.last_heartbeat_time.CopyFrom(to_timestamp(row.last_heartbeat))
    return worker

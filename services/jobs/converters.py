"""Conversions between JobRow and tuneforge.v1.Job."""

from __future__ import annotations

from google.rpc import status_pb2
from tuneforge.v1 import job_pb2

from services.jobs.models import JobRow
from services.kit.protos import to_timestamp


def job_to_proto(row: JobRow) -> job_pb2.Job:
    job = job_pb2.Job(
        id=row.id, organization=row.organization, name=row.name, description=row.description,
        state=job_pb2.JobState.ValueType(row.state), attempt=row.attempt, worker_id=row.worker_id,
        revision=row.revision,
        labels=row.labels or {},
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
    return job

"""The jobs service as the other services see it, over gRPC.

A job's NOT_FOUND or INVALID_ARGUMENT is the caller's problem, so it is re-raised as the same kit error
(same code, reason and field violations; field `job` becomes `job_id`); an unreachable or failing jobs
service is DEPENDENCY_UNAVAILABLE. The channel is resolved per call: a service hosted in the same process
only knows its own server's address once it listens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc
import grpc.aio
from tuneforge.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc

from tuneforge_core.errors import error_from_rpc_error

log = logging.getLogger(__name__)

ACTIVE_STATES = (
    job_pb2.JOB_STATE_QUEUED,
    job_pb2.JOB_STATE_PREPARING,
    job_pb2.JOB_STATE_RUNNING,
    job_pb2.JOB_STATE_CANCELLING,
)


class JobsClient:
    def __init__(self, channel: Callable[[], grpc.aio.Channel], timeout_s: float = 10.0) -> None:
        self._channel = channel
        self._timeout_s = timeout_s

    async def get_job(self, organization: str, job: str) -> job_pb2.Job:
        stub = job_service_pb2_grpc.JobServiceStub(self._channel())
        try:
            response = await stub.GetJob(job_service_pb2.GetJobRequest(organization=organization, job=job),
                                         timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc_error(exc, service="jobs", field_map={"job": "job_id"}) from exc
        return response.job

    async def active_jobs_using(self, organization: str, dataset_id: str) -> list[str]:
        """Ids of the organization's jobs that have not ended and train or validate on the dataset."""
        stub = job_service_pb2_grpc.JobServiceStub(self._channel())
        users: list[str] = []
        token = ""
        while True:
            request = job_service_pb2.ListJobsRequest(organization=organization, page_size=1000,
                                                      page_token=token, states=ACTIVE_STATES)
            try:
                response = await stub.ListJobs(request, timeout=self._timeout_s)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    # No JobService at that address: this deployment runs without one (a datasets service
                    # on its own), so no job can be using the dataset.
                    log.warning("no jobs service at the configured address; not checking for jobs")
                    return []
                raise error_from_rpc_error(exc, service="jobs") from exc
            users += [job.id for job in response.jobs
                      if dataset_id in (job.spec.dataset, job.spec.validation_dataset)]
            token = response.next_page_token
            if not token:
                return users

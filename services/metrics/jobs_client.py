"""The jobs service as the metrics service sees it, over gRPC (which job a stream is about, and its state).

The service graph is a tree: only the metrics service calls the jobs service, and the jobs service never
calls metrics. (The datasets and estimation services learn about jobs from JobChanged events instead.)

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

class JobsClient:
    def __init__(self, channel: Callable[[], grpc.aio.Channel], timeout_s: float = 10.0) -> None:
        self._channel = channel
        self._timeout_s = timeout_s
        # The stub of the channel last resolved (a stub makes a callable per method: not once per call).
        self._stub: tuple[grpc.aio.Channel, job_service_pb2_grpc.JobServiceStub] | None = None

    def _jobs(self) -> job_service_pb2_grpc.JobServiceStub:
        channel = self._channel()
        if self._stub is None or self._stub[0] is not channel:
            self._stub = (channel, job_service_pb2_grpc.JobServiceStub(channel))
        return self._stub[1]

    async def get_job(self, organization: str, job: str) -> job_pb2.Job:
        stub = self._jobs()
        try:
            response = await stub.GetJob(job_service_pb2.GetJobRequest(organization=organization, job=job),
                                         timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc_error(exc, service="jobs", field_map={"job": "job_id"}) from exc
        return response.job

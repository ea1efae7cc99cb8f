"""The jobs service as the estimation service sees it: one lookup, over gRPC, for pricing a running job.

A job's NOT_FOUND or INVALID_ARGUMENT is the caller's problem and keeps its code and details (field `job`
becomes `job_id`); an unreachable jobs service is DEPENDENCY_UNAVAILABLE.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
import grpc.aio
from tuneforge.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc

from services.kit.errors import error_from_rpc_error


class GrpcJobLookup:
    """`JobLookup` over JobService.GetJob; the channel is resolved per call."""

    def __init__(self, channel: Callable[[], grpc.aio.Channel], timeout_s: float = 10.0) -> None:
        self._channel = channel
        self._timeout_s = timeout_s

    async def get_job(self, organization: str, job: str) -> job_pb2.Job:
        stub = job_service_pb2_grpc.JobServiceStub(self._channel())
        try:
            response = await stub.GetJob(
                job_service_pb2.GetJobRequest(organization=organization, job=job), timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc_error(exc, service="jobs", field_map={"job": "job_id"}) from exc
        return response.job

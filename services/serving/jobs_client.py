"""The jobs service as the serving service sees it: GetJob with the service token, in the caller's
organization. The service graph stays a tree: serving calls jobs, jobs never calls serving (it learns of
deleted jobs from JobChanged events)."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import grpc.aio
from tuneforge.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc

from tuneforge_core.errors import error_from_rpc_error


class JobsClient:
    def __init__(self, channel: Callable[[], grpc.aio.Channel], timeout_s: float = 10.0) -> None:
        self._channel = channel  # resolved per call: the in-process server's address is known once it listens
        self._timeout_s = timeout_s

    async def get_job(self, organization: str, job: str) -> job_pb2.Job:
        stub = job_service_pb2_grpc.JobServiceStub(self._channel())
        try:
            response = await stub.GetJob(job_service_pb2.GetJobRequest(organization=organization, job=job),
                                         timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc_error(exc, service="jobs") from exc
        return response.job

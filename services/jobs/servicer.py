"""JobService over gRPC: a thin adapter from requests to JobManager calls."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc.aio
from tuneforge.v1 import job_service_pb2, job_service_pb2_grpc

from services.jobs.manager import JobManager


class JobServicer(job_service_pb2_grpc.JobServiceServicer):
    def __init__(self, manager: JobManager) -> None:
        self.manager = manager

    async def CreateJob(self, request: job_service_pb2.CreateJobRequest,
                        context: grpc.aio.ServicerContext) -> job_service_pb2.CreateJobResponse:
        return job_service_pb2.CreateJobResponse(job=await self.manager.create(request))

    async def GetJob(self, request: job_service_pb2.GetJobRequest,
                     context: grpc.aio.ServicerContext) -> job_service_pb2.GetJobResponse:
        return job_service_pb2.GetJobResponse(job=await self.manager.get(request.organization, request.job))

    async def ListJobs(self, request: job_service_pb2.ListJobsRequest,
                       context: grpc.aio.ServicerContext) -> job_service_pb2.ListJobsResponse:
        jobs, token = await self.manager.list(request.organization, list(request.states), request.page_size,
                                              request.page_token)
        return job_service_pb2.ListJobsResponse(jobs=jobs, next_page_token=token)

    async def CancelJob(self, request: job_service_pb2.CancelJobRequest,
                        context: grpc.aio.ServicerContext) -> job_service_pb2.CancelJobResponse:
        return job_service_pb2.CancelJobResponse(job=await self.manager.cancel(request.organization,
                                                                               request.job))

    async def WatchJob(self, request: job_service_pb2.WatchJobRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[job_service_pb2.WatchJobResponse]:
        async for job in self.manager.watch(request.organization, request.job):
            yield job_service_pb2.WatchJobResponse(job=job)

    async def ListWorkers(self, request: job_service_pb2.ListWorkersRequest,
                          context: grpc.aio.ServicerContext) -> job_service_pb2.ListWorkersResponse:
        workers, token = await self.manager.list_workers(request.organization, request.page_size,
                                                         request.page_token)
        return job_service_pb2.ListWorkersResponse(workers=workers, next_page_token=token)

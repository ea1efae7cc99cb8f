"""JobService over gRPC: a thin adapter from requests to JobManager calls."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc.aio
from tuneforge.v1 import job_service_pb2, job_service_pb2_grpc

from services.jobs.artifacts import ArtifactCatalog
from services.jobs.checkpoints import CheckpointCatalog
from services.jobs.deletion import JobDeletions
from services.jobs.manager import JobManager
from services.jobs.timeline import JobTimeline
from services.jobs.usage import get_usage


class JobServicer(job_service_pb2_grpc.JobServiceServicer):
    def __init__(self, manager: JobManager, deletions: JobDeletions | None = None) -> None:
        self.manager = manager
        self.deletions = deletions or JobDeletions(manager.db, manager.relay, manager.store)
        # GetJobArtifacts; the component passes one wired to its download server.
        self.artifacts = ArtifactCatalog(manager.store, default_ttl_s=3600)
        self.checkpoints = CheckpointCatalog(manager.store)
        self.timeline = JobTimeline(manager.db)  # ListJobEvents, GetJobEvaluation, WatchJob's events

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

    async def DeleteJob(self, request: job_service_pb2.DeleteJobRequest,
                        context: grpc.aio.ServicerContext) -> job_service_pb2.DeleteJobResponse:
        deleted = await self.deletions.delete(request.organization, request.job)
        return job_service_pb2.DeleteJobResponse(job=deleted.job_id, already_deleted=deleted.already_deleted)

    async def WatchJob(self, request: job_service_pb2.WatchJobRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[job_service_pb2.WatchJobResponse]:
        jobs = self.manager.watch(request.organization, request.job)
        async for response in self.timeline.watch(request.organization, jobs):
            yield response

    async def ListWorkers(self, request: job_service_pb2.ListWorkersRequest,
                          context: grpc.aio.ServicerContext) -> job_service_pb2.ListWorkersResponse:
        workers, token = await self.manager.list_workers(request.organization, request.page_size,
                                                         request.page_token)
        return job_service_pb2.ListWorkersResponse(workers=workers, next_page_token=token)

    async def ListPools(self, request: job_service_pb2.ListPoolsRequest,
                        context: grpc.aio.ServicerContext) -> job_service_pb2.ListPoolsResponse:
        return job_service_pb2.ListPoolsResponse(pools=await self.manager.list_pools(request.organization))

    async def GetJobArtifacts(self, request: job_service_pb2.GetJobArtifactsRequest,
                              context: grpc.aio.ServicerContext) -> job_service_pb2.GetJobArtifactsResponse:
        ttl_s = self.artifacts.check_request(list(request.kinds), request.url_ttl.seconds,
                                             request.url_ttl.nanos)
        job = await self.manager.get(request.organization, request.job)  # another organization's: NOT_FOUND
        return job_service_pb2.GetJobArtifactsResponse(
            artifacts=await self.artifacts.list_artifacts(job, list(request.kinds), ttl_s))

    async def ListCheckpoints(self, request: job_service_pb2.ListCheckpointsRequest,
                              context: grpc.aio.ServicerContext) -> job_service_pb2.ListCheckpointsResponse:
        job = await self.manager.get(request.organization, request.job)  # another organization's: NOT_FOUND
        checkpoints, best_metric = await self.checkpoints.list_checkpoints(job)
        return job_service_pb2.ListCheckpointsResponse(checkpoints=checkpoints, best_metric=best_metric)

    async def ListJobEvents(self, request: job_service_pb2.ListJobEventsRequest,
                            context: grpc.aio.ServicerContext) -> job_service_pb2.ListJobEventsResponse:
        events, token = await self.timeline.list_events(request.organization, request.job, request.page_size,
                                                        request.page_token, request.after_sequence)
        return job_service_pb2.ListJobEventsResponse(events=events, next_page_token=token)

    async def GetJobEvaluation(self, request: job_service_pb2.GetJobEvaluationRequest,
                               context: grpc.aio.ServicerContext) -> job_service_pb2.GetJobEvaluationResponse:
        job_id, report = await self.timeline.evaluation(request.organization, request.job)
        return job_service_pb2.GetJobEvaluationResponse(job=job_id, evaluation=report)

    async def GetUsage(self, request: job_service_pb2.GetUsageRequest,
                       context: grpc.aio.ServicerContext) -> job_service_pb2.GetUsageResponse:
        return await get_usage(self.manager.db, request)

"""MetricsService over gRPC: unpacks requests, calls the manager, packs responses. Errors are mapped by the
kit's interceptor."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc.aio
from tuneforge.v1 import metrics_service_pb2, metrics_service_pb2_grpc

from services.metrics.manager import MetricsManager


class MetricsServicer(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, manager: MetricsManager) -> None:
        self.manager = manager

    async def StreamMetrics(self, request: metrics_service_pb2.StreamMetricsRequest,
                            context: grpc.aio.ServicerContext) -> AsyncIterator[
                                metrics_service_pb2.StreamMetricsResponse]:
        points = self.manager.stream_metrics(request.organization, request.job_id, list(request.kinds),
                                             request.start_step, request.follow)
        async for point in points:
            yield metrics_service_pb2.StreamMetricsResponse(point=point)

    async def ListMetrics(self, request: metrics_service_pb2.ListMetricsRequest,
                          context: grpc.aio.ServicerContext) -> metrics_service_pb2.ListMetricsResponse:
        points, token = await self.manager.list_metrics(request.organization, request.job_id,
                                                        list(request.kinds), request.page_size,
                                                        request.page_token)
        return metrics_service_pb2.ListMetricsResponse(points=points, next_page_token=token)

    async def StreamLogs(self, request: metrics_service_pb2.StreamLogsRequest,
                         context: grpc.aio.ServicerContext) -> AsyncIterator[
                             metrics_service_pb2.StreamLogsResponse]:
        entries = self.manager.stream_logs(request.organization, request.job_id, request.min_level,
                                           list(request.sources), request.follow)
        async for entry in entries:
            yield metrics_service_pb2.StreamLogsResponse(entry=entry)

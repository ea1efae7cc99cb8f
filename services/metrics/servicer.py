"""MetricsService over gRPC: unpacks requests, calls the manager, packs responses. Errors are mapped by the
kit's interceptor.

The two streams write bytes, not messages: a live point is serialized once for all the streams it goes to
(services.metrics.fanout), so their method handlers take a response serializer that passes bytes through
(`add_to_server`; grpc.aio calls the serializer of each response it is given, and sends what it returns).
They write with `context.write` instead of yielding, which saves every response a trip through each
interceptor's generator.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterator
from contextlib import aclosing
from typing import Any

import grpc
import grpc.aio
from tuneforge.v1 import metrics_service_pb2

from services.metrics.fanout import Chunk
from services.metrics.manager import MetricsManager

SERVICE_NAME = "tuneforge.v1.MetricsService"
# StreamMetricsResponse.resumed_from_storage / StreamLogsResponse.resumed_from_storage = true (field 3,
# varint). Appended to a message's bytes, it sets the field: protobuf parses concatenated messages as one.
RESUMED = b"\x18\x01"
# What one batched message holds at most.
BATCH_MAX_ITEMS = 1000
BATCH_MAX_BYTES = 1 << 20


class MetricsServicer:
    def __init__(self, manager: MetricsManager) -> None:
        self.manager = manager

    async def StreamMetrics(self, request: metrics_service_pb2.StreamMetricsRequest,
                            context: grpc.aio.ServicerContext) -> None:
        chunks = self.manager.stream_metric_chunks(request.organization, request.job_id, list(request.kinds),
                                                   request.start_step, request.follow)
        await _send(chunks, context, request.batch)

    async def ListMetrics(self, request: metrics_service_pb2.ListMetricsRequest,
                          context: grpc.aio.ServicerContext) -> metrics_service_pb2.ListMetricsResponse:
        points, token = await self.manager.list_metrics(request.organization, request.job_id,
                                                        list(request.kinds), request.page_size,
                                                        request.page_token)
        return metrics_service_pb2.ListMetricsResponse(points=points, next_page_token=token)

    async def StreamLogs(self, request: metrics_service_pb2.StreamLogsRequest,
                         context: grpc.aio.ServicerContext) -> None:
        chunks = self.manager.stream_log_chunks(request.organization, request.job_id, request.min_level,
                                                list(request.sources), request.follow)
        await _send(chunks, context, request.batch)


async def _send(chunks: AsyncGenerator[Chunk[Any], None], context: grpc.aio.ServicerContext,
                batch: bool) -> None:
    try:
        async with aclosing(chunks):
            async for chunk in chunks:
                items = chunk.items
                if batch:
                    if len(items) == 1 and not chunk.resumed:  # a live point, as most are
                        await context.write(items[0].repeated)
                        continue
                    for message in _batched(chunk):
                        await context.write(message)
                    continue
                if chunk.resumed:
                    await context.write(items[0].framed + RESUMED)
                    items = items[1:]
                for item in items:
                    await context.write(item.framed)
    except Exception:
        # A write to a call the client cancelled (or that timed out) fails; that is the end of the stream,
        # not an error of ours.
        if context.cancelled() or context.done():
            return
        raise


def _batched(chunk: Chunk[Any]) -> Iterator[bytes]:
    """The chunk's items in `points` / `entries` (each item's shared `repeated` bytes, concatenated), in as
    few messages as the limits allow."""
    items = chunk.items
    if len(items) <= BATCH_MAX_ITEMS and sum(len(item.repeated) for item in items) <= BATCH_MAX_BYTES:
        parts = [item.repeated for item in items]  # the common case: one message
        yield (RESUMED if chunk.resumed else b"") + b"".join(parts)
        return
    parts, size, resumed = [], 0, chunk.resumed
    for item in items:
        if parts and (len(parts) >= BATCH_MAX_ITEMS or size + len(item.repeated) > BATCH_MAX_BYTES):
            yield (RESUMED if resumed else b"") + b"".join(parts)
            parts, size, resumed = [], 0, False
        parts.append(item.repeated)
        size += len(item.repeated)
    if parts:
        yield (RESUMED if resumed else b"") + b"".join(parts)


def _pass_bytes(response: Any) -> bytes:
    return response if isinstance(response, bytes) else bytes(response.SerializeToString())


def add_to_server(servicer: MetricsServicer, server: grpc.aio.Server) -> None:
    """The generated `add_MetricsServiceServicer_to_server`, with the streams taking pre-serialized bytes."""
    pb = metrics_service_pb2
    handlers = {
        "StreamMetrics": grpc.unary_stream_rpc_method_handler(
            servicer.StreamMetrics, request_deserializer=pb.StreamMetricsRequest.FromString,
            response_serializer=_pass_bytes),
        "ListMetrics": grpc.unary_unary_rpc_method_handler(
            servicer.ListMetrics, request_deserializer=pb.ListMetricsRequest.FromString,
            response_serializer=pb.ListMetricsResponse.SerializeToString),
        "StreamLogs": grpc.unary_stream_rpc_method_handler(
            servicer.StreamLogs, request_deserializer=pb.StreamLogsRequest.FromString,
            response_serializer=_pass_bytes),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)

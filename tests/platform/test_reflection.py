"""gRPC reflection as tools use it (grpcurl, Postman, buf curl): v1 and v1alpha, both describing the services
and errors.proto's ErrorReason, through grpcio-reflection's own client."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tests.platform.conftest import Seeded

pytestmark = pytest.mark.slow

SERVICES = {"tuneforge.v1.DatasetService", "tuneforge.v1.JobService", "tuneforge.v1.EstimationService",
            "tuneforge.v1.MetricsService", "tuneforge.v1.ApiKeyService", "tuneforge.v1.AuditService",
            "tuneforge.v1.DeploymentService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}


class V1Stub:
    """grpcio-reflection ships a v1alpha client only; v1 is the same messages under another service name,
    so its client works unchanged through this stub."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.ServerReflectionInfo = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)


@pytest.fixture(params=["v1", "v1alpha"])
def database(request: pytest.FixtureRequest,
             seeded_platform: Seeded) -> Iterator[ProtoReflectionDescriptorDatabase]:
    with grpc.insecure_channel(seeded_platform.address) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        if request.param == "v1":
            db._stub = V1Stub(channel)
        yield db


def test_lists_every_service_and_both_reflection_versions(
        database: ProtoReflectionDescriptorDatabase) -> None:
    assert set(database.get_services()) == SERVICES


def test_error_reason_is_discoverable(database: ProtoReflectionDescriptorDatabase) -> None:
    pool = DescriptorPool(database)
    reason = pool.FindEnumTypeByName("tuneforge.v1.ErrorReason")
    assert reason.file.name == "tuneforge/v1/errors.proto"
    assert "INVALID_PAGE_TOKEN" in reason.values_by_name  # the ErrorInfo.reason string, no prefix


def test_services_and_their_messages_are_described(database: ProtoReflectionDescriptorDatabase) -> None:
    pool = DescriptorPool(database)
    list_jobs = pool.FindServiceByName("tuneforge.v1.JobService").methods_by_name["ListJobs"]
    assert "page_token" in list_jobs.input_type.fields_by_name
    v1 = pool.FindServiceByName("grpc.reflection.v1.ServerReflection")
    assert v1.file.package == "grpc.reflection.v1"
    assert v1.methods_by_name["ServerReflectionInfo"].input_type.full_name == \
        "grpc.reflection.v1.ServerReflectionRequest"


def test_unknown_symbol_is_not_found(database: ProtoReflectionDescriptorDatabase) -> None:
    with pytest.raises(KeyError):
        database.FindFileContainingSymbol("tuneforge.v1.NoSuchThing")


def test_health_watch_streams_the_serving_status(seeded_platform: Seeded) -> None:
    """grpcio's health servicer writes with context.write instead of yielding; the kit's interceptors must
    pass that through (it used to answer INTERNAL)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(seeded_platform.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "tuneforge.v1.JobService"):
            stream = stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=10)
            first = next(stream)
            stream.cancel()
            assert first.status == health_pb2.HealthCheckResponse.SERVING, service

"""The call pipeline every handler of the kit's server is built in (services.kit.pipeline), on a real
server: the order of its steps as a caller sees it, and that each method's handler is built once."""

from __future__ import annotations

from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2
from tuneforge.v1 import api_key_service_pb2, api_key_service_pb2_grpc, identity_pb2

from services.kit import telemetry
from services.kit.pipeline import CallPipeline
from tests.kit.test_auth import bearer, create_key, serving
from tuneforge_core.settings import KitSettings

GET_CALLER = "/tuneforge.v1.ApiKeyService/GetCaller"
CREATE_KEY = "/tuneforge.v1.ApiKeyService/CreateApiKey"
# Not a protobuf message: a field header announcing 16 bytes, then nothing.
GARBAGE = b"\x0a\x10"


def _raw(channel: grpc.aio.Channel, method: str) -> Any:
    return channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)


def _count(method: str, code: str) -> float:
    service, name = telemetry.split_method(method)
    return float(telemetry.RPC_STATS.count(service, name, code))


async def test_a_call_is_authenticated_before_its_request_is_parsed(kit_settings: KitSettings) -> None:
    async with serving(kit_settings) as address, grpc.aio.insecure_channel(address) as channel:
        stub = api_key_service_pb2_grpc.ApiKeyServiceStub(channel)
        viewer = await create_key(stub, "acme", identity_pb2.ROLE_VIEWER)
        before = _count(CREATE_KEY, "PERMISSION_DENIED")

        # Bytes that do not parse, without a credential: the credential is what is refused.
        with pytest.raises(grpc.aio.AioRpcError) as nobody:
            await _raw(channel, GET_CALLER)(GARBAGE)
        assert nobody.value.code() == grpc.StatusCode.UNAUTHENTICATED

        # The same bytes to a method the role may not call: the role is what is refused, and counted.
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await _raw(channel, CREATE_KEY)(GARBAGE, metadata=bearer(viewer))
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert _count(CREATE_KEY, "PERMISSION_DENIED") == before + 1

        # Let in, the bytes are the caller's error, naming the method (never grpcio's UNKNOWN).
        with pytest.raises(grpc.aio.AioRpcError) as garbled:
            await _raw(channel, GET_CALLER)(GARBAGE, metadata=bearer(viewer))
        assert garbled.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"the request to {GET_CALLER} is not a valid protobuf message" in garbled.value.details()

        # And well-formed, the same call answers.
        caller = await stub.GetCaller(api_key_service_pb2.GetCallerRequest(), metadata=bearer(viewer))
        assert caller.caller.organization == "acme"


async def test_health_is_open_and_counted(kit_settings: KitSettings) -> None:
    method = "/grpc.health.v1.Health/Check"
    async with serving(kit_settings) as address, grpc.aio.insecure_channel(address) as channel:
        before = _count(method, "OK")
        check = channel.unary_unary(method,
                                    request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                    response_deserializer=health_pb2.HealthCheckResponse.FromString)
        answer = await check(health_pb2.HealthCheckRequest())  # no credential
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        assert _count(method, "OK") == before + 1


async def test_each_methods_handler_is_built_once_and_no_interceptor_runs(
    kit_settings: KitSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[str] = []
    build = CallPipeline._build

    def counting(self: CallPipeline, method: str, handler: Any) -> Any:
        built.append(method)
        return build(self, method, handler)

    servers: list[Any] = []
    make_server = grpc.aio.server

    def recording(*args: Any, **kwargs: Any) -> Any:
        servers.append(kwargs.get("interceptors"))
        return make_server(*args, **kwargs)

    monkeypatch.setattr(CallPipeline, "_build", counting)
    monkeypatch.setattr(grpc.aio, "server", recording)
    async with serving(kit_settings) as address, grpc.aio.insecure_channel(address) as channel:
        stub = api_key_service_pb2_grpc.ApiKeyServiceStub(channel)
        admin = await create_key(stub, "acme", identity_pb2.ROLE_ADMIN)
        for _ in range(5):
            await stub.GetCaller(api_key_service_pb2.GetCallerRequest(), metadata=bearer(admin))
    assert servers == [None]  # tracing is off: no interceptor at all
    assert built.count(GET_CALLER) == 1 and built.count(CREATE_KEY) == 1
    assert len(built) == len(set(built))


async def test_no_method_is_registered_with_grpc_and_every_one_is_served(
    kit_settings: KitSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """grpc.aio waits on one pending request per registered method for every call it accepts: the
    methods are served through one generic table instead (services.kit.pipeline.Registrar)."""
    registered: list[str] = []
    make_server = grpc.aio.server

    def recording(*args: Any, **kwargs: Any) -> Any:
        server = make_server(*args, **kwargs)
        register = server.add_registered_method_handlers

        def add_registered_method_handlers(service: str, handlers: Any) -> None:
            registered.append(service)
            register(service, handlers)

        server.add_registered_method_handlers = add_registered_method_handlers  # type: ignore[method-assign]
        return server

    monkeypatch.setattr(grpc.aio, "server", recording)
    async with serving(kit_settings) as address, grpc.aio.insecure_channel(address) as channel:
        stub = api_key_service_pb2_grpc.ApiKeyServiceStub(channel)
        admin = await create_key(stub, "acme", identity_pb2.ROLE_ADMIN)
        caller = await stub.GetCaller(api_key_service_pb2.GetCallerRequest(), metadata=bearer(admin))
        assert caller.caller.organization == "acme"
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await _raw(channel, "/tuneforge.v1.ApiKeyService/NoSuchMethod")(b"", metadata=bearer(admin))
        assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert registered == []


def test_a_frozen_answer_is_serialized_once_and_only_for_that_object(monkeypatch: pytest.MonkeyPatch) -> None:
    from tuneforge.v1 import estimation_service_pb2

    from services.kit.pipeline import _with_frozen, freeze

    monkeypatch.setattr("services.kit.pipeline.FROZEN_KEPT", 2)
    serialized: list[Any] = []

    def serialize(message: Any) -> bytes:
        serialized.append(message)
        return bytes(message.SerializeToString())

    send = _with_frozen(serialize)
    assert send is not None and _with_frozen(None) is None
    page = freeze(estimation_service_pb2.ListBaseModelsResponse(next_page_token="t"))
    twin = estimation_service_pb2.ListBaseModelsResponse(next_page_token="t")
    assert send(page) == send(page) == page.SerializeToString() and serialized == []
    assert send(twin) == page.SerializeToString() and serialized == [twin]  # equal, not the same object
    # Past FROZEN_KEPT the oldest is serialized per call again, with the same bytes.
    freeze(estimation_service_pb2.ListBaseModelsResponse(next_page_token="a"))
    freeze(estimation_service_pb2.ListBaseModelsResponse(next_page_token="b"))
    assert send(page) == page.SerializeToString() and serialized == [twin, page]


async def test_a_string_holding_a_nul_is_refused_naming_its_field(kit_settings: KitSettings) -> None:
    """PostgreSQL's text cannot store a NUL: every method refuses a request holding one in any string,
    INVALID_ARGUMENT naming the field, before the servicer runs (on SQLite it was stored; on PostgreSQL
    it was INTERNAL)."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    async with serving(kit_settings) as address, grpc.aio.insecure_channel(address) as channel:
        stub = api_key_service_pb2_grpc.ApiKeyServiceStub(channel)
        admin = await create_key(stub, "acme", identity_pb2.ROLE_ADMIN, "boss")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CreateApiKey(api_key_service_pb2.CreateApiKeyRequest(
                organization="acme", name="ci\x00bot", role=identity_pb2.ROLE_VIEWER), metadata=bearer(admin))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "name: must not contain a NUL character" in refused.value.details()
        status = rpc_status.from_call(refused.value)
        assert status is not None
        fields = []
        for detail in status.details:
            bad = error_details_pb2.BadRequest()
            if detail.Unpack(bad):
                fields = [v.field for v in bad.field_violations]
        assert fields == ["name"]
        listed = await stub.ListApiKeys(api_key_service_pb2.ListApiKeysRequest(organization="acme"),
                                        metadata=bearer(admin))
        assert [k.name for k in listed.api_keys] == ["boss"]  # nothing was created

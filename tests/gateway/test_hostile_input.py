"""Hostile input to the gateway alone (no platform): a stand-in gRPC server records every call, so a test
sees both the HTTP answer and whether any call was made. Each mistake is a google.rpc.Status naming the
field, never a 500, and never a logged traceback."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import pytest
from aiohttp import web

from services.gateway import app as gateway_app
from services.gateway import transcode
from services.gateway.rules import all_routes
from tests.gateway.conftest import violations

# Every unary route that takes a JSON body, with a path whose variables are filled in.
# The field a bad body is named by: "body" for `body: "*"`, else the field the body is.
BODY_ROUTES = sorted({(r.http_method, r.path.template.replace("{", "").replace("}", "").replace("=**", ""),
                       "body" if r.body == "*" else r.body)
                      for r in all_routes() if r.body and not r.client_streaming})


@dataclass
class Backend:
    """The calls the gateway made: (RPC name, request bytes or the list of streamed messages)."""

    calls: list[tuple[str, Any]] = field(default_factory=list)

    def rpcs(self) -> list[str]:
        return [name for name, _ in self.calls]


class _Recorder(grpc.GenericRpcHandler):
    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        name = details.method.rsplit("/", 1)[-1]
        backend = self.backend

        async def unary(request: bytes, _context: Any) -> bytes:
            backend.calls.append((name, request))
            return b""  # the empty response message

        async def client_stream(requests: AsyncIterator[bytes], _context: Any) -> bytes:
            received = [r async for r in requests]
            # A stream the client cancelled ends here as if it were complete; the cancellation reaches this
            # task at its next await. A call is recorded only if it was not cancelled.
            await asyncio.sleep(0.05)
            backend.calls.append((name, received))
            return b""

        if name in ("UploadDataset", "ValidateDataset"):
            return grpc.stream_unary_rpc_method_handler(client_stream)
        return grpc.unary_unary_rpc_method_handler(unary)


@dataclass
class Gateway:
    port: int
    backend: Backend

    async def raw(self, method: str, target: bytes | str, body: bytes | None = None,
                  headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """One HTTP/1.1 request written byte for byte (URLs aiohttp's client would re-encode or refuse):
        the status, the headers (lower-case names) and the body."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        target_bytes = target.encode() if isinstance(target, str) else target
        lines = [method.encode() + b" " + target_bytes + b" HTTP/1.1", b"Host: 127.0.0.1",
                 b"Connection: close"]
        lines += [f"{k}: {v}".encode() for k, v in (headers or {}).items()]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}".encode())
        writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + (body or b""))
        await writer.drain()
        answer = await reader.read()
        writer.close()
        head, _, payload = answer.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        found = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
        return int(status_line.split()[1]), found, payload

    async def json(self, method: str, target: bytes | str, body: bytes | None = None,
                   headers: dict[str, str] | None = None) -> tuple[int, Any]:
        status, found, payload = await self.raw(method, target, body, headers)
        assert found.get("content-type", "").startswith("application/json"), (status, found, payload[:300])
        return status, json.loads(payload)


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    backend = Backend()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_Recorder(backend),))
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    app = gateway_app.create_app(f"127.0.0.1:{grpc_port}", console=False)
    runner = gateway_app.create_runner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = int(runner.addresses[0][1])
    try:
        yield Gateway(port, backend)
    finally:
        await runner.cleanup()
        await server.stop(None)


def _no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not loud, [(r.name, r.getMessage()[:200]) for r in loud]


def _deep_array(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def _deep_object(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


# -- 1. JSON nested too deeply --

@pytest.mark.parametrize(("method", "path", "named"), BODY_ROUTES)
async def test_a_body_nested_thousands_deep_is_400_naming_body_on_every_route(
        gateway: Gateway, caplog: pytest.LogCaptureFixture, method: str, path: str, named: str) -> None:
    for raw in (_deep_array(10_000), _deep_object(10_000), b'{"name": ' + _deep_array(10_000) + b"}"):
        status, answer = await gateway.json(method, path, raw, {"Content-Type": "application/json"})
        assert status == 400 and answer["code"] == 3, (status, answer)
        assert "nested too deeply" in violations(answer)[named], answer
    assert gateway.backend.calls == []
    _no_traceback(caplog)


async def test_a_deep_body_that_json_decodes_is_refused_before_protobuf_parses_it(
        gateway: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    depth = transcode.MAX_JSON_DEPTH + 1
    for raw in (b'{"spec": ' + _deep_object(depth) + b"}", b'{"labels": {"a": ' + _deep_array(depth) + b"}}",
                b'{"spec": {"method": ' + _deep_array(700) + b"}}", _deep_array(900)):
        status, answer = await gateway.json("POST", "/v1/jobs", raw, {"Content-Type": "application/json"})
        assert status == 400 and "nested too deeply" in violations(answer)["body"], answer
        assert str(transcode.MAX_JSON_DEPTH) in violations(answer)["body"]
    # At the limit, the body is read as usual (here: an unknown field, named).
    status, answer = await gateway.json("POST", "/v1/jobs", b'{"spec": ' + _deep_object(
        transcode.MAX_JSON_DEPTH - 2) + b"}", {"Content-Type": "application/json"})
    assert status == 400 and "unknown field" in violations(answer)["spec.a"], answer
    assert gateway.backend.calls == []
    _no_traceback(caplog)


def test_protobufs_own_recursion_limit_is_named_like_the_gateways() -> None:
    """json_format refuses messages nested over its max_recursion_depth with a ParseError ("Message too
    deep"); the gateway's own limit comes first, but where json_format's is reached, it is the same 400."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    pool = descriptor_pool.DescriptorPool()
    proto = descriptor_pb2.FileDescriptorProto(name="deep_test.proto", package="deeptest", syntax="proto3")
    node = proto.message_type.add(name="Node")
    node.field.add(name="child", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
                   type_name=".deeptest.Node", label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool.Add(proto)
    node_cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("deeptest.Node"))
    value: dict[str, Any] = {}
    for _ in range(150):
        value = {"child": value}
    with pytest.raises(transcode.BadInput) as refused:
        transcode.parse_value_into(node_cls(), value)
    assert refused.value.violations[0][0] == "body" and "nested too deeply" in refused.value.violations[0][1]
    original = transcode.MAX_JSON_DEPTH
    transcode.MAX_JSON_DEPTH = 1000  # past json_format's own limit (100)
    try:
        with pytest.raises(transcode.BadInput) as refused:
            transcode.parse_value_into(node_cls(), value, prefix="spec")
    finally:
        transcode.MAX_JSON_DEPTH = original
    assert refused.value.violations == [("spec", refused.value.violations[0][1])]
    assert "nested too deeply" in refused.value.violations[0][1]


# -- 2. Query and path parameters that are not UTF-8 --

async def test_query_and_path_parameters_that_are_not_utf8_are_400_naming_them(
        gateway: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    upload = b"/v1/datasets:upload?name=chat&filename=chat.jsonl&description=ab%FF%FEcd"
    status, answer = await gateway.json("POST", upload, b'{"messages": []}\n')
    assert status == 400 and "is not UTF-8" in violations(answer)["description"], answer
    status, answer = await gateway.json("GET", b"/v1/jobs?organization=%FF%FE&pageSize=%C3%28")
    assert status == 400 and set(violations(answer)) == {"organization", "pageSize"}, answer
    status, answer = await gateway.json("GET", b"/v1/jobs?pageToken=%FF&page%FF=1")
    assert status == 400 and set(violations(answer)) == {"pageToken", "page\ufffd"}, answer
    status, answer = await gateway.json("GET", b"/v1/jobs/%FF%FE")
    assert status == 400 and "is not UTF-8" in violations(answer)["job"], answer
    status, answer = await gateway.json("POST", b"/v1/jobs/%ED%A0%80:cancel")  # a surrogate, in UTF-8
    assert status == 400 and "is not UTF-8" in violations(answer)["job"], answer
    status, answer = await gateway.json("POST", b"/v1/datasets:upload?name=a%FF", b"x")
    assert status == 400 and "is not UTF-8" in violations(answer)["name"], answer
    assert gateway.backend.calls == []
    # Percent-encoded UTF-8, U+FFFD itself included, is read as given.
    status, _ = await gateway.json("GET", b"/v1/jobs/caf%C3%A9%EF%BF%BD?organization=%E2%82%AC")
    assert status == 200
    assert gateway.backend.calls[-1] == ("GetJob", _get_job("café\ufffd", "€"))
    _no_traceback(caplog)


def _get_job(job: str, organization: str) -> bytes:
    from tuneforge.v1 import job_service_pb2

    return job_service_pb2.GetJobRequest(job=job, organization=organization).SerializeToString()


# -- 3. Content-Type --

@pytest.mark.parametrize("content_type", [
    "text/plain", "application/xml", "multipart/form-data; boundary=x", "application/x-www-form-urlencoded",
    "application/octet-stream", "application/json; charset=latin-1", "application/jsonx"])
async def test_a_body_that_is_not_declared_json_is_415_naming_the_header(
        gateway: Gateway, caplog: pytest.LogCaptureFixture, content_type: str) -> None:
    for method, path, _ in BODY_ROUTES:
        status, answer = await gateway.json(method, path, b"{}", {"Content-Type": content_type})
        assert status == 415 and answer["code"] == 3, (method, path, status, answer)
        assert "Content-Type" in violations(answer), answer
    assert gateway.backend.calls == []
    _no_traceback(caplog)


@pytest.mark.parametrize("content_type", [
    None, "application/json", "application/json; charset=utf-8", "Application/JSON;charset=UTF-8",
    "application/merge-patch+json", "application/vnd.tuneforge+json"])
async def test_json_bodies_and_bodies_with_no_content_type_are_read(
        gateway: Gateway, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    status, _ = await gateway.json("POST", "/v1/jobs", b'{"name": "x"}', headers)
    assert status == 200 and gateway.backend.rpcs() == ["CreateJob"]
    # An empty body is no body, whatever it is labelled.
    status, _ = await gateway.json("POST", "/v1/jobs/x:cancel", b"", {"Content-Type": "text/plain"})
    assert status == 200 and gateway.backend.rpcs() == ["CreateJob", "CancelJob"]


@pytest.mark.parametrize("content_type", [
    None, "application/octet-stream", "application/x-www-form-urlencoded", "text/plain", "application/jsonl"])
async def test_uploads_take_the_raw_file_whatever_its_content_type(
        gateway: Gateway, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    status, _ = await gateway.json("POST", "/v1/datasets:upload?name=chat&filename=chat.jsonl",
                                   b'{"messages": []}\n', headers)
    assert status == 200 and gateway.backend.rpcs() == ["UploadDataset"]


# -- 4. Lines longer than aiohttp reads by default --

async def test_a_64kb_path_segment_or_query_value_is_414_naming_it(
        gateway: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    long = "x" * 65_536
    status, answer = await gateway.json("GET", f"/v1/jobs/{long}")
    assert status == 414 and answer["code"] == 3, (status, answer)
    assert "65536 bytes" in violations(answer)["job"], answer
    status, answer = await gateway.json("POST", f"/v1/jobs?organization={long}&requestId=1", b"{}")
    assert status == 414 and set(violations(answer)) == {"organization"}, answer
    status, answer = await gateway.json("POST", f"/v1/datasets:upload?name=a&description={long}", b"x")
    assert status == 414 and set(violations(answer)) == {"description"}, answer
    # Up to the limit (aiohttp's own default), a URL is read as before.
    fits = "y" * (gateway_app.MAX_URL_BYTES - len("/v1/jobs/"))
    status, _ = await gateway.json("GET", f"/v1/jobs/{fits}")
    assert status == 200 and gateway.backend.rpcs() == ["GetJob"]
    _no_traceback(caplog)


async def test_what_aiohttp_refuses_itself_is_logged_on_one_line_without_a_traceback(
        gateway: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    huge = "z" * (gateway_app.MAX_LINE_BYTES + 10)
    for target, headers in ((f"/v1/jobs/{huge}", None), ("/v1/jobs", {"X-Long": "h" * 70_000}),
                            (b"/v1/jobs?organization=\xff", None)):
        status, _, _ = await gateway.raw("GET", target, headers=headers)
        assert status == 400
    assert gateway.backend.calls == []
    _no_traceback(caplog)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 3, [r.getMessage() for r in caplog.records]
    assert all(len(r.getMessage()) < 600 and "\n" not in r.getMessage() for r in warned)


# -- 5. Bodies aiohttp cannot read: a Content-Encoding that does not decode, or that it does not know --

@pytest.mark.parametrize("coding", ["gzip", "deflate"])
async def test_a_body_that_does_not_decode_is_400_naming_the_body_not_a_500(
        gateway: Gateway, caplog: pytest.LogCaptureFixture, coding: str) -> None:
    """aiohttp decodes the body while the handler reads it, so a body that is not the gzip it claims to be
    raised inside the gateway: a 500 INTERNAL with a logged traceback on JSON routes, and on uploads a
    connection closed with no answer at all. Now it is 400 naming the body, and no call is made (an upload's
    call is cancelled, so the service never takes the bytes read so far for the whole file)."""
    headers = {"Content-Encoding": coding, "Content-Type": "application/json"}
    for path in ("/v1/jobs", "/v1/datasets:upload?name=chat&filename=chat.jsonl"):
        status, answer = await gateway.json("POST", path, b"this is not " + coding.encode(), headers)
        assert status == 400 and answer["code"] == 3, (path, status, answer)
        assert f"content-encoding: {coding}" in violations(answer)["body"], answer
    await asyncio.sleep(0.2)  # an upload's call, had it been made, would be recorded by now
    assert gateway.backend.calls == []
    _no_traceback(caplog)


async def test_a_gzip_body_is_read_decoded(gateway: Gateway) -> None:
    import gzip

    data = b'{"messages": []}\n' * 1000
    status, _ = await gateway.json("POST", "/v1/datasets:upload?name=chat&filename=chat.jsonl",
                                   gzip.compress(data), {"Content-Encoding": "gzip"})
    assert status == 200 and gateway.backend.rpcs() == ["UploadDataset"]
    from tuneforge.v1 import dataset_service_pb2 as pb

    head, *chunks = [pb.UploadDatasetRequest.FromString(m) for m in gateway.backend.calls[0][1]]
    assert b"".join(c.chunk for c in chunks) == data
    # Content-Length is the compressed size: not passed on as the file's size, which it is not.
    assert head.metadata.size_bytes == 0


@pytest.mark.parametrize("coding", ["compress", "gzip, gzip", "x-custom", "zstdx"])
async def test_a_body_in_a_coding_the_gateway_does_not_decode_is_415_naming_the_header(
        gateway: Gateway, caplog: pytest.LogCaptureFixture, coding: str) -> None:
    """aiohttp passes a body in a coding it does not know on as it came: the still-encoded bytes were read
    as the JSON body or stored as the dataset file."""
    for method, path, _ in [*BODY_ROUTES[:3], ("POST", "/v1/datasets:upload?name=chat", "")]:
        status, answer = await gateway.json(method, path, b"{}", {"Content-Encoding": coding})
        assert status == 415 and answer["code"] == 3, (method, path, status, answer)
        assert coding in violations(answer)["Content-Encoding"], answer
    assert gateway.backend.calls == []
    _no_traceback(caplog)

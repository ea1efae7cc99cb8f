"""Page tokens at the API: every RPC that takes a `page_token`, found by walking the tuneforge.v1 service
descriptors, answers any token a client can send with OK (empty, or one it returned for this query) or
INVALID_ARGUMENT, never INTERNAL or UNKNOWN. Runs against the real platform (see conftest)."""

from __future__ import annotations

import base64
import importlib
import json
import pkgutil
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import tuneforge.v1
from google.protobuf import descriptor, message_factory
from google.protobuf.internal import encoder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.auth import keyed_channel, make_key
from tests.platform.conftest import ORG, Failure, Seeded

pytestmark = pytest.mark.slow

# Every call the property test makes goes through `call`, and is counted here.
CALLS: Counter[str] = Counter()


def paged_methods() -> list[descriptor.MethodDescriptor]:
    """Every RPC of every tuneforge.v1 service whose request has a `page_token` field."""
    methods = []
    for module in pkgutil.iter_modules(tuneforge.v1.__path__):
        if not module.name.endswith("_service_pb2"):
            continue
        pb2 = importlib.import_module(f"tuneforge.v1.{module.name}")
        for service in pb2.DESCRIPTOR.services_by_name.values():
            methods += [m for m in service.methods if "page_token" in m.input_type.fields_by_name]
    return methods


METHODS = paged_methods()


def test_discovery_finds_every_list_rpc() -> None:
    names = {m.full_name for m in METHODS}
    assert {"tuneforge.v1.DatasetService.ListDatasets", "tuneforge.v1.JobService.ListJobs",
            "tuneforge.v1.EstimationService.ListBaseModels", "tuneforge.v1.MetricsService.ListMetrics",
            } <= names
    assert all(not m.client_streaming for m in METHODS)


@dataclass
class Rpc:
    """One paged RPC, called with raw bytes as its page_token (so invalid UTF-8 can be sent too)."""

    method: descriptor.MethodDescriptor
    base: bytes  # the request without page_token, its other fields filled so the token is what is judged
    invoke: Callable[..., Any]

    @property
    def name(self) -> str:
        return self.method.name

    def call(self, token: bytes | str, page_size: int = 0) -> Any:
        """The response, or the Failure; counted."""
        CALLS[self.name] += 1
        raw = token.encode() if isinstance(token, str) else token
        request = self.base
        if page_size:
            request += _field(self.method.input_type.fields_by_name["page_size"].number, 0,
                              encoder._VarintBytes(page_size))
        if raw:
            request += _field(self.method.input_type.fields_by_name["page_token"].number, 2,
                              encoder._VarintBytes(len(raw)) + raw)
        try:
            response = self.invoke(request, timeout=30)
            if self.method.server_streaming:
                return list(response)
            return response
        except grpc.RpcError as err:
            return Failure.of(err)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return encoder._VarintBytes(number << 3 | wire_type) + payload


def build_rpcs(channel: grpc.Channel, seeded: Seeded) -> list[Rpc]:
    # Values for the fields a paged request may need before its token is looked at.
    context = {"organization": ORG, "job_id": seeded.job_ids[0], "job": seeded.job_ids[0]}
    rpcs = []
    for method in METHODS:
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        request = request_cls()
        for name, value in context.items():
            field = method.input_type.fields_by_name.get(name)
            if field is not None and field.type == field.TYPE_STRING:
                setattr(request, name, value)
        path = f"/{method.containing_service.full_name}/{method.name}"
        make = channel.unary_stream if method.server_streaming else channel.unary_unary
        invoke = make(path, request_serializer=lambda b: b, response_deserializer=response_cls.FromString)
        rpcs.append(Rpc(method, request.SerializeToString(), invoke))
    return rpcs


@pytest.fixture(scope="module")
def rpcs(seeded_platform: Seeded) -> Iterator[list[Rpc]]:
    with grpc.insecure_channel(seeded_platform.address) as channel:
        key = make_key(seeded_platform.address, seeded_platform.platform.data_dir, ORG)
        yield build_rpcs(keyed_channel(channel, key), seeded_platform)


@pytest.fixture(scope="module")
def real_tokens(rpcs: list[Rpc]) -> dict[str, str]:
    """The next_page_token each RPC returns for a first page of one item (where it has a second page)."""
    tokens = {}
    for rpc in rpcs:
        response = rpc.call("", page_size=1)
        assert not isinstance(response, Failure), f"{rpc.name}: {response}"
        if response.next_page_token:
            tokens[rpc.name] = response.next_page_token
    assert {"ListDatasets", "ListJobs", "ListBaseModels"} <= tokens.keys()
    return tokens


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def assert_invalid_page_token(result: Any, what: str) -> None:
    assert isinstance(result, Failure), f"{what}: accepted"
    assert result.code == grpc.StatusCode.INVALID_ARGUMENT, f"{what}: {result}"
    assert result.reason == "INVALID_PAGE_TOKEN", f"{what}: {result}"
    assert result.fields == ["page_token"], f"{what}: {result}"


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
    max_leaves=6,
)


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def tamper(token: str, value: Any, pick: int) -> str:
    """What a client does to an opaque token that looks like base64 JSON: edits the JSON and re-encodes it,
    leaving everything else (a signature, a query fingerprint) as it was."""
    parts = token.split(".")
    for i, part in enumerate(parts):
        try:
            data = json.loads(unb64(part))
        except ValueError:
            continue
        if isinstance(data, dict) and data:
            data[sorted(data)[pick % len(data)]] = value
        else:
            data = value
        parts[i] = b64(json.dumps(data).encode())
        break
    return ".".join(parts)


FORGED = [b64(b'{"x":1}'), b64(b"[1,2]"), b64(b'"job_zzz"'), "x", "a.b", f"{b64(b'1')}.{b64(bytes(32))}"]


def test_each_rpc_reaches_its_token_check(rpcs: list[Rpc], real_tokens: dict[str, str]) -> None:
    """The property test below is only worth something if the token is what each request is judged on:
    an empty token is a first page, a token the RPC returned is the next one, and forged ones, a real
    token cut short or with its JSON edited, and another RPC's token (another query) are
    INVALID_PAGE_TOKEN on `page_token`."""
    for rpc in rpcs:
        first = rpc.call("")
        assert not isinstance(first, Failure), f"{rpc.name}: {first}"
        if rpc.name in real_tokens:
            second = rpc.call(real_tokens[rpc.name], page_size=1)
            assert not isinstance(second, Failure), f"{rpc.name}: {second}"
            assert_invalid_page_token(rpc.call(real_tokens[rpc.name][:-1], page_size=1), f"{rpc.name} cut")
            for cursor in ({"x": 1}, [1, 2], "zzz", None):
                token = tamper(real_tokens[rpc.name], cursor, 0)
                assert_invalid_page_token(rpc.call(token), f"{rpc.name} tampered {token!r}")
        for token in FORGED:
            assert_invalid_page_token(rpc.call(token), f"{rpc.name} {token!r}")
        not_utf8 = rpc.call(b"\xff\xfe")  # not a valid request at all: still the caller's error
        assert isinstance(not_utf8, Failure) and not_utf8.code == grpc.StatusCode.INVALID_ARGUMENT, not_utf8
        for other, token in real_tokens.items():
            if other != rpc.name:
                assert_invalid_page_token(rpc.call(token), f"{rpc.name} with {other}'s token")


def mutations(token: str) -> st.SearchStrategy[str]:
    """A real token cut, extended, or with one character replaced."""
    return st.one_of(
        st.integers(0, len(token) - 1).map(lambda n: token[:n]),
        st.text(min_size=1, max_size=8).map(lambda tail: token + tail),
        st.tuples(st.integers(0, len(token) - 1), st.characters()).map(
            lambda edit: token[:edit[0]] + edit[1] + token[edit[0] + 1:]),
    )


def test_no_page_token_is_an_internal_error(rpcs: list[Rpc], real_tokens: dict[str, str]) -> None:
    before = sum(CALLS.values())
    tokens = st.one_of(
        st.binary(max_size=200),  # raw bytes: often not UTF-8, so not even a valid request
        st.text(max_size=200),
        st.binary(max_size=120).map(b64),
        st.tuples(st.binary(max_size=60), st.binary(min_size=32, max_size=32)).map(
            lambda parts: f"{b64(parts[0])}.{b64(parts[1])}"),
        st.sampled_from(FORGED),
        st.sampled_from(sorted(real_tokens.values())),
        *[mutations(t) for t in real_tokens.values()],
        st.builds(tamper, st.sampled_from(sorted(real_tokens.values())), JSON, st.integers(0, 3)),
    )

    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(index=st.integers(0, len(rpcs) - 1), token=tokens)
    def check(index: int, token: bytes | str) -> None:
        rpc = rpcs[index]
        result = rpc.call(token)
        text = token.decode(errors="replace") if isinstance(token, bytes) else token
        if isinstance(result, Failure):
            assert result.code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (
                f"{rpc.name} page_token={token!r}: {result}")
            assert result.code == grpc.StatusCode.INVALID_ARGUMENT, f"{rpc.name} {token!r}: {result}"
            assert token != real_tokens.get(rpc.name), f"{rpc.name} refused its own token: {result}"
            if result.reason == "INVALID_PAGE_TOKEN":
                assert result.fields == ["page_token"]
            elif "\x00" in text and result.fields == ["page_token"]:
                # Any string holding a NUL is refused by the call pipeline, naming its field.
                assert "NUL" in result.message, f"{rpc.name} {token!r}: {result}"
            else:  # only a request that does not parse may fail on something else than its token
                assert isinstance(token, bytes) and text.encode() != token, f"{rpc.name} {token!r}: {result}"
        else:
            assert not token or text == real_tokens.get(rpc.name), f"{rpc.name} accepted {token!r}"

    check()
    made = sum(CALLS.values()) - before
    per_rpc = ", ".join(f"{name} {count}" for name, count in sorted(CALLS.items()))
    print(f"\npage token property test: {made} calls (this module, by RPC: {per_rpc})")
    assert made >= 100

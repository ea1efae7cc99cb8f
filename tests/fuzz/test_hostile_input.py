"""Hostile input at the API: every RPC of every tuneforge.v1 service answers whatever a client sends with a
deliberate status, never INTERNAL or UNKNOWN.

The RPCs are found by walking the `tuneforge.v1.*_service_pb2` descriptors, so a new RPC is fuzzed the day it
is added. Requests are generated from the request descriptors, recursively: every field may be set, to
random and boundary values (negative, zero and the largest ints, NaN, infinities and -0.0, empty, 1 MiB,
unicode and control-character strings, enum numbers no server knows, empty and long repeated fields and
maps, nested messages), with the seeded ids and names mixed in so calls get past the first lookup. Beside
them go bytes that are no valid request at all (invalid UTF-8 in each string field, truncated frames,
random bytes), which must be INVALID_ARGUMENT when they cannot be decoded, and messages over the server's
limit, which must be RESOURCE_EXHAUSTED. Calls go through raw channel methods (the request serializer is
the identity), so what is sent is exactly the bytes chosen. Client-streaming RPCs (UploadDataset,
ValidateDataset) get streams of such frames, and uploads with valid metadata and hostile files;
server-streaming RPCs are read to their first response under a short deadline, then cancelled.

Runs against the whole platform as `tuneforge up` runs it (see conftest), in about a minute on two cores;
the calls made per RPC and in all are printed in the terminal summary.
"""

from __future__ import annotations

import io
import json
import math
import threading
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor, message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.internal import encoder
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tuneforge.v1 import dataset_pb2, dataset_service_pb2, estimation_service_pb2, identity_pb2

from tests.auth import keyed_channel, make_key
from tests.descriptors import service_methods
from tests.platform.conftest import ORG, Seeded

MIB = 1024 * 1024
SERVER_LIMIT = 16 * MIB  # services.kit.runtime.MAX_MESSAGE_BYTES
UNARY_TIMEOUT_S = 60.0
STREAM_TIMEOUT_S = 0.5  # server streams: read the first response (or fail) within this, then cancel
NOT_DELIBERATE = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})

CALLS: Counter[str] = Counter()
COUNTING = threading.Lock()


METHODS = service_methods()
# RevokeApiKey: its base names no key (a revoked fuzz key would end the run), so it is not judged OK.
DESTRUCTIVE = ("DeleteDataset", "CancelJob", "DeleteJob", "RevokeApiKey")


def destructive_last(item: Any) -> tuple[bool, str]:
    """Calls that delete or cancel the seeded resources run after the others, which need them."""
    method = item.method if isinstance(item, Rpc) else item
    return method.name in DESTRUCTIVE, method.full_name


# -- calling an RPC with exactly the bytes chosen ------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    details: str


@dataclass
class Rpc:
    method: descriptor.MethodDescriptor
    invoke: Callable[..., Any]

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def request_cls(self) -> type[Message]:
        return message_factory.GetMessageClass(self.method.input_type)

    def call(self, payload: bytes | Sequence[bytes], stream_timeout_s: float = STREAM_TIMEOUT_S) -> Outcome:
        """The status of one call: `payload` is the request, or the frames of a client stream. A server
        stream is read to its first response within `stream_timeout_s`, then cancelled."""
        with COUNTING:
            CALLS[self.name] += 1
        try:
            if self.method.client_streaming:
                frames = [payload] if isinstance(payload, bytes) else list(payload)
                request: Any = iter(frames)
            else:
                assert isinstance(payload, bytes)
                request = payload
            if not self.method.server_streaming:
                self.invoke(request, timeout=UNARY_TIMEOUT_S)
                return Outcome(grpc.StatusCode.OK, "")
            responses = self.invoke(request, timeout=stream_timeout_s)
            try:
                next(responses, None)
            finally:
                responses.cancel()
            return Outcome(grpc.StatusCode.OK, "")
        except grpc.RpcError as err:
            return Outcome(err.code(), err.details() or "")  # type: ignore[attr-defined]


def rpc_for(channel: grpc.Channel, method: descriptor.MethodDescriptor) -> Rpc:
    path = f"/{method.containing_service.full_name}/{method.name}"
    make = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[(method.client_streaming, method.server_streaming)]
    # Identity serializers: the bytes sent are the bytes chosen, and responses are not parsed.
    return Rpc(method, make(path, request_serializer=lambda b: b, response_deserializer=lambda b: b))


class Findings:
    """Every answer that was not deliberate (or not the code expected), kept so one run reports them all."""

    def __init__(self) -> None:
        self.items: dict[tuple[str, str, str], str] = {}

    def check(self, rpc: Rpc, outcome: Outcome, what: str, expected: grpc.StatusCode | None = None) -> None:
        # A status too large for the trailers is refused by the client (RESOURCE_EXHAUSTED): the server's
        # answer never arrived, so it counts as undeliberate.
        lost = (outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                and "metadata size exceeds" in outcome.details)
        wrong = lost or outcome.code in NOT_DELIBERATE or (expected is not None and outcome.code != expected)
        if wrong:
            key = (rpc.name, outcome.code.name, what.split(":")[0])
            self.items.setdefault(key, f"{rpc.name} {what}: {outcome.code.name} {outcome.details[:200]!r}"
                                  + (f" (expected {expected.name})" if expected else ""))

    def assert_none(self, platform: Seeded) -> None:
        log = platform.platform.logs_dir / "services.log"
        assert not self.items, (f"{len(self.items)} undeliberate answers (tracebacks in {log}):\n"
                                + "\n".join(sorted(self.items.values())))


# -- values: random and boundary, per field type ---------------------------------------------------------

INT32_EDGES = [0, 1, -1, 2**31 - 1, -(2**31), 2**31 - 2, 100, 4096]
INT64_EDGES = [*INT32_EDGES, 2**63 - 1, -(2**63), 2**32, 2**53 + 1]
UINT32_EDGES = [0, 1, 2**32 - 1, 2**31]
UINT64_EDGES = [0, 1, 2**64 - 1, 2**63]
FLOAT_EDGES = [math.nan, math.inf, -math.inf, -0.0, 0.0, 1e308, -1e308, 5e-324, 1e-9, 0.5, 1.0, 2.0]
MIB_STRING = "x" * MIB
STRING_EDGES = [
    "", " ", MIB_STRING, "é漢字🙂Ω", "\x00", "\x01\x02\x7f\x1b[2J\r\n\t", "\u202e\u200b\ufeff", "a" * 64,
    "A" * 1025, "../../etc/passwd", "/etc/passwd", "file:///etc/passwd", "s3://", "s3://b/k", "hf://x/y",
    "{prompt:>50000000}", "{prompt!r}", "{0}", "%s%n%x", "'; DROP TABLE datasets;--", "null", "*",
    "a/b/c", "-1", "nan", "\\", "\U0010ffff",
]
ENUM_EXTRAS = [99, -1, 2**31 - 1, -(2**31)]
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
MAX_DEPTH = 5

INT_TYPES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1, INT32_EDGES),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1, INT32_EDGES),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1, INT32_EDGES),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1, INT64_EDGES),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1, INT64_EDGES),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1, INT64_EDGES),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1, UINT32_EDGES),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1, UINT32_EDGES),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1, UINT64_EDGES),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1, UINT64_EDGES),
}
# What a long repeated field repeats: small, so 1000 of them stay far below the message limit.
SMALL = {
    FieldDescriptor.TYPE_STRING: "a",
    FieldDescriptor.TYPE_BYTES: b"a",
    FieldDescriptor.TYPE_BOOL: True,
    FieldDescriptor.TYPE_ENUM: 1,
    FieldDescriptor.TYPE_DOUBLE: 1.0,
    FieldDescriptor.TYPE_FLOAT: 1.0,
}


class Values:
    """Strategies for every field of a request, with the seeded platform's ids and names mixed into the
    string fields that take them (by field name), so generated calls reach past the first lookup."""

    def __init__(self, context: dict[str, st.SearchStrategy[str]]) -> None:
        self.context = context
        self._messages: dict[tuple[str, int], st.SearchStrategy[Message]] = {}

    def string(self, field: FieldDescriptor) -> st.SearchStrategy[str]:
        known = self.context.get(field.name)
        plain = st.one_of(st.sampled_from(STRING_EDGES), TEXT)
        return plain if known is None else st.one_of(known, known, plain)

    def scalar(self, field: FieldDescriptor) -> st.SearchStrategy[Any]:
        t = field.type
        if t in INT_TYPES:
            lo, hi, edges = INT_TYPES[t]
            return st.one_of(st.sampled_from(edges), st.sampled_from(edges), st.integers(lo, hi))
        if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            width = 64 if t == field.TYPE_DOUBLE else 32
            return st.one_of(st.sampled_from(FLOAT_EDGES), st.floats(width=width))
        if t == FieldDescriptor.TYPE_BOOL:
            return st.booleans()
        if t == FieldDescriptor.TYPE_STRING:
            return self.string(field)
        if t == FieldDescriptor.TYPE_BYTES:
            return st.one_of(st.binary(max_size=64), st.sampled_from([b"", b"\xff" * 16, b"\x00" * MIB]))
        if t == FieldDescriptor.TYPE_ENUM:
            return st.sampled_from([v.number for v in field.enum_type.values] + ENUM_EXTRAS)
        raise AssertionError(f"unhandled field type {t} of {field.full_name}")

    def element(self, field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            return self.message(field.message_type, depth + 1)
        return self.scalar(field)

    def field(self, field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
        if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
            key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            small_value = self._small(value)
            return st.one_of(
                st.dictionaries(self.scalar(key), self.element(value, depth), max_size=3),
                st.just({f"k{i}": small_value for i in range(1000)} if key.type == key.TYPE_STRING
                        else {i: small_value for i in range(1000)}),
            )
        if field.is_repeated:
            small = self._small(field)
            return st.one_of(st.just([]), st.lists(self.element(field, depth), min_size=1, max_size=3),
                             st.just([small] * 1000))
        return self.element(field, depth)

    @staticmethod
    def _small(field: FieldDescriptor) -> Any:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            return message_factory.GetMessageClass(field.message_type)()
        return SMALL.get(field.type, 1)

    def message(self, desc: descriptor.Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
        key = (desc.full_name, depth)
        if key not in self._messages:
            cls = message_factory.GetMessageClass(desc)
            if depth > MAX_DEPTH:
                self._messages[key] = st.builds(cls)
            else:
                optional = {f.name: st.deferred(lambda f=f: self.field(f, depth)) for f in desc.fields}
                self._messages[key] = st.fixed_dictionaries({}, optional=optional).map(
                    lambda values, cls=cls, desc=desc: build(cls, desc, values))
        return self._messages[key]


def build(cls: type[Message], desc: descriptor.Descriptor, values: dict[str, Any]) -> Message:
    msg = cls()
    for name, value in values.items():
        field = desc.fields_by_name[name]
        target = getattr(msg, name)
        if field.type == field.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
            for k, v in value.items():
                if isinstance(v, Message):
                    target[k].CopyFrom(v)
                else:
                    target[k] = v
        elif field.is_repeated:
            target.extend(value)
        elif field.type == field.TYPE_MESSAGE:
            target.CopyFrom(value)
        else:
            setattr(msg, name, value)
    return msg


# -- bytes that are no valid request ---------------------------------------------------------------------


def _tag(number: int, wire_type: int) -> bytes:
    return encoder._VarintBytes(number << 3 | wire_type)


def _delimited(number: int, payload: bytes) -> bytes:
    return _tag(number, 2) + encoder._VarintBytes(len(payload)) + payload


def string_paths(desc: descriptor.Descriptor, depth: int = 0,
                 seen: frozenset[str] = frozenset()) -> Iterator[list[FieldDescriptor]]:
    """Paths to every string field reachable from `desc` (through singular and repeated messages)."""
    for field in desc.fields:
        if field.type == field.TYPE_STRING:
            yield [field]
        elif (field.type == field.TYPE_MESSAGE and depth < 3 and field.message_type.full_name not in seen):
            for rest in string_paths(field.message_type, depth + 1, seen | {desc.full_name}):
                yield [field, *rest]


def invalid_utf8_at(path: list[FieldDescriptor], value: bytes = b"ok\xff\xfe\xc0\x80") -> bytes:
    """A request whose string field at `path` holds bytes that are not UTF-8 (so it cannot be decoded)."""
    payload = _delimited(path[-1].number, value)
    for field in reversed(path[:-1]):
        payload = _delimited(field.number, payload)
    return payload


# Frames no parser accepts: a cut varint, a length past the end, a group that never ends, a bad wire type.
UNDECODABLE = [
    b"\x08",
    b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
    b"\x0a\x05ab",
    b"\x0a\xff\xff\xff\xff\x0f",
    b"\x0b\x08\x01",
    b"\x0f",
    b"\x00",
]
RANDOM = [b"\xff" * 32, bytes(range(256)), b"\x12\x00" * 100, b"PK\x03\x04" + b"\x00" * 40, b"{}"]


# -- one field at a time: each leaf of an otherwise valid request set to each of its boundary values -------

SWEEP_INTS = {
    FieldDescriptor.TYPE_INT32: [0, -1, 2**31 - 1, -(2**31)],
    FieldDescriptor.TYPE_INT64: [0, -1, 2**63 - 1, -(2**63)],
    FieldDescriptor.TYPE_UINT32: [0, 2**32 - 1],
    FieldDescriptor.TYPE_UINT64: [0, 2**64 - 1],
}
SWEEP_OTHERS: dict[int, list[Any]] = {
    FieldDescriptor.TYPE_DOUBLE: [math.nan, math.inf, -math.inf, -0.0],
    # Empty, 1 MiB, control characters, and 20 kB no id or name accepts (quoted back, it must still fit).
    FieldDescriptor.TYPE_STRING: ["", MIB_STRING, "\x00\x1b[2J\u202e\ud7ff\n", "!" * 20_000],
    FieldDescriptor.TYPE_BYTES: [b"", b"\xff" * 16],
    FieldDescriptor.TYPE_ENUM: [99, -1],
    FieldDescriptor.TYPE_BOOL: [True],
}


def sweep_values(field: FieldDescriptor) -> list[Any]:
    """The boundary values one leaf is set to, one call each."""
    if field.type == field.TYPE_MESSAGE:  # a map
        key = field.message_type.fields_by_name["key"]
        value = field.message_type.fields_by_name["value"]
        small = Values._small(value)
        many = {f"k{i}" if key.type == key.TYPE_STRING else i: small for i in range(1000)}
        if key.type != key.TYPE_STRING or value.type != value.TYPE_STRING:
            return [many]
        return [{"": ""}, {"\x00": "\x1b"}, {"k": MIB_STRING}, many]
    scalars = SWEEP_INTS.get(field.type) or SWEEP_OTHERS.get(field.type)
    if scalars is None:
        lo, hi, _ = INT_TYPES[field.type]
        scalars = [lo, hi]
    if field.is_repeated:
        return [*[[v] for v in scalars], [Values._small(field)] * 1000]
    return scalars


def leaf_paths(desc: descriptor.Descriptor, depth: int = 0,
               seen: frozenset[str] = frozenset()) -> Iterator[list[FieldDescriptor]]:
    """Paths to every scalar, repeated scalar and map field reachable from `desc`."""
    for field in desc.fields:
        if field.type != field.TYPE_MESSAGE or field.message_type.GetOptions().map_entry:
            yield [field]
        elif depth < 4 and field.message_type.full_name not in seen:
            for rest in leaf_paths(field.message_type, depth + 1, seen | {desc.full_name}):
                yield [field, *rest]


def set_path(message: Message, path: list[FieldDescriptor], value: Any) -> None:
    """Sets the leaf at `path` (a repeated message on the way gets one element)."""
    for field in path[:-1]:
        message = getattr(message, field.name).add() if field.is_repeated else getattr(message, field.name)
    leaf = path[-1]
    container = getattr(message, leaf.name)
    if leaf.type == leaf.TYPE_MESSAGE:  # a map
        container.clear()
        for k, v in value.items():
            if isinstance(v, Message):
                container[k].CopyFrom(v)
            else:
                container[k] = v
    elif leaf.is_repeated:
        del container[:]
        container.extend(value)
    else:
        setattr(message, leaf.name, value)


@dataclass
class Bases:
    """Valid requests to mutate: the seeded ids in the fields that take them, a valid job spec, and, for an
    upload, metadata with a fresh name followed by a small valid file."""

    organization: str
    dataset: str
    job: str
    gpu_type: str
    counter: int = 0

    def fresh(self) -> str:
        self.counter += 1
        return f"sweep-{self.counter}"

    def request(self, desc: descriptor.Descriptor) -> Message:
        message = message_factory.GetMessageClass(desc)()
        strings = {"organization": self.organization, "dataset": self.dataset, "job": self.job,
                   "job_id": self.job, "base_model": "Qwen/Qwen2.5-0.5B", "model_id": "Qwen/Qwen2.5-0.5B",
                   "name": self.fresh()}
        for field in desc.fields:
            if field.type == field.TYPE_STRING and not field.is_repeated and field.name in strings:
                setattr(message, field.name, strings[field.name])
            elif field.type == field.TYPE_MESSAGE and field.message_type.full_name in (
                    "tuneforge.v1.JobSpec", "tuneforge.v1.UploadDatasetMetadata"):
                getattr(message, field.name).CopyFrom(self.request(field.message_type))
        if desc.full_name == "tuneforge.v1.JobSpec":
            message.dataset = self.dataset  # type: ignore[attr-defined]
            message.hardware.gpu_type = self.gpu_type  # type: ignore[attr-defined]
        if desc.full_name == "tuneforge.v1.UploadDatasetMetadata":
            message.min_examples = 1  # type: ignore[attr-defined]
        if desc.full_name == "tuneforge.v1.CreateApiKeyRequest":
            message.role = identity_pb2.ROLE_VIEWER  # type: ignore[attr-defined]
        return message

    def payload(self, method: descriptor.MethodDescriptor, message: Message) -> bytes | list[bytes]:
        raw = message.SerializeToString()
        if method.client_streaming:
            chunk = dataset_service_pb2.UploadDatasetRequest(chunk=CHAT).SerializeToString()
            return [raw, chunk]
        return raw


# -- hostile files for UploadDataset / ValidateDataset ----------------------------------------------------


def _chat(i: int, content: str = "") -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content or f"What is {i} + {i}?"},
                         {"role": "assistant", "content": f"{2 * i}"}]}


def _jsonl(rows: Sequence[Any]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _zip(entries: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


CHAT = _jsonl([_chat(i) for i in range(5)])
# Past the first 100 lines (format detection), plain chat lines take the fast path: a hostile line there
# meets other code than in the first 100.
BULK = _jsonl([_chat(i) for i in range(130)])
HOSTILE_FILES: dict[str, bytes] = {
    "chat": CHAT,
    "invalid-utf8": CHAT + b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}\n' + CHAT,
    "invalid-utf8-late": BULK + b'{"messages": [{"role": "user", "content": "\xff\xfe"}, '
                                b'{"role": "assistant", "content": "x"}]}\n' + BULK,
    "lone-surrogate": CHAT + b'{"messages": [{"role": "user", "content": "\\ud800"}, '
                             b'{"role": "assistant", "content": "x"}]}\n',
    "lone-surrogate-late": BULK + b'{"messages": [{"role": "user", "content": "\\udfff"}, '
                                  b'{"role": "assistant", "content": "x"}]}\n',
    "5000-digit-int": CHAT + b'{"messages": [], "n": ' + b"9" * 5000 + b"}\n",
    "5000-digit-int-late": BULK + b'{"messages": [{"role": "user", "content": "a"}], "n": '
                           + b"9" * 5000 + b"}\n",
    "huge-float": CHAT + b'{"messages": [{"role": "user", "content": "a"}], "w": 1e99999}\n',
    "nan": b'{"messages": [{"role": "user", "content": "a", "weight": NaN}]}\n' * 3,
    "deep": b"[" * 100_000 + b"\n",
    "nul": b"\x00" * 4096,
    "no-newline": CHAT.rstrip(b"\n") + b"\n" + b'{"messages": [',
    "prompt-completion": _jsonl([{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(5)]),
    "csv": b"prompt,completion\n" + b"".join(b"p%d,c%d\n" % (i, i) for i in range(5)) + b'"open,\n',
    "csv-bad-utf8": b"prompt,completion\n\xff\xfe,x\n",
    "zip": _zip({"train.jsonl": CHAT}),
    "zip-traversal": _zip({"../train.jsonl": CHAT}),
    "zip-ratio": _zip({"train.jsonl": CHAT, "pad.bin": bytes(2 * MIB)}),
    "zip-garbage": b"PK\x03\x04" + bytes(range(256)) * 4,
    "parquet-garbage": b"PAR1" + bytes(range(256)) * 4 + b"PAR1",
}
TEMPLATES = ["", "{prompt}", "<s>{system_prompt} {prompt}", "{prompt:>50000}", "{prompt!r}", "{prompt.real}",
             "{prompt[0]}", "{0}", "{}", "{prompt", "}{prompt}{", "{{prompt}}"]


# -- the fixtures and tests -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def channel(fuzz_platform: Seeded) -> Iterator[grpc.Channel]:
    options = [("grpc.max_receive_message_length", 64 * MIB)]  # the server's limits are what is tested
    with grpc.insecure_channel(fuzz_platform.address, options=options) as ch:
        # An admin key of ORG: every RPC, key management included, gets past authentication.
        yield keyed_channel(ch, make_key(fuzz_platform.address, fuzz_platform.platform.data_dir, ORG))


@pytest.fixture(scope="module")
def rpcs(channel: grpc.Channel) -> dict[str, Rpc]:
    return {m.full_name: rpc_for(channel, m) for m in METHODS}


def calls_line() -> str:
    """The calls made, per RPC and in all (printed in the terminal summary by conftest)."""
    per_rpc = ", ".join(f"{name} {count}" for name, count in sorted(CALLS.items()))
    return f"hostile input: {sum(CALLS.values())} calls over {len(CALLS)} RPCs ({per_rpc})"


@pytest.fixture(scope="module")
def gpu_types(channel: grpc.Channel) -> list[str]:
    hardware = estimation_service_pb2.ListHardwareOptionsResponse.FromString(channel.unary_unary(
        "/tuneforge.v1.EstimationService/ListHardwareOptions", request_serializer=lambda b: b,
        response_deserializer=lambda b: b)(b"", timeout=UNARY_TIMEOUT_S))
    """The catalog's GPU types, largest memory first (the first fits the seeded job's small model)."""
    gpus = sorted((o for o in hardware.options if o.gpu_type != "cpu"), key=lambda o: -o.memory_bytes)
    return [o.gpu_type for o in gpus]


@pytest.fixture(scope="module")
def values(fuzz_platform: Seeded, gpu_types: list[str]) -> Values:
    datasets = st.sampled_from([*fuzz_platform.dataset_ids, "chat-0", "chat-1"])
    jobs = st.sampled_from(fuzz_platform.job_ids)
    models = st.sampled_from(["Qwen/Qwen2.5-0.5B", "meta-llama/Llama-3.1-8B", "org/model-7B"])
    fresh = st.uuids().map(lambda u: f"fuzz-{u.hex[:12]}")
    return Values({
        "organization": st.just(ORG), "dataset": datasets, "validation_dataset": datasets, "job": jobs,
        "job_id": jobs, "base_model": models, "model_id": models, "teacher_model": models,
        "reference_model": models, "reward_model": models,
        "gpu_type": st.sampled_from([*gpu_types, "cpu"]),
        "name": fresh, "request_id": fresh, "sha256": st.sampled_from(["0" * 64, "F" * 64]),
        "paths": st.sampled_from(["description", "name", "*", "state"]),
        "target_modules": st.sampled_from(["q_proj", "all-linear"]),
        "family": st.sampled_from(["qwen2", "llama"]),
    })


def test_discovery_finds_every_rpc_and_shape() -> None:
    names = {m.full_name for m in METHODS}
    assert {"tuneforge.v1.DatasetService.UploadDataset", "tuneforge.v1.JobService.WatchJob",
            "tuneforge.v1.EstimationService.PlanJob", "tuneforge.v1.MetricsService.StreamLogs"} <= names
    assert len(METHODS) >= 24
    assert any(m.client_streaming for m in METHODS) and any(m.server_streaming for m in METHODS)


def test_undecodable_requests_are_invalid_argument(rpcs: dict[str, Rpc], fuzz_platform: Seeded) -> None:
    """Invalid UTF-8 in each string field (nested ones too), truncated and malformed frames: each is
    INVALID_ARGUMENT, as the first frame of a stream and after valid metadata alike. Random bytes that
    happen to parse may get any deliberate answer."""
    findings = Findings()
    for rpc in rpcs.values():
        paths = list(string_paths(rpc.method.input_type))
        assert paths or not rpc.method.input_type.fields, rpc.name
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        for path in paths:
            findings.check(rpc, rpc.call(invalid_utf8_at(path)),
                           f"invalid UTF-8 in {'.'.join(f.name for f in path)}", invalid)
        valid = rpc.request_cls()
        for field in rpc.method.input_type.fields:
            if field.type == field.TYPE_STRING and not field.is_repeated:
                setattr(valid, field.name, "abcdef")
        whole = valid.SerializeToString()
        if whole:
            findings.check(rpc, rpc.call(whole[:-1]), "truncated request", invalid)
        for frame in UNDECODABLE:
            findings.check(rpc, rpc.call(frame), f"undecodable {frame[:12]!r}", invalid)
        for frame in RANDOM:
            findings.check(rpc, rpc.call(frame), f"random bytes {frame[:12]!r}")
        if rpc.method.client_streaming:
            metadata = _delimited(1, dataset_service_pb2.UploadDatasetMetadata(
                organization=ORG, name="fuzz-garbage", min_examples=1).SerializeToString())
            for frame in [*UNDECODABLE, invalid_utf8_at(paths[0])]:
                findings.check(rpc, rpc.call([metadata, _delimited(2, CHAT), frame]),
                               f"garbage frame {frame[:12]!r} after metadata", invalid)
            for frame in RANDOM:
                findings.check(rpc, rpc.call([metadata, frame]),
                               f"random frame {frame[:12]!r} after metadata")
    findings.assert_none(fuzz_platform)


def test_oversize_messages_are_resource_exhausted(rpcs: dict[str, Rpc], fuzz_platform: Seeded) -> None:
    """A message over the server's limit is RESOURCE_EXHAUSTED (the server refuses it before parsing);
    a stream's chunks are small frames, so only an oversize frame is refused. The limit is the server's,
    enforced before any handler runs, so one RPC of each service and call shape stands for the others
    (16 MiB a call is what this test costs)."""
    findings = Findings()
    oversize = _delimited(1000, bytes(SERVER_LIMIT + 1))
    shapes: dict[tuple[str, bool, bool], Rpc] = {}
    for r in sorted(rpcs.values(), key=destructive_last):
        shapes.setdefault((r.method.containing_service.name, r.method.client_streaming,
                           r.method.server_streaming), r)
    for rpc in shapes.values():
        # Sending 16 MiB takes longer than a server stream's usual deadline.
        findings.check(rpc, rpc.call(oversize, stream_timeout_s=UNARY_TIMEOUT_S), "oversize request",
                       grpc.StatusCode.RESOURCE_EXHAUSTED)
        if rpc.method.client_streaming:
            metadata = _delimited(1, dataset_service_pb2.UploadDatasetMetadata(
                organization=ORG, name="fuzz-oversize", min_examples=1).SerializeToString())
            findings.check(rpc, rpc.call([metadata, _delimited(2, bytes(SERVER_LIMIT + 1))]),
                           "oversize chunk", grpc.StatusCode.RESOURCE_EXHAUSTED)
    findings.assert_none(fuzz_platform)


SWEEP_CONCURRENCY = 4  # calls in flight at once: the server waits on its database and storage too


# The base request is refused only where no valid one can be made here: no source can be read offline.
# Bases that cannot be answered OK on the fuzz platform: its jobs never run, so there is no SUCCEEDED job to
# deploy nor a deployment to name; each field is still swept, and every answer must be deliberate.
BASE_REFUSED = {"CreateDataset": "source: is required",
                "CreateDeployment": "only a SUCCEEDED job's model can be deployed",
                "GetDeployment": "deployment: is required", "DeleteDeployment": "deployment: is required"}


def test_each_field_at_its_boundaries(rpcs: dict[str, Rpc], fuzz_platform: Seeded,
                                      gpu_types: list[str]) -> None:
    """Every leaf field of every request, one at a time on an otherwise valid request (each base is
    checked to be answered OK), at each of its boundary values: the systematic part (random combinations
    follow)."""
    findings = Findings()
    bases = Bases(ORG, fuzz_platform.dataset_ids[0], fuzz_platform.job_ids[0], gpu_types[0])
    refused = {}
    with ThreadPoolExecutor(max_workers=SWEEP_CONCURRENCY) as pool:
        for rpc in sorted(rpcs.values(), key=destructive_last):
            if rpc.name not in DESTRUCTIVE:  # the base itself is valid, so each value is what is judged
                base = rpc.call(bases.payload(rpc.method, bases.request(rpc.method.input_type)))
                expected = BASE_REFUSED.get(rpc.name)
                ok = base.code in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED)
                if ok == bool(expected) or (expected and expected not in base.details):
                    refused[rpc.name] = f"{base.code.name} {base.details[:200]}"
            calls = []
            for path in leaf_paths(rpc.method.input_type):
                for value in sweep_values(path[-1]):
                    request = bases.request(rpc.method.input_type)
                    set_path(request, path, value)
                    where = ".".join(f.name for f in path)
                    calls.append((f"{where}={value!r:.60}", bases.payload(rpc.method, request)))
            outcomes = pool.map(rpc.call, [payload for _, payload in calls])
            for (what, _), outcome in zip(calls, outcomes, strict=True):
                findings.check(rpc, outcome, what)
    findings.assert_none(fuzz_platform)
    assert refused == {}


# Examples per RPC: the streaming ones cost more (an upload is validated and split; a server stream may
# wait out its deadline).
EXAMPLES = 30
STREAM_EXAMPLES = 12
UPLOAD_EXAMPLES = 20


def _examples(method: descriptor.MethodDescriptor) -> int:
    if method.client_streaming:
        return UPLOAD_EXAMPLES
    return STREAM_EXAMPLES if method.server_streaming else EXAMPLES


def _payloads(values: Values, method: descriptor.MethodDescriptor) -> st.SearchStrategy[Any]:
    """Requests generated from the descriptor (mostly), or random bytes; a list of frames for a stream."""
    frame = st.one_of(*[values.message(method.input_type).map(lambda m: m.SerializeToString())] * 4,
                      st.binary(max_size=200))
    if method.client_streaming:
        return st.lists(frame, max_size=4)
    return frame


ORDERED = sorted(METHODS, key=destructive_last)


@pytest.mark.parametrize("method", ORDERED, ids=[m.full_name.removeprefix("tuneforge.v1.") for m in ORDERED])
def test_generated_requests_get_deliberate_statuses(method: descriptor.MethodDescriptor, rpcs: dict[str, Rpc],
                                                   values: Values, fuzz_platform: Seeded) -> None:
    """Random combinations: a failure here raises at once, so hypothesis shrinks it to a small request."""
    rpc = rpcs[method.full_name]

    @settings(max_examples=_examples(method), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(payload=_payloads(values, method))
    def check(payload: Any) -> None:
        findings = Findings()
        findings.check(rpc, rpc.call(payload), f"generated {payload!r:.300}")
        findings.assert_none(fuzz_platform)

    check()


def _upload_frames(metadata: dataset_service_pb2.UploadDatasetMetadata, data: bytes, cuts: int,
                   garbage: bytes | None) -> list[bytes]:
    frames = [dataset_service_pb2.UploadDatasetRequest(metadata=metadata).SerializeToString()]
    step = max(1, len(data) // (cuts + 1))
    frames += [dataset_service_pb2.UploadDatasetRequest(chunk=data[i:i + step]).SerializeToString()
               for i in range(0, len(data), step)]
    if garbage is not None:
        frames.insert(len(frames) // 2 + 1, garbage)
    return frames


@st.composite
def hostile_uploads(draw: st.DrawFn) -> list[bytes]:
    """Valid metadata (so the file is read) with hostile options and a hostile file."""
    name = draw(st.sampled_from(sorted(HOSTILE_FILES)))
    data = HOSTILE_FILES[name]
    metadata = dataset_service_pb2.UploadDatasetMetadata(
        organization=ORG, name=f"fuzz-{draw(st.uuids()).hex[:12]}", filename=f"{name}.bin",
        min_examples=draw(st.sampled_from([1, 1, 2**63 - 1])),
        format=draw(st.sampled_from([0, 0, 1, 4, 5, 99])),
        request_id=draw(st.sampled_from(["", "", "fuzz-reused-1", "fuzz-reused-2"])),
        options=dataset_pb2.DatasetOptions(
            prompt_template=draw(st.sampled_from(TEMPLATES)),
            system_prompt=draw(st.sampled_from(["", "Be brief.", "{prompt}", MIB_STRING])),
            max_samples=draw(st.sampled_from([1, 3, 2**63 - 1]))))
    if draw(st.booleans()):
        metadata.size_bytes = draw(st.sampled_from([len(data), len(data) + 1, 2**63 - 1]))
    if draw(st.booleans()):
        metadata.issue_limit = draw(st.sampled_from([1, 1000, 2**31 - 1]))
    if draw(st.booleans()):
        metadata.column_mapping.columns.update(draw(st.sampled_from(
            [{"prompt": "completion"}, {"": ""}, {"messages": "x" * 1000}])))
    garbage = draw(st.one_of(st.none(), st.none(), st.sampled_from([*UNDECODABLE, *RANDOM])))
    return _upload_frames(metadata, data, draw(st.integers(0, 3)), garbage)


@pytest.mark.parametrize("name", ["UploadDataset", "ValidateDataset"])
def test_hostile_uploads_get_deliberate_statuses(name: str, rpcs: dict[str, Rpc],
                                                 fuzz_platform: Seeded) -> None:
    rpc = rpcs[f"tuneforge.v1.DatasetService.{name}"]

    @settings(max_examples=UPLOAD_EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(frames=hostile_uploads())
    def check(frames: list[bytes]) -> None:
        findings = Findings()
        findings.check(rpc, rpc.call(frames), f"upload {frames[0]!r:.300}")
        findings.assert_none(fuzz_platform)

    check()
    findings = Findings()
    for file_name, data in HOSTILE_FILES.items():  # each file at least once, plainly
        metadata = dataset_service_pb2.UploadDatasetMetadata(organization=ORG, name=f"fuzz-{file_name}",
                                                             min_examples=1)
        findings.check(rpc, rpc.call(_upload_frames(metadata, data, 1, None)), f"file {file_name}")
    findings.assert_none(fuzz_platform)


def _refused_events(platform: Seeded, subject_prefix: str) -> list[str]:
    """The lines of the services log where NATS refused an event of `subject_prefix` as too large: the
    outbox relays in order, so one such event holds back every later one of its service."""
    log = (platform.platform.logs_dir / "services.log").read_text(errors="replace")
    return [line for line in log.splitlines()
            if "maximum payload exceeded" in line and f"publish to {subject_prefix}" in line]


def test_no_dataset_event_outgrows_nats(fuzz_platform: Seeded) -> None:
    """After everything above, no DatasetChanged event was too large to publish: what a dataset carries
    into its events (file name, options) is bounded when it is uploaded."""
    assert _refused_events(fuzz_platform, "tuneforge.events.datasets.")[:3] == []


def test_no_job_event_outgrows_nats(fuzz_platform: Seeded) -> None:
    """Likewise for JobChanged: a job spec is bounded (64 KiB) when CreateJob resolves it."""
    assert _refused_events(fuzz_platform, "tuneforge.events.jobs.")[:3] == []

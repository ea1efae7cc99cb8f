"""Tenant isolation, generated from the service descriptors so that no RPC can be forgotten.

For EVERY RPC of every tuneforge.v1 service: no credential, a revoked, expired, unknown or malformed one
is UNAUTHENTICATED; a viewer calling a WRITE or ADMIN RPC is PERMISSION_DENIED; a request naming
another organization is PERMISSION_DENIED; organization B naming A's resources by id or by name is
NOT_FOUND (streams included), and no answer B gets carries A's ids or names. A new RPC whose request
names a resource fails `test_every_rpc_that_names_a_resource_is_covered` until a case is added here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor
from google.protobuf.message import Message
from tuneforge.v1 import (
    access_pb2,
    api_key_service_pb2,
    audit_service_pb2,
    dataset_pb2,
    dataset_service_pb2,
    deployment_service_pb2,
    estimation_service_pb2,
    identity_pb2,
    job_pb2,
    job_service_pb2,
    metrics_service_pb2,
)

from services.client import TuneForgeClient
from services.kit.auth import method_access
from services.kit.identity import IdentityStore
from tests.auth import make_key
from tests.descriptors import service_methods
from tests.platform.conftest import ORG, Seeded

OTHER = "bravo"
# Request fields that name a resource of the caller's organization.
REFERENCE_FIELDS = {"dataset", "validation_dataset", "job", "job_id", "api_key", "deployment"}


METHODS = service_methods()
IDS = [m.full_name for m in METHODS]


def request_class(method: descriptor.MethodDescriptor) -> type[Message]:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(method.input_type)


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    responses: list[bytes]


def call(channel: grpc.Channel, method: descriptor.MethodDescriptor, request: Message | list[Message],
         metadata: tuple[tuple[str, str], ...] = ()) -> Outcome:
    """One call with raw bytes in and out; a server stream is read to its first response (or its end)."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    frames = request if isinstance(request, list) else [request]
    payloads = [f.SerializeToString() for f in frames]
    kind = (method.client_streaming, method.server_streaming)
    make = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, False): channel.stream_unary, (True, True): channel.stream_stream}[kind]
    invoke: Any = make(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    arg: Any = iter(payloads) if method.client_streaming else payloads[0]
    try:
        if not method.server_streaming:
            return Outcome(grpc.StatusCode.OK, "", [invoke(arg, timeout=30, metadata=metadata)])
        stream = invoke(arg, timeout=5, metadata=metadata)
        try:
            first = next(stream, None)
        finally:
            stream.cancel()
        return Outcome(grpc.StatusCode.OK, "", [first] if first is not None else [])
    except grpc.RpcError as err:
        return Outcome(err.code(), err.details() or "", [])  # type: ignore[attr-defined]


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@dataclass
class Tenants:
    platform: Seeded
    acme_admin: str
    acme_viewer: str
    bravo_admin: str
    revoked: str
    expired: str
    acme_key_id: str
    acme_key_name: str
    dataset_names: list[str]
    job_names: list[str]


@pytest.fixture(scope="module")
def tenants(seeded_platform: Seeded) -> Tenants:
    address, data_dir = seeded_platform.address, seeded_platform.platform.data_dir
    acme_admin = make_key(address, data_dir, ORG, "admin")
    with TuneForgeClient(address, api_key=acme_admin) as acme:
        doomed = acme.create_api_key("tenancy-doomed", identity_pb2.ROLE_ADMIN)
        acme.revoke_api_key(doomed.api_key.id)
        kept = acme.create_api_key("tenancy-kept", identity_pb2.ROLE_MEMBER)
        names = [acme.get_dataset(d).name for d in seeded_platform.dataset_ids]
        job_names = [acme.get_job(j).name for j in seeded_platform.job_ids]
    # An expired key, written through the same store the platform reads (no waiting for a real expiry).
    store = IdentityStore.open(f"sqlite:///{(data_dir / 'identity.db').resolve()}")
    try:
        _key, expired = store.create_key(ORG, "tenancy-expired", identity_pb2.ROLE_ADMIN,
                                         timedelta(seconds=-5), "tests")
    finally:
        store.close()
    return Tenants(seeded_platform, acme_admin, make_key(address, data_dir, ORG, "viewer"),
                   make_key(address, data_dir, OTHER, "admin"), doomed.secret, expired,
                   kept.api_key.id, kept.api_key.name, names, job_names)


@pytest.fixture(scope="module")
def channel(seeded_platform: Seeded) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(seeded_platform.address) as ch:
        yield ch


def minimal(method: descriptor.MethodDescriptor) -> Message | list[Message]:
    """A request that parses (client streams: one metadata frame)."""
    request = request_class(method)()
    if method.client_streaming:
        request.metadata.name = "tenancy-probe"  # type: ignore[attr-defined]
    return [request] if method.client_streaming else request


# -- credentials ---------------------------------------------------------------------------------------

CREDENTIALS: dict[str, Callable[[Tenants], tuple[tuple[str, str], ...]]] = {
    "none": lambda t: (),
    "revoked key": lambda t: bearer(t.revoked),
    "expired key": lambda t: bearer(t.expired),
    "unknown key": lambda t: bearer("tf_" + "A" * 52),
    "not a key": lambda t: bearer("hunter2"),
    "jwt from nowhere": lambda t: bearer("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"),
    "basic auth": lambda t: (("authorization", "Basic YWRtaW46YWRtaW4="),),
}


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_every_rpc_refuses_a_call_without_a_valid_credential(
        method: descriptor.MethodDescriptor, tenants: Tenants, channel: grpc.Channel) -> None:
    for name, credential in CREDENTIALS.items():
        outcome = call(channel, method, minimal(method), credential(tenants))
        assert outcome.code == grpc.StatusCode.UNAUTHENTICATED, (name, outcome)
        assert tenants.revoked not in outcome.details and tenants.expired not in outcome.details


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_every_rpc_declares_its_access_and_a_viewer_only_reads(
        method: descriptor.MethodDescriptor, tenants: Tenants, channel: grpc.Channel) -> None:
    access = method_access(f"/{method.containing_service.full_name}/{method.name}")
    assert access != access_pb2.ACCESS_UNSPECIFIED, f"{method.full_name} declares no access"
    outcome = call(channel, method, minimal(method), bearer(tenants.acme_viewer))
    if access == access_pb2.ACCESS_READ:
        refused = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)
        assert outcome.code not in refused, outcome
    else:
        assert outcome.code == grpc.StatusCode.PERMISSION_DENIED, outcome
        assert "viewer" in outcome.details


def organization_paths(method: descriptor.MethodDescriptor) -> list[tuple[str, ...]]:
    paths: list[tuple[str, ...]] = []
    for field in method.input_type.fields:
        if field.name == "organization":
            paths.append(("organization",))
        elif field.message_type is not None and "organization" in field.message_type.fields_by_name:
            paths.append((field.name, "organization"))
    return paths


@pytest.mark.parametrize("method", [m for m in METHODS if organization_paths(m)],
                         ids=[m.full_name for m in METHODS if organization_paths(m)])
def test_a_request_naming_another_organization_is_refused(
        method: descriptor.MethodDescriptor, tenants: Tenants, channel: grpc.Channel) -> None:
    for path in organization_paths(method):
        request = minimal(method)
        first = request[0] if isinstance(request, list) else request
        holder: Any = first if len(path) == 1 else getattr(first, path[0])
        holder.organization = ORG
        outcome = call(channel, method, request, bearer(tenants.bravo_admin))
        assert outcome.code == grpc.StatusCode.PERMISSION_DENIED, (path, outcome)
        assert "bravo" in outcome.details


# -- organization B naming A's resources ---------------------------------------------------------------

def references(message_type: descriptor.Descriptor, depth: int = 0) -> set[str]:
    """The resource-naming fields of a request type (two levels deep: spec.dataset, metadata...)."""
    found = {f.name for f in message_type.fields if f.name in REFERENCE_FIELDS and f.type == f.TYPE_STRING}
    if depth < 2:
        for f in message_type.fields:
            if f.message_type is not None and not f.message_type.GetOptions().map_entry:
                found |= {f"{f.name}.{n}" for n in references(f.message_type, depth + 1)}
    return found


def spec(dataset: str) -> job_pb2.JobSpec:
    return job_pb2.JobSpec(base_model="Qwen/Qwen2.5-0.5B", dataset=dataset)


def upload_frames(validation: str) -> list[Message]:
    metadata = dataset_service_pb2.UploadDatasetMetadata(name="tenancy-upload", validation_dataset=validation)
    chunk = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
    return [dataset_service_pb2.UploadDatasetRequest(metadata=metadata),
            dataset_service_pb2.UploadDatasetRequest(chunk=chunk * 120)]


def validate_frames(validation: str) -> list[Message]:
    frames = upload_frames(validation)
    return [dataset_service_pb2.ValidateDatasetRequest(metadata=frames[0].metadata),  # type: ignore[attr-defined]
            dataset_service_pb2.ValidateDatasetRequest(chunk=frames[1].chunk)]  # type: ignore[attr-defined]


def split() -> dataset_pb2.SplitConfig:
    return dataset_pb2.SplitConfig(train_fraction=0.8, validation_fraction=0.15, test_fraction=0.05)


# Per RPC: requests from organization B that name one of A's resources (`ref`: an id or a name).
CASES: dict[str, Callable[[str, str], list[Message | list[Message]]]] = {
    # (dataset ref, job ref) -> requests
    "RevokeApiKey": lambda d, j: [],  # filled with key refs in the test
    "GetDataset": lambda d, j: [dataset_service_pb2.GetDatasetRequest(dataset=d)],
    "UpdateDataset": lambda d, j: [dataset_service_pb2.UpdateDatasetRequest(
        dataset=d, description="mine now", update_mask={"paths": ["description"]})],
    "DeleteDataset": lambda d, j: [dataset_service_pb2.DeleteDatasetRequest(dataset=d)],
    "SplitDataset": lambda d, j: [dataset_service_pb2.SplitDatasetRequest(dataset=d, split=split())],
    "GetValidationReport": lambda d, j: [dataset_service_pb2.GetValidationReportRequest(dataset=d)],
    "UploadDataset": lambda d, j: [upload_frames(d)],
    "ValidateDataset": lambda d, j: [validate_frames(d)],
    "EstimateJob": lambda d, j: [estimation_service_pb2.EstimateJobRequest(spec=spec(d))],
    "ValidateHardware": lambda d, j: [estimation_service_pb2.ValidateHardwareRequest(spec=spec(d))],
    "EstimateCost": lambda d, j: [estimation_service_pb2.EstimateCostRequest(spec=spec(d)),
                                  estimation_service_pb2.EstimateCostRequest(spec=spec(""), job_id=j)],
    "PlanJob": lambda d, j: [estimation_service_pb2.PlanJobRequest(spec=spec(d))],
    "CreateJob": lambda d, j: [job_service_pb2.CreateJobRequest(spec=spec(d)),
                               job_service_pb2.CreateJobRequest(spec=job_pb2.JobSpec(
                                   base_model="Qwen/Qwen2.5-0.5B", dataset="chat-0", validation_dataset=d))],
    "GetJob": lambda d, j: [job_service_pb2.GetJobRequest(job=j)],
    "CancelJob": lambda d, j: [job_service_pb2.CancelJobRequest(job=j)],
    "DeleteJob": lambda d, j: [job_service_pb2.DeleteJobRequest(job=j)],
    "WatchJob": lambda d, j: [job_service_pb2.WatchJobRequest(job=j)],
    "GetJobArtifacts": lambda d, j: [job_service_pb2.GetJobArtifactsRequest(job=j)],
    "ListCheckpoints": lambda d, j: [job_service_pb2.ListCheckpointsRequest(job=j)],
    "ListJobEvents": lambda d, j: [job_service_pb2.ListJobEventsRequest(job=j)],
    "GetJobEvaluation": lambda d, j: [job_service_pb2.GetJobEvaluationRequest(job=j)],
    "CreateDeployment": lambda d, j: [deployment_service_pb2.CreateDeploymentRequest(job=j)],
    # A's deployments are named like its jobs here (the seeded platform has no SUCCEEDED job to deploy).
    "GetDeployment": lambda d, j: [deployment_service_pb2.GetDeploymentRequest(deployment=j)],
    "ListDeployments": lambda d, j: [deployment_service_pb2.ListDeploymentsRequest(job=j)],
    "DeleteDeployment": lambda d, j: [deployment_service_pb2.DeleteDeploymentRequest(deployment=j)],
    "StreamMetrics": lambda d, j: [metrics_service_pb2.StreamMetricsRequest(job_id=j)],
    "ListMetrics": lambda d, j: [metrics_service_pb2.ListMetricsRequest(job_id=j)],
    "StreamLogs": lambda d, j: [metrics_service_pb2.StreamLogsRequest(job_id=j)],
}


def test_every_rpc_that_names_a_resource_is_covered() -> None:
    naming = {m.name for m in METHODS if references(m.input_type)}
    assert naming <= set(CASES), f"add tenant cases for {sorted(naming - set(CASES))}"


@pytest.mark.parametrize("method", [m for m in METHODS if m.name in CASES],
                         ids=[m.full_name for m in METHODS if m.name in CASES])
def test_another_organization_finds_none_of_its_resources(
        method: descriptor.MethodDescriptor, tenants: Tenants, channel: grpc.Channel) -> None:
    seeded = tenants.platform
    refs = [(d, j) for d in [*seeded.dataset_ids, *tenants.dataset_names]
            for j in [*seeded.job_ids, *tenants.job_names]][:4]
    requests: list[Message | list[Message]] = [r for d, j in refs for r in CASES[method.name](d, j)]
    if method.name == "RevokeApiKey":
        requests = [api_key_service_pb2.RevokeApiKeyRequest(api_key=k)
                    for k in (tenants.acme_key_id, tenants.acme_key_name)]
    assert requests
    # What a name that exists nowhere gets: A's resources must be answered exactly like it.
    ghosts: list[Message | list[Message]] = [*CASES[method.name]("ds_00000000000000000000000000", "job_0"),
                                             *CASES[method.name]("no-such-dataset", "no-such-job")]
    if method.name == "RevokeApiKey":
        ghosts = [api_key_service_pb2.RevokeApiKeyRequest(api_key="key_0")]
    ghost_codes = {call(channel, method, g, bearer(tenants.bravo_admin)).code for g in ghosts}
    # Looking a resource up by id or name is NOT_FOUND; naming one as an argument of another call (a
    # validation dataset, a job's dataset) may be INVALID_ARGUMENT naming the field, as for any unknown name.
    assert ghost_codes <= {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT}, ghost_codes
    direct = {f.name for f in method.input_type.fields} & REFERENCE_FIELDS
    for request in requests:
        outcome = call(channel, method, request, bearer(tenants.bravo_admin))
        assert outcome.code in ghost_codes, (request, outcome)
        if direct and method.name not in ("UploadDataset", "ValidateDataset"):
            assert outcome.code == grpc.StatusCode.NOT_FOUND or direct == {"validation_dataset"}, outcome
        assert "acme" not in outcome.details


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_no_answer_to_another_organization_carries_its_ids_or_names(
        method: descriptor.MethodDescriptor, tenants: Tenants, channel: grpc.Channel) -> None:
    """Whatever B asks (lists, estimates, its own caller), nothing of A comes back."""
    secrets_of_a = [*tenants.platform.dataset_ids, *tenants.platform.job_ids, tenants.acme_key_id,
                    tenants.acme_key_name, ORG]
    request = minimal(method)
    if method.name in ("CreateJob", "EstimateJob", "ValidateHardware", "PlanJob", "EstimateCost"):
        request = request_class(method)(spec=job_pb2.JobSpec(base_model="Qwen/Qwen2.5-0.5B"))
    outcome = call(channel, method, request, bearer(tenants.bravo_admin))
    if method.name == "ListAuditEvents":
        # B's audit log quotes B's own requests, which named A's resources in the tests above: it must
        # hold B's events only.
        events = audit_service_pb2.ListAuditEventsResponse.FromString(outcome.responses[0]).events
        assert events and {e.organization for e in events} == {OTHER}
        return
    blob = b"".join(outcome.responses) + outcome.details.encode()
    for secret in secrets_of_a:
        assert secret.encode() not in blob, (secret, outcome)


def test_usage_counts_only_the_callers_own_jobs(tenants: Tenants) -> None:
    """GetUsage names no resource (CASES lists the RPCs that do): it is scoped by the caller's organization,
    so B's usage counts none of A's jobs, and A's counts them all."""
    address = tenants.platform.address
    with TuneForgeClient(address, api_key=tenants.acme_admin) as acme:
        ours = acme.get_usage()
    with TuneForgeClient(address, api_key=tenants.bravo_admin) as bravo:
        theirs = bravo.get_usage()
        own = len(bravo.list_jobs().jobs)
    assert ours.total.jobs_created >= len(tenants.platform.job_ids)
    assert theirs.total.jobs_created == own
    assert sum(c.count for c in theirs.total.jobs_by_state) == own


def test_a_model_path_into_another_organizations_outputs_is_refused(
        tenants: Tenants, channel: grpc.Channel) -> None:
    seeded = tenants.platform
    objects = seeded.platform.data_dir / "objects" / "jobs" / ORG / seeded.job_ids[0]
    create = next(m for m in METHODS if m.name == "CreateJob")
    with TuneForgeClient(seeded.address, api_key=tenants.bravo_admin) as bravo:
        data = _chat(seeded.platform.data_dir.parent / "bravo.jsonl")
        mine = bravo.upload_dataset(data, "bravo-chat").dataset
    for model in (str(objects / "merged"), (objects / "adapter").as_uri(), f"jobs/{ORG}/{seeded.job_ids[0]}"):
        for field in ("base_model", "teacher"):
            job_spec = job_pb2.JobSpec(base_model="Qwen/Qwen2.5-0.5B", dataset=mine.id)
            if field == "base_model":
                job_spec.base_model = model
            else:
                job_spec.method = job_pb2.TRAINING_METHOD_DISTILLATION
                job_spec.distillation.teacher_model = model
            outcome = call(channel, create, job_service_pb2.CreateJobRequest(spec=job_spec),
                           bearer(tenants.bravo_admin))
            refused = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
            assert outcome.code in refused, (model, outcome)


def _chat(path: Any) -> Any:
    from tests.platform.conftest import chat_file

    return chat_file(path)


def test_a_resources_are_untouched_and_the_refusals_are_audited(tenants: Tenants) -> None:
    seeded = tenants.platform
    with TuneForgeClient(seeded.address, api_key=tenants.acme_admin) as acme:
        for dataset_id in seeded.dataset_ids:
            dataset = acme.get_dataset(dataset_id)
            assert dataset.state == dataset_pb2.DATASET_STATE_READY and dataset.description != "mine now"
        for job_id in seeded.job_ids:
            assert acme.get_job(job_id).state == job_pb2.JOB_STATE_QUEUED
        assert any(k.id == tenants.acme_key_id for k in acme.list_api_keys().api_keys)
        refused = acme.list_audit_events(page_size=1000, failures_only=True).events
        assert {"UNAUTHENTICATED", "PERMISSION_DENIED"} <= {e.code for e in refused}
        assert any(e.principal.startswith("key prefix tf_") for e in refused)  # the revoked and expired keys
        assert all(e.organization == ORG for e in refused)
    with TuneForgeClient(seeded.address, api_key=tenants.bravo_admin) as bravo:
        events = bravo.list_audit_events(page_size=1000).events
        assert events and all(e.organization == OTHER for e in events)
        assert "NOT_FOUND" in {e.code for e in events if e.method.endswith("/DeleteDataset")}

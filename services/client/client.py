"""A synchronous client for the services (the CLI's, and any Python caller's).

Every call carries `authorization: Bearer <api_key>`: the `api_key` argument, else TUNEFORGE_API_KEY.
The organization is the key's; `organization`, when given, must be that organization (the server refuses
another with PERMISSION_DENIED). `tls_ca_file` (or TUNEFORGE_TLS_CA_FILE) connects with TLS, trusting that
CA; `tls=True` trusts the system roots; a client certificate and key add mutual TLS.
"""

from __future__ import annotations

import hashlib
import os
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.duration_pb2 import Duration
from tuneforge.v1 import (
    api_key_service_pb2,
    api_key_service_pb2_grpc,
    artifact_pb2,
    audit_service_pb2,
    audit_service_pb2_grpc,
    dataset_pb2,
    dataset_service_pb2,
    dataset_service_pb2_grpc,
    deployment_service_pb2,
    deployment_service_pb2_grpc,
    estimation_pb2,
    estimation_service_pb2,
    estimation_service_pb2_grpc,
    identity_pb2,
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
    metrics_pb2,
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)

from services.client import config_jobs
from services.client.downloads import Progress, download_artifact_files
from services.client.errors import NotFound, ResourceExhausted, from_rpc_error

T = TypeVar("T")
CHUNK_BYTES = 1024 * 1024
# The servers' limit on one message, each way (services.kit.runtime.MAX_MESSAGE_BYTES); uploads stream
# CHUNK_BYTES at a time. A larger message fails at once with RESOURCE_EXHAUSTED, on either side.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


# A call refused for its organization's calls per second is made again after the wait the server's
# RetryInfo names (the gate refuses it before the request is read, so nothing was done), at most this many
# times and only for a wait this short; then the ResourceExhausted is raised, with its `retry_after_s`.
RATE_LIMIT_RETRIES = 3
RATE_LIMIT_MAX_WAIT_S = 5.0


def _call(fn: Callable[[], T]) -> T:
    for attempt in range(RATE_LIMIT_RETRIES + 1):
        try:
            return fn()
        except grpc.RpcError as err:
            error = from_rpc_error(err)
            wait_s = error.retry_after_s
            if (attempt == RATE_LIMIT_RETRIES or not isinstance(error, ResourceExhausted) or wait_s is None
                    or wait_s > RATE_LIMIT_MAX_WAIT_S):
                raise error from None
            time.sleep(wait_s)
    raise AssertionError("unreachable")


def _stream(it: Any) -> Iterator[Any]:
    try:
        yield from it
    except grpc.RpcError as err:
        raise from_rpc_error(err) from None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
              grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the credential to every call of a channel."""

    def __init__(self, api_key: str) -> None:
        self._header = ("authorization", f"Bearer {api_key}")

    def _details(self, details: Any) -> Any:
        return _CallDetails(details.method, details.timeout, [*(details.metadata or ()), self._header],
                            details.credentials, details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation: Any, client_call_details: Any,
                               request_iterator: Any) -> Any:
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, client_call_details: Any,
                                request_iterator: Any) -> Any:
        return continuation(self._details(client_call_details), request_iterator)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method: str, timeout: float | None, metadata: Any, credentials: Any,
                 wait_for_ready: bool | None, compression: Any) -> None:
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression


def with_api_key(channel: grpc.Channel, api_key: str) -> grpc.Channel:
    """`channel` with `authorization: Bearer <api_key>` on every call (for callers using the stubs)."""
    return grpc.intercept_channel(channel, _Bearer(api_key))


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class TuneForgeClient:
    def __init__(self, address: str, organization: str = "", *, api_key: str | None = None,
                 timeout_s: float = 60.0, tls: bool = False, tls_ca_file: str | None = None,
                 tls_cert_file: str | None = None, tls_key_file: str | None = None) -> None:
        self.organization = organization
        self.timeout_s = timeout_s
        self.api_key = api_key if api_key is not None else os.environ.get("TUNEFORGE_API_KEY", "")
        ca_file = tls_ca_file if tls_ca_file is not None else os.environ.get("TUNEFORGE_TLS_CA_FILE", "")
        if tls or ca_file or tls_cert_file:
            credentials = grpc.ssl_channel_credentials(
                _read(ca_file) if ca_file else None,
                _read(tls_key_file) if tls_key_file else None,
                _read(tls_cert_file) if tls_cert_file else None)
            channel = grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
        else:
            channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.channel = with_api_key(channel, self.api_key) if self.api_key else channel
        self._raw_channel = channel
        self.tls_ca_file = ca_file  # also trusted by artifact downloads (https)
        self.keys = api_key_service_pb2_grpc.ApiKeyServiceStub(self.channel)
        self.audit = audit_service_pb2_grpc.AuditServiceStub(self.channel)
        self.datasets = dataset_service_pb2_grpc.DatasetServiceStub(self.channel)
        self.jobs = job_service_pb2_grpc.JobServiceStub(self.channel)
        self.metrics = metrics_service_pb2_grpc.MetricsServiceStub(self.channel)
        self.estimation = estimation_service_pb2_grpc.EstimationServiceStub(self.channel)
        self.deployments = deployment_service_pb2_grpc.DeploymentServiceStub(self.channel)

    def close(self) -> None:
        self._raw_channel.close()

    def __enter__(self) -> TuneForgeClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- datasets --------------------------------------------------------------------------------

    def upload_dataset(self, path: Path, name: str, *, description: str = "",
                       split: dataset_pb2.SplitConfig | None = None, min_examples: int | None = None,
                       tokenizer: str = "", max_length: int = 0, request_id: str = "",
                       options: dataset_pb2.DatasetOptions | None = None,
                       ) -> dataset_service_pb2.UploadDatasetResponse:
        """Streams the file; ``tokenizer`` (a model the service can load) adds token statistics;
        ``options`` (e.g. max_samples: keep the first N examples) are stored with the dataset."""
        metadata = dataset_service_pb2.UploadDatasetMetadata(
            organization=self.organization, name=name, description=description, filename=path.name,
            size_bytes=path.stat().st_size, sha256=file_sha256(path), request_id=request_id,
            tokenizer=tokenizer, max_length=max_length, options=options)
        if split is not None:
            metadata.split.CopyFrom(split)
        if min_examples is not None:
            metadata.min_examples = min_examples

        def requests() -> Iterator[dataset_service_pb2.UploadDatasetRequest]:
            yield dataset_service_pb2.UploadDatasetRequest(metadata=metadata)
            with path.open("rb") as f:
                for block in iter(lambda: f.read(CHUNK_BYTES), b""):
                    yield dataset_service_pb2.UploadDatasetRequest(chunk=block)

        return _call(lambda: self.datasets.UploadDataset(requests(), timeout=max(self.timeout_s, 600)))

    def import_dataset(self, name: str, source: dataset_pb2.DatasetSource, *, description: str = "",
                       credentials: dataset_service_pb2.SourceCredentials | None = None,
                       split: dataset_pb2.SplitConfig | None = None, min_examples: int | None = None,
                       request_id: str = "") -> dataset_pb2.Dataset:
        """Starts importing from S3, GCS or Hugging Face; returns the dataset, PROCESSING until it ends."""
        request = dataset_service_pb2.CreateDatasetRequest(
            organization=self.organization, name=name, description=description, source=source,
            credentials=credentials, split=split, request_id=request_id)
        if min_examples is not None:
            request.min_examples = min_examples
        return _call(lambda: self.datasets.CreateDataset(request, timeout=self.timeout_s)).dataset

    def delete_dataset(self, ref: str) -> None:
        """Deletes the dataset and its stored files; refused while jobs that have not ended use it."""
        request = dataset_service_pb2.DeleteDatasetRequest(organization=self.organization, dataset=ref)
        _call(lambda: self.datasets.DeleteDataset(request, timeout=self.timeout_s))

    def get_dataset(self, ref: str) -> dataset_pb2.Dataset:
        request = dataset_service_pb2.GetDatasetRequest(organization=self.organization, dataset=ref)
        return _call(lambda: self.datasets.GetDataset(request, timeout=self.timeout_s)).dataset

    def list_datasets(self, page_size: int = 50,
                      page_token: str = "") -> dataset_service_pb2.ListDatasetsResponse:
        request = dataset_service_pb2.ListDatasetsRequest(organization=self.organization, page_size=page_size,
                                                          page_token=page_token)
        return _call(lambda: self.datasets.ListDatasets(request, timeout=self.timeout_s))

    # -- jobs ------------------------------------------------------------------------------------

    def create_job(self, spec: job_pb2.JobSpec, *, name: str = "", description: str = "",
                   request_id: str = "", validate_only: bool = False,
                   priority: job_pb2.JobPriority.ValueType = job_pb2.JOB_PRIORITY_UNSPECIFIED) -> job_pb2.Job:
        """Queues a job; `priority` orders it among the organization's own queued jobs (unset: NORMAL)."""
        request = job_service_pb2.CreateJobRequest(organization=self.organization, name=name,
                                                   description=description, spec=spec,
                                                   request_id=request_id, validate_only=validate_only,
                                                   priority=priority)
        return _call(lambda: self.jobs.CreateJob(request, timeout=self.timeout_s)).job

    def create_job_from_config(self, path_or_text: str | Path, *, dataset: str | None = None,
                               model: str | None = None, gpu_type: str | None = None,
                               examples: int | None = None, name: str = "", description: str = "",
                               request_id: str = "", validate_only: bool = False) -> job_pb2.Job:
        """A job from a Synth TOML, ModelForge JSON or NeMo Customizer hyperparameters file (a path or its
        text): every key maps to the spec or is an InvalidArgument violation naming it; a local dataset
        file is uploaded first (``examples``: its first N rows). See services.client.config_jobs."""
        return config_jobs.create_job_from_config(
            self, path_or_text, dataset=dataset, model=model, gpu_type=gpu_type, examples=examples,
            name=name, description=description, request_id=request_id, validate_only=validate_only)

    def dry_run_config(self, path_or_text: str | Path, *, dataset: str | None = None,
                       model: str | None = None, gpu_type: str | None = None, examples: int | None = None,
                       name: str = "") -> config_jobs.ConfigDryRun:
        """What create_job_from_config would do, creating nothing: the resolved spec and the plan."""
        return config_jobs.dry_run_config(self, path_or_text, dataset=dataset, model=model,
                                          gpu_type=gpu_type, examples=examples, name=name)

    def get_job(self, ref: str) -> job_pb2.Job:
        request = job_service_pb2.GetJobRequest(organization=self.organization, job=ref)
        return _call(lambda: self.jobs.GetJob(request, timeout=self.timeout_s)).job

    def list_jobs(self, page_size: int = 50, page_token: str = "",
                  states: Sequence[job_pb2.JobState.ValueType] | None = None
                  ) -> job_service_pb2.ListJobsResponse:
        request = job_service_pb2.ListJobsRequest(organization=self.organization, page_size=page_size,
                                                  page_token=page_token, states=states or [])
        return _call(lambda: self.jobs.ListJobs(request, timeout=self.timeout_s))

    def list_workers(self, page_size: int = 50, page_token: str = "") -> job_service_pb2.ListWorkersResponse:
        request = job_service_pb2.ListWorkersRequest(organization=self.organization, page_size=page_size,
                                                     page_token=page_token)
        return _call(lambda: self.jobs.ListWorkers(request, timeout=self.timeout_s))

    def list_pools(self) -> list[job_pb2.WorkerPool]:
        """The worker pools with their workers and queue depth (the organization's own queued jobs apart)."""
        request = job_service_pb2.ListPoolsRequest(organization=self.organization)
        return list(_call(lambda: self.jobs.ListPools(request, timeout=self.timeout_s)).pools)

    def get_usage(self, start: datetime | None = None, end: datetime | None = None,
                  period: job_service_pb2.UsagePeriodUnit.ValueType = job_service_pb2.USAGE_PERIOD_UNIT_DAY
                  ) -> job_service_pb2.GetUsageResponse:
        """The organization's jobs, compute and cost per UTC period in [start, end) (default: the last 30
        days, by day)."""
        request = job_service_pb2.GetUsageRequest(organization=self.organization, period=period)
        if start is not None:
            request.start_time.FromDatetime(start)
        if end is not None:
            request.end_time.FromDatetime(end)
        return _call(lambda: self.jobs.GetUsage(request, timeout=self.timeout_s))

    def list_metrics(self, job_id: str, kinds: Sequence[metrics_pb2.MetricKind.ValueType] | None = None
                     ) -> list[metrics_pb2.MetricPoint]:
        """Every metric point the job reported so far (of these kinds), by kind and step, all pages."""
        points: list[metrics_pb2.MetricPoint] = []
        token = ""
        while True:
            request = metrics_service_pb2.ListMetricsRequest(organization=self.organization, job_id=job_id,
                                                             kinds=kinds or [], page_size=10000,
                                                             page_token=token)
            response = _call(lambda r=request: self.metrics.ListMetrics(r, timeout=self.timeout_s))  # type: ignore[misc]
            points.extend(response.points)
            token = response.next_page_token
            if not token:
                return points

    def cancel_job(self, ref: str) -> job_pb2.Job:
        request = job_service_pb2.CancelJobRequest(organization=self.organization, job=ref)
        return _call(lambda: self.jobs.CancelJob(request, timeout=self.timeout_s)).job

    def delete_job(self, ref: str) -> job_service_pb2.DeleteJobResponse:
        """Deletes a job that has ended, with its checkpoints, outputs, metrics and logs. Deleting a job
        again succeeds (`already_deleted`); a job that has not ended is FailedPrecondition."""
        request = job_service_pb2.DeleteJobRequest(organization=self.organization, job=ref)
        return _call(lambda: self.jobs.DeleteJob(request, timeout=self.timeout_s))

    def watch_job(self, ref: str) -> Iterator[job_pb2.Job]:
        request = job_service_pb2.WatchJobRequest(organization=self.organization, job=ref)
        for response in _stream(self.jobs.WatchJob(request)):
            yield response.job

    def watch_job_events(self, ref: str) -> Iterator[job_service_pb2.WatchJobResponse]:
        """WatchJob's responses: the job after each change, with the timeline's events recorded since the
        previous one (the first carries every event so far); ends when the job does."""
        request = job_service_pb2.WatchJobRequest(organization=self.organization, job=ref)
        yield from _stream(self.jobs.WatchJob(request))

    def list_job_events(self, ref: str, page_size: int = 100, page_token: str = "", *,
                        after_sequence: int = 0) -> job_service_pb2.ListJobEventsResponse:
        """A page of the job's timeline, oldest first; only events after `after_sequence` when given."""
        request = job_service_pb2.ListJobEventsRequest(organization=self.organization, job=ref,
                                                       page_size=page_size, page_token=page_token,
                                                       after_sequence=after_sequence)
        return _call(lambda: self.jobs.ListJobEvents(request, timeout=self.timeout_s))

    def get_job_evaluation(self, ref: str) -> job_service_pb2.GetJobEvaluationResponse:
        """The evaluation after training: PENDING until the job evaluated, SKIPPED when it did not."""
        request = job_service_pb2.GetJobEvaluationRequest(organization=self.organization, job=ref)
        return _call(lambda: self.jobs.GetJobEvaluation(request, timeout=self.timeout_s))

    # -- artifacts -------------------------------------------------------------------------------

    def get_job_artifacts(self, ref: str, kinds: Sequence[artifact_pb2.ArtifactKind.ValueType] | None = None,
                          *, url_ttl_s: int = 0) -> list[artifact_pb2.JobArtifact]:
        """The job's stored outputs, each file with size, sha256 and a download URL that expires (after
        `url_ttl_s` seconds, or the platform's default). The first listing hashes the files: it may take
        a while for a large model."""
        request = job_service_pb2.GetJobArtifactsRequest(organization=self.organization, job=ref,
                                                         kinds=kinds or [])
        if url_ttl_s:
            request.url_ttl.CopyFrom(Duration(seconds=url_ttl_s))
        response = _call(lambda: self.jobs.GetJobArtifacts(request, timeout=max(self.timeout_s, 600)))
        return list(response.artifacts)

    def list_checkpoints(self, ref: str) -> job_service_pb2.ListCheckpointsResponse:
        """The job's complete checkpoints by step: epoch, losses and evaluation metrics, size, which is the
        best (by `best_metric`), and whether each still keeps its optimizer state."""
        request = job_service_pb2.ListCheckpointsRequest(organization=self.organization, job=ref)
        return _call(lambda: self.jobs.ListCheckpoints(request, timeout=self.timeout_s))

    def get_job_artifact(self, ref: str,
                         kind: artifact_pb2.ArtifactKind.ValueType = artifact_pb2.ARTIFACT_KIND_ADAPTER,
                         step: int = 0) -> artifact_pb2.JobArtifact:
        """One artifact: the adapter, the merged model, or the checkpoint of `step` (0: the latest);
        NotFound saying what the job has when it is not there."""
        artifacts = self.get_job_artifacts(ref, [kind])
        if kind == artifact_pb2.ARTIFACT_KIND_CHECKPOINT and step:
            artifacts = [a for a in artifacts if a.step == step]
        if artifacts:
            return artifacts[-1]
        job = self.get_job(ref)
        what = {artifact_pb2.ARTIFACT_KIND_ADAPTER: "adapter", artifact_pb2.ARTIFACT_KIND_MERGED_MODEL:
                "merged model", artifact_pb2.ARTIFACT_KIND_TRAINING_LOG: "training log",
                artifact_pb2.ARTIFACT_KIND_EVALUATION_REPORT: "evaluation report",
                artifact_pb2.ARTIFACT_KIND_TENSORBOARD: "TensorBoard event files"}.get(
                    kind, f"checkpoint of step {step}" if step else "complete checkpoint")
        state = job_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_")
        why = f"it is {state}"
        if kind == artifact_pb2.ARTIFACT_KIND_MERGED_MODEL and not job.spec.output.merge_adapter:
            why += "; it was created without --merge (spec.output.merge_adapter), so none is made"
        raise NotFound(f"job '{job.id}' has no {what} ({why})",
                       metadata={"resource_type": "artifact", "job": job.id})

    def download_artifact(self, ref: str, directory: Path, *,
                          kind: artifact_pb2.ArtifactKind.ValueType = artifact_pb2.ARTIFACT_KIND_ADAPTER,
                          step: int = 0, artifact: artifact_pb2.JobArtifact | None = None,
                          progress: Progress | None = None) -> artifact_pb2.JobArtifact:
        """Downloads one artifact of the job (`get_job_artifact`, unless `artifact` is given) into
        `directory`, resuming what an earlier run left and checking every file's sha256
        (services.client.downloads: `ChecksumMismatch`, `DownloadError`). Returns the artifact."""
        artifact = artifact or self.get_job_artifact(ref, kind, step)
        name, chosen = artifact.name, artifact

        def refresh() -> artifact_pb2.JobArtifact:
            fresh = [a for a in self.get_job_artifacts(ref, [chosen.kind]) if a.name == name]
            if not fresh:
                raise NotFound(f"job '{ref}' no longer has the artifact {name}")
            return fresh[0]

        download_artifact_files(artifact, directory, progress=progress, refresh=refresh,
                                context=self._http_context())
        return artifact

    def _http_context(self) -> ssl.SSLContext | None:
        """The system's roots, plus the platform's CA when one is configured."""
        if not self.tls_ca_file:
            return None
        context = ssl.create_default_context()
        context.load_verify_locations(self.tls_ca_file)
        return context

    # -- metrics and estimates -------------------------------------------------------------------

    def stream_metrics(self, job_id: str, *, follow: bool = True,
                       kinds: Sequence[metrics_pb2.MetricKind.ValueType] | None = None,
                       ) -> Iterator[metrics_pb2.MetricPoint]:
        """The job's points in (step, kind) order; with `follow`, new ones as they come until the job ends.
        Asks for several points per message (`batch`): fewer messages for the server to write."""
        request = metrics_service_pb2.StreamMetricsRequest(organization=self.organization, job_id=job_id,
                                                           follow=follow, kinds=kinds or [], batch=True)
        for response in _stream(self.metrics.StreamMetrics(request)):
            yield from response.points

    def stream_logs(self, job_id: str, *, follow: bool = False,
                    min_level: metrics_pb2.LogLevel.ValueType = metrics_pb2.LOG_LEVEL_UNSPECIFIED,
                    sources: Sequence[metrics_pb2.LogSource.ValueType] | None = None,
                    ) -> Iterator[metrics_pb2.LogEntry]:
        """The job's log entries in order; with `follow`, new ones as they come until the job ends."""
        request = metrics_service_pb2.StreamLogsRequest(organization=self.organization, job_id=job_id,
                                                        min_level=min_level, sources=sources or [],
                                                        follow=follow, batch=True)
        for response in _stream(self.metrics.StreamLogs(request)):
            yield from response.entries

    def estimate_job(self, spec: job_pb2.JobSpec) -> estimation_service_pb2.EstimateJobResponse:
        request = estimation_service_pb2.EstimateJobRequest(organization=self.organization, spec=spec)
        return _call(lambda: self.estimation.EstimateJob(request, timeout=self.timeout_s))

    def plan_job(self, spec: job_pb2.JobSpec, *, dataset_size: estimation_pb2.DatasetSize | None = None
                 ) -> estimation_service_pb2.PlanJobResponse:
        """What a client checks before committing: token counts, fit per GPU type, time and cost.
        `dataset_size`: the dataset's size read by the caller, instead of spec.dataset's."""
        request = estimation_service_pb2.PlanJobRequest(organization=self.organization, spec=spec,
                                                        dataset_size=dataset_size)
        return _call(lambda: self.estimation.PlanJob(request, timeout=self.timeout_s))

    # -- keys and audit --------------------------------------------------------------------------

    # -- deployments -----------------------------------------------------------------------------

    def create_deployment(self, job: str, *, name: str = "",
                          target: deployment_service_pb2.DeploymentTarget.ValueType = (
                              deployment_service_pb2.DEPLOYMENT_TARGET_EMBEDDED),
                          merged: bool = False, request_id: str = "") -> deployment_service_pb2.Deployment:
        """Deploys a SUCCEEDED job's model; returns the deployment PENDING (get_deployment until READY)."""
        request = deployment_service_pb2.CreateDeploymentRequest(
            organization=self.organization, job=job, name=name, target=target, merged=merged,
            request_id=request_id)
        return _call(lambda: self.deployments.CreateDeployment(request, timeout=self.timeout_s)).deployment

    def get_deployment(self, ref: str) -> deployment_service_pb2.Deployment:
        request = deployment_service_pb2.GetDeploymentRequest(organization=self.organization, deployment=ref)
        return _call(lambda: self.deployments.GetDeployment(request, timeout=self.timeout_s)).deployment

    def list_deployments(self, page_size: int = 50, page_token: str = "", *, job: str = ""
                         ) -> deployment_service_pb2.ListDeploymentsResponse:
        request = deployment_service_pb2.ListDeploymentsRequest(
            organization=self.organization, page_size=page_size, page_token=page_token, job=job)
        return _call(lambda: self.deployments.ListDeployments(request, timeout=self.timeout_s))

    def delete_deployment(self, ref: str) -> deployment_service_pb2.DeleteDeploymentResponse:
        request = deployment_service_pb2.DeleteDeploymentRequest(organization=self.organization,
                                                                 deployment=ref)
        return _call(lambda: self.deployments.DeleteDeployment(request, timeout=self.timeout_s))

    def whoami(self) -> identity_pb2.Caller:
        """The organization, role and principal of this client's credential."""
        return _call(lambda: self.keys.GetCaller(api_key_service_pb2.GetCallerRequest(),
                                                 timeout=self.timeout_s)).caller

    def create_api_key(self, name: str, role: identity_pb2.Role.ValueType, *, ttl_s: int = 0
                       ) -> api_key_service_pb2.CreateApiKeyResponse:
        """A new key of this organization; the response's `secret` is shown only this once."""
        request = api_key_service_pb2.CreateApiKeyRequest(organization=self.organization, name=name,
                                                          role=role)
        if ttl_s:
            request.ttl.CopyFrom(Duration(seconds=ttl_s))
        return _call(lambda: self.keys.CreateApiKey(request, timeout=self.timeout_s))

    def list_api_keys(self, page_size: int = 50, page_token: str = "", *, show_inactive: bool = False
                      ) -> api_key_service_pb2.ListApiKeysResponse:
        request = api_key_service_pb2.ListApiKeysRequest(organization=self.organization, page_size=page_size,
                                                         page_token=page_token, show_inactive=show_inactive)
        return _call(lambda: self.keys.ListApiKeys(request, timeout=self.timeout_s))

    def revoke_api_key(self, ref: str) -> identity_pb2.ApiKey:
        request = api_key_service_pb2.RevokeApiKeyRequest(organization=self.organization, api_key=ref)
        return _call(lambda: self.keys.RevokeApiKey(request, timeout=self.timeout_s)).api_key

    def list_audit_events(self, page_size: int = 50, page_token: str = "", *, method: str = "",
                          failures_only: bool = False) -> audit_service_pb2.ListAuditEventsResponse:
        request = audit_service_pb2.ListAuditEventsRequest(
            organization=self.organization, page_size=page_size, page_token=page_token, method=method,
            failures_only=failures_only)
        return _call(lambda: self.audit.ListAuditEvents(request, timeout=self.timeout_s))

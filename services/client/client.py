"""A synchronous client for the four services (the CLI's, and any Python caller's)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
from tuneforge.v1 import (
    dataset_pb2,
    dataset_service_pb2,
    dataset_service_pb2_grpc,
    estimation_service_pb2,
    estimation_service_pb2_grpc,
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
    metrics_pb2,
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)

from services.client.errors import from_rpc_error

T = TypeVar("T")
CHUNK_BYTES = 1024 * 1024
# The servers' limit on one message, each way (services.kit.runtime.MAX_MESSAGE_BYTES); uploads stream
# CHUNK_BYTES at a time. A larger message fails at once with RESOURCE_EXHAUSTED, on either side.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


def _call(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except grpc.RpcError as err:
        raise from_rpc_error(err) from None


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


class TuneForgeClient:
    def __init__(self, address: str, organization: str = "default", *, timeout_s: float = 60.0) -> None:
        self.organization = organization
        self.timeout_s = timeout_s
        self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.datasets = dataset_service_pb2_grpc.DatasetServiceStub(self.channel)
        self.jobs = job_service_pb2_grpc.JobServiceStub(self.channel)
        self.metrics = metrics_service_pb2_grpc.MetricsServiceStub(self.channel)
        self.estimation = estimation_service_pb2_grpc.EstimationServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> TuneForgeClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- datasets --------------------------------------------------------------------------------

    def upload_dataset(self, path: Path, name: str, *, description: str = "",
                       split: dataset_pb2.SplitConfig | None = None, min_examples: int | None = None,
                       tokenizer: str = "", max_length: int = 0,
                       request_id: str = "") -> dataset_service_pb2.UploadDatasetResponse:
        """Streams the file; ``tokenizer`` (a model the service can load) adds token statistics."""
        metadata = dataset_service_pb2.UploadDatasetMetadata(
            organization=self.organization, name=name, description=description, filename=path.name,
            size_bytes=path.stat().st_size, sha256=file_sha256(path), request_id=request_id,
            tokenizer=tokenizer, max_length=max_length)
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
                   request_id: str = "", validate_only: bool = False) -> job_pb2.Job:
        request = job_service_pb2.CreateJobRequest(organization=self.organization, name=name,
                                                   description=description, spec=spec,
                                                   request_id=request_id, validate_only=validate_only)
        return _call(lambda: self.jobs.CreateJob(request, timeout=self.timeout_s)).job

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

    def cancel_job(self, ref: str) -> job_pb2.Job:
        request = job_service_pb2.CancelJobRequest(organization=self.organization, job=ref)
        return _call(lambda: self.jobs.CancelJob(request, timeout=self.timeout_s)).job

    def watch_job(self, ref: str) -> Iterator[job_pb2.Job]:
        request = job_service_pb2.WatchJobRequest(organization=self.organization, job=ref)
        for response in _stream(self.jobs.WatchJob(request)):
            yield response.job

    # -- metrics and estimates -------------------------------------------------------------------

    def stream_metrics(self, job_id: str, *, follow: bool = True,
                       kinds: Sequence[metrics_pb2.MetricKind.ValueType] | None = None,
                       ) -> Iterator[metrics_pb2.MetricPoint]:
        request = metrics_service_pb2.StreamMetricsRequest(organization=self.organization, job_id=job_id,
                                                           follow=follow, kinds=kinds or [])
        for response in _stream(self.metrics.StreamMetrics(request)):
            yield response.point

    def estimate_job(self, spec: job_pb2.JobSpec) -> estimation_service_pb2.EstimateJobResponse:
        request = estimation_service_pb2.EstimateJobRequest(organization=self.organization, spec=spec)
        return _call(lambda: self.estimation.EstimateJob(request, timeout=self.timeout_s))

    def plan_job(self, spec: job_pb2.JobSpec) -> estimation_service_pb2.PlanJobResponse:
        """What a client checks before committing: token counts, fit per GPU type, time and cost."""
        request = estimation_service_pb2.PlanJobRequest(organization=self.organization, spec=spec)
        return _call(lambda: self.estimation.PlanJob(request, timeout=self.timeout_s))

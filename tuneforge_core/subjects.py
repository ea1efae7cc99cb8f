"""NATS streams and subjects: the one place their names live.

TF_WORK    tuneforge.work.jobs                         JobAssignment; work-queue retention, pull consumer
                                                        "trainers" shared by all workers.
TF_WORKER  tuneforge.worker.jobs.<job_id>.status       WorkerJobUpdate  -> jobs service
           tuneforge.worker.jobs.<job_id>.metrics      MetricsReported  -> metrics service
           tuneforge.worker.jobs.<job_id>.logs         LogsReported     -> metrics service
TF_EVENTS  tuneforge.events.jobs.<job_id>              JobChanged (jobs outbox) -> watchers, workers, metrics,
                                                        estimation (calibration)
           tuneforge.events.datasets.<dataset_id>      DatasetChanged (datasets outbox)
TF_ADVISORIES  $JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.TF_WORK.trainers  -> jobs service (WORKER_LOST)
core NATS  tuneforge.live.metrics.<job_id>             MetricsStored, after the metrics service stored points
           tuneforge.live.logs.<job_id>                LogsStored
"""

from __future__ import annotations

STREAM_WORK = "TF_WORK"
STREAM_WORKER = "TF_WORKER"
STREAM_EVENTS = "TF_EVENTS"
# JetStream's own advisory that a work item ran out of deliveries, captured in a stream so that a jobs
# service that was down when it was sent still sees it.
STREAM_ADVISORIES = "TF_ADVISORIES"
WORK_MAX_DELIVERIES = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.TF_WORK.trainers"

WORK_JOBS = "tuneforge.work.jobs"
TRAINERS_CONSUMER = "trainers"

JOBS_STATUS_CONSUMER = "jobs-service-status"
JOBS_LOST_CONSUMER = "jobs-service-lost-work"
METRICS_INGEST_CONSUMER = "metrics-service-ingest"
LOGS_INGEST_CONSUMER = "metrics-service-logs"
METRICS_JOB_EVENTS_CONSUMER = "metrics-service-job-events"
ESTIMATION_JOB_EVENTS_CONSUMER = "estimation-service-job-events"
DATASETS_JOB_EVENTS_CONSUMER = "datasets-service-job-events"
# The estimation service's copy of each job (what EstimateCost(job_id) reads), from the same events.
ESTIMATION_JOBS_CONSUMER = "estimation-service-jobs"


def worker_status(job_id: str) -> str:
    return f"tuneforge.worker.jobs.{job_id}.status"


def worker_metrics(job_id: str) -> str:
    return f"tuneforge.worker.jobs.{job_id}.metrics"


def worker_logs(job_id: str) -> str:
    return f"tuneforge.worker.jobs.{job_id}.logs"


def job_events(job_id: str) -> str:
    return f"tuneforge.events.jobs.{job_id}"


def dataset_events(dataset_id: str) -> str:
    return f"tuneforge.events.datasets.{dataset_id}"


def live_metrics(job_id: str) -> str:
    return f"tuneforge.live.metrics.{job_id}"


def live_logs(job_id: str) -> str:
    return f"tuneforge.live.logs.{job_id}"


ALL_WORKER_STATUS = "tuneforge.worker.jobs.*.status"
ALL_WORKER_METRICS = "tuneforge.worker.jobs.*.metrics"
ALL_WORKER_LOGS = "tuneforge.worker.jobs.*.logs"
ALL_JOB_EVENTS = "tuneforge.events.jobs.*"

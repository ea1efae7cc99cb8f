"""NATS streams and subjects: the one place their names live.

TF_WORK    tuneforge.work.jobs.<route>                 JobAssignment; work-queue retention. <route> is the
                                                        job's GPU type made NATS-safe (`gpu_route`) for a job
                                                        on one GPU, "<gpu type>.x<N>" for a job on N GPUs
                                                        (`work_route`), "any" for a job that names no GPU
                                                        type or "cpu". One durable pull consumer per route,
                                                        "trainers-<gpu type>" / "trainers-<gpu type>-x<N>" /
                                                        "trainers-any"; a worker with C GPUs of a type pulls
                                                        that type's routes for C, C-1, ..., 1 GPUs (largest
                                                        first), then "trainers-any", so a job waits for a
                                                        worker that has its GPU type and count instead of
                                                        being handed back and forth.
                                                        A job that names a worker pool (hardware.pool)
                                                        goes on "pool-<pool>.<route>" instead
                                                        (`pooled_route`), consumer
                                                        "trainers-pool-<pool>--<route>", which only that
                                                        pool's workers pull (before the routes above).
TF_WORKER  tuneforge.worker.jobs.<job_id>.status       WorkerJobUpdate  -> jobs service
           tuneforge.worker.jobs.<job_id>.metrics      MetricsReported  -> metrics service
           tuneforge.worker.jobs.<job_id>.logs         LogsReported     -> metrics service
TF_EVENTS  tuneforge.events.jobs.<job_id>              JobChanged (jobs outbox) -> watchers, workers, metrics,
                                                        estimation (calibration)
           tuneforge.events.datasets.<dataset_id>      DatasetChanged (datasets outbox)
TF_ADVISORIES  $JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.TF_WORK.*  -> jobs service (WORKER_LOST), for
                                                        every trainers-<route> consumer
TF_DEAD_LETTERS  tuneforge.dead.<stream>.<consumer>  a message a service's consumer gave up on (it can never
                                                        be processed, or failed too many deliveries), as it
                                                        was, with why in its headers (services.kit.consumer)
core NATS  tuneforge.live.metrics.<job_id>             MetricsStored, after the metrics service stored points
           tuneforge.live.logs.<job_id>                LogsStored
           tuneforge.worker.heartbeats                 WorkerHeartbeat, every few seconds from each worker
                                                        -> jobs service (queue group "jobs-service")
           tuneforge.secrets.jobs.<job_id>             TrackerSecretsRequest from the job's worker, replied
                                                        to by the jobs service (queue group "jobs-service")
"""

from __future__ import annotations

import re

STREAM_WORK = "TF_WORK"
STREAM_WORKER = "TF_WORKER"
STREAM_EVENTS = "TF_EVENTS"
# JetStream's own advisory that a work item ran out of deliveries, captured in a stream so that a jobs
# service that was down when it was sent still sees it.
STREAM_ADVISORIES = "TF_ADVISORIES"
# What the services' consumers gave up on, kept for an operator (services.kit.consumer._bury).
STREAM_DEAD_LETTERS = "TF_DEAD_LETTERS"
ALL_DEAD_LETTERS = "tuneforge.dead.>"
# The last token is the consumer's name: one subject covers every trainers-<route> consumer.
WORK_MAX_DELIVERIES = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.TF_WORK.*"

WORK_JOBS_PREFIX = "tuneforge.work.jobs"
# The routes of jobs on one GPU (and "any"), and of jobs on several ("<gpu type>.x<N>"); every route.
ALL_WORK_JOBS = "tuneforge.work.jobs.*"
ALL_MULTI_GPU_WORK_JOBS = "tuneforge.work.jobs.*.*"
# Jobs for several GPUs in a named pool ("pool-<pool>.<gpu type>.x<N>"); one GPU or any in a named pool is
# "pool-<pool>.<gpu type>", which ALL_MULTI_GPU_WORK_JOBS covers.
ALL_POOLED_MULTI_GPU_WORK_JOBS = "tuneforge.work.jobs.*.*.*"
EVERY_WORK_ROUTE = "tuneforge.work.jobs.>"
# The route of jobs any worker may take (no GPU type, or "cpu": a GPU does not downgrade a CPU job).
ANY_ROUTE = "any"
TRAINERS_CONSUMER_PREFIX = "trainers-"
# Before routing by GPU type, every assignment went to this one subject and consumer; the jobs service
# moves what is left there to the routed subjects when it starts (tuneforge_core.nats.reroute_legacy_work).
LEGACY_WORK_JOBS = "tuneforge.work.jobs"
LEGACY_TRAINERS_CONSUMER = "trainers"

WORKER_HEARTBEATS = "tuneforge.worker.heartbeats"
JOBS_HEARTBEATS_QUEUE = "jobs-service"

JOBS_STATUS_CONSUMER = "jobs-service-status"
JOBS_LOST_CONSUMER = "jobs-service-lost-work"
METRICS_INGEST_CONSUMER = "metrics-service-ingest"
LOGS_INGEST_CONSUMER = "metrics-service-logs"
METRICS_JOB_EVENTS_CONSUMER = "metrics-service-job-events"
ESTIMATION_JOB_EVENTS_CONSUMER = "estimation-service-job-events"
DATASETS_JOB_EVENTS_CONSUMER = "datasets-service-job-events"
# The estimation service's copy of each job (what EstimateCost(job_id) reads), from the same events.
ESTIMATION_JOBS_CONSUMER = "estimation-service-jobs"


def gpu_route(gpu_type: str) -> str:
    """The route token of a job's (or a worker's) GPU type: lower case, with anything but letters, digits,
    "-" and "_" replaced by "_" so it is one NATS subject token and a valid consumer name; "any" for no
    GPU type and for "cpu"."""
    clean = gpu_type.strip().lower()
    if clean in ("", "cpu", ANY_ROUTE):
        return ANY_ROUTE
    return re.sub(r"[^a-z0-9_-]", "_", clean)


def work_route(gpu_type: str, gpu_count: int = 1) -> str:
    """The route of a job asking for `gpu_count` GPUs of `gpu_type`: "any" for no GPU type (or "cpu"; the
    count is then CPU ranks, which any worker runs), "<gpu type>" for one GPU (0, unset, counts as one),
    "<gpu type>.x<N>" for N. One GPU keeps the route that predates counting, so what was queued for it
    before stays where its workers pull."""
    route = gpu_route(gpu_type)
    if route == ANY_ROUTE or gpu_count <= 1:
        return route
    return f"{route}.x{gpu_count}"


# Worker pools: the pool of a worker that names none, the route token prefix of a job that names one, and
# what a pool name may be (one subject token, and "--" never inside so consumer names stay unambiguous).
DEFAULT_POOL = "default"
POOL_ROUTE_PREFIX = "pool-"
POOL_NAME = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
POOL_NAME_MAX = 40


def valid_pool(pool: str) -> bool:
    """Whether `pool` is a pool name: 1-40 characters of a-z, 0-9 and single "-" between them."""
    return len(pool) <= POOL_NAME_MAX and POOL_NAME.match(pool) is not None


def pooled_route(pool: str, gpu_type: str, gpu_count: int = 1) -> str:
    """The route of a job in worker pool `pool` (empty: no pool, `work_route` as it is):
    "pool-<pool>.<work_route>"."""
    route = work_route(gpu_type, gpu_count)
    return f"{POOL_ROUTE_PREFIX}{pool}.{route}" if pool else route


def route_pool(route: str) -> str:
    """The pool a route is for ("" for a route of no pool)."""
    head, _, rest = route.partition(".")
    if head.startswith(POOL_ROUTE_PREFIX) and rest:
        return head.removeprefix(POOL_ROUTE_PREFIX)
    return ""


def _unpooled(route: str) -> str:
    return route.partition(".")[2] if route_pool(route) else route


def route_gpu_count(route: str) -> int:
    """How many GPUs the jobs on `route` ask for: N for "<gpu type>.x<N>", 1 for a GPU type's own route,
    0 for "any" (and for a route this version does not know, which no worker pulls for its count). A
    pool's prefix does not count."""
    route = _unpooled(route)
    if route == ANY_ROUTE:
        return 0
    tail = route.partition(".")[2]
    if not tail:
        return 1
    if tail.startswith("x") and tail[1:].isdigit() and "." not in tail and int(tail[1:]) >= 2:
        return int(tail[1:])
    return 0


def route_gpu_type(route: str) -> str:
    """The GPU type (as `gpu_route` writes it) of the jobs on `route`; "any" for "any"."""
    return _unpooled(route).partition(".")[0]


def route_subject(route: str) -> str:
    """The subject the jobs of `route` (`work_route`) are queued on."""
    return f"{WORK_JOBS_PREFIX}.{route}"


def route_consumer(route: str) -> str:
    """The durable pull consumer of `route`: "trainers-<route>" with "." written "-" (a consumer name has
    no dots): "trainers-nvidia-h100-x4"; for a pool's route "trainers-pool-<pool>--<route>" (pool names
    hold no "--")."""
    pool = route_pool(route)
    if pool:
        rest = _unpooled(route).replace(".", "-")
        return f"{TRAINERS_CONSUMER_PREFIX}{POOL_ROUTE_PREFIX}{pool}--{rest}"
    return f"{TRAINERS_CONSUMER_PREFIX}{route.replace('.', '-')}"


def work_jobs(gpu_type: str, gpu_count: int = 1, pool: str = "") -> str:
    """The subject a job asking for `gpu_count` GPUs of `gpu_type` (in worker pool `pool`) is queued on."""
    return route_subject(pooled_route(pool, gpu_type, gpu_count))


def trainers_consumer(gpu_type: str, gpu_count: int = 1, pool: str = "") -> str:
    """The durable pull consumer that hands out the jobs asking for `gpu_count` GPUs of `gpu_type` (in
    worker pool `pool`)."""
    return route_consumer(pooled_route(pool, gpu_type, gpu_count))


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


def dead_letters(stream: str, consumer: str) -> str:
    """Where a message of `stream` that `consumer` gave up on is kept (both names are NATS tokens)."""
    return f"tuneforge.dead.{stream}.{consumer}"


def live_metrics(job_id: str) -> str:
    return f"tuneforge.live.metrics.{job_id}"


def live_logs(job_id: str) -> str:
    return f"tuneforge.live.logs.{job_id}"


ALL_WORKER_STATUS = "tuneforge.worker.jobs.*.status"
ALL_WORKER_METRICS = "tuneforge.worker.jobs.*.metrics"
ALL_WORKER_LOGS = "tuneforge.worker.jobs.*.logs"
# Core NATS requests of a worker for its job's tracker secrets (TrackerSecretsRequest), answered by the jobs
# service in its queue group JOBS_HEARTBEATS_QUEUE.
ALL_TRACKER_SECRETS = "tuneforge.secrets.jobs.*"


def tracker_secrets(job_id: str) -> str:
    return f"tuneforge.secrets.jobs.{job_id}"
ALL_JOB_EVENTS = "tuneforge.events.jobs.*"

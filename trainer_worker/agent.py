"""The worker agent: pulls job assignments from NATS, trains each in a child process, reports back.

    python -m trainer_worker          # settings from TUNEFORGE_* environment variables

One job at a time, pulled from TF_WORK (explicit acks). The worker knows its hardware from NVML
(`trainer_worker.hardware`: GPU model, count and memory, mapped to a hardware option such as
"nvidia-h100"; "cpu" without a GPU), unless TUNEFORGE_WORKER_GPU_TYPE / _GPU_COUNT say otherwise. Jobs are
queued by GPU type and count (`tuneforge_core.subjects`): a worker with C GPUs of a type pulls from that
type's consumers for C, C-1, ..., 2 GPUs (``trainers-<gpu type>-x<N>``) and for one
(``trainers-<gpu type>``), largest first, then from ``trainers-any`` (jobs that name no GPU type, or
"cpu"). A CPU worker pulls from ``trainers-any`` only, so a job for two H100s waits in the queue for a
worker with at least two instead of being handed to workers that must refuse it. A worker with a GPU of
unknown type takes jobs of every GPU type, for as many GPUs as it counts: it also pulls from each such
route that has jobs waiting, found from the stream's subjects every little while.

Pools: each worker serves one pool (TUNEFORGE_WORKER_POOL, "default" when unset). A job that names a pool
(spec.hardware.pool) is queued on that pool's routes (``trainers-pool-<pool>--<route>``), which only that
pool's workers pull, and before anything else: its pool's routes in the order above, then the routes of
jobs that name no pool.

0. Hand the job straight back (NAK, with a log line) if it names a GPU type this worker does not have, or
   more GPUs than it has, or another pool: it is never trained on other or fewer GPUs than it asked for,
   nor outside its pool. Routing makes this the exception (an assignment published on the wrong subject),
   not the rule. The refusal sends no update (Job.attempt does not change), but it is a JetStream
   delivery like any other.
1. Skip the job if its latest JobChanged (TF_EVENTS) says it is cancelled or final.
2. PREPARING: fetch the data through the object store, and the model as `tuneforge_core.models` allows it
   for the job's organization: a hub id as it is, a folder under a model root in place, the
   organization's own stored outputs copied into a private cache (0700). Nothing outside the object store
   and the model roots is ever read; write RUN.json.
   If an earlier delivery left a complete checkpoint under the job's output prefix, fetch the newest one:
   the training resumes from it instead of from step 0.
3. RUNNING: start the training (one process, or torchrun ranks), tail its events file, forward metrics and
   logs to TF_WORKER, upload each checkpoint it stages, send PROGRESS at most every couple of seconds, and
   keep the claim alive with in-progress acks.
4. SUCCEEDED (outputs uploaded under the assignment's output_prefix), FAILED (an ErrorInfo with the reason),
   or CANCELLED (a JobChanged CANCELLING arrived: the child gets SIGTERM, then SIGKILL); then ack.

Infrastructure hiccups (storage or NATS unreachable) NAK the job instead of failing it, so another delivery
retries it; the jobs service fails a job that runs out of deliveries as WORKER_LOST.

Heartbeats: every TUNEFORGE_WORKER_HEARTBEAT_INTERVAL_S the agent publishes a WorkerHeartbeat (core NATS,
`subjects.WORKER_HEARTBEATS`): its id, host, pool, GPU type, count, memory and NVML name, IDLE or BUSY
with the job and attempt it runs, DRAINING once asked to stop. The jobs service lists workers from them,
and puts a job back to QUEUED (with a reason) when the worker holding it goes quiet; a last heartbeat says
STOPPED when the agent shuts down cleanly.

Draining: the first SIGTERM/SIGINT stops pulling at once and says DRAINING (a heartbeat goes out at once).
An idle worker then exits. A busy one lets its job run for up to TUNEFORGE_WORKER_DRAIN_TIMEOUT_S (0, the
default: not at all); if the job is still running then, or at a second signal, the agent stops the child
(SIGTERM, grace, SIGKILL) and NAKs the job, so another worker takes it at once and resumes it from its last
stored checkpoint. The job's log says which happened. Its last update of the delivery is the hand-back (a
PROGRESS carrying an UNAVAILABLE error that says why: `reporting.hand_back_status`), so the jobs service's
timeline tells the next delivery's restart as a drain, not as a lost worker.

This module never imports torch: the training stack loads only in the child.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError
from pydantic import Field, field_validator
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import job_pb2, metrics_pb2

from trainer_worker import evaluation_report, hardware, trackers, vision, warm_start
from trainer_worker.checkpointing import CheckpointStore
from trainer_worker.distributed import (
    DEFAULT_RAY_MAX_FAILURES,
    DEFAULT_RAY_PLACEMENT_TIMEOUT_S,
    MULTINODE_ENV,
)
from trainer_worker.errors import TrainingError, Transient, is_retryable
from trainer_worker.events import (
    AnyEvent,
    CheckpointEvent,
    ErrorEvent,
    EventTail,
    LogEvent,
    MalformedEvent,
    MetricEvent,
    ProgressEvent,
    RankEvent,
    ResultEvent,
    StateEvent,
)
from trainer_worker.launcher import TrainingProcess
from trainer_worker.reporting import (
    JobReporter,
    advance_progress,
    failure_status,
    hand_back_status,
    metric_point,
    progress_of,
    timestamp,
)
from trainer_worker.run_config import RunConfig
from trainer_worker.story import AttemptStory, size_of, store_training_log
from trainer_worker.telemetry import WorkerTelemetry
from trainer_worker.telemetry import serve as serve_metrics
from trainer_worker.work_dirs import AttemptLock, sweep
from tuneforge_core import logs, states, subjects, tracing
from tuneforge_core.errors import InvalidArgument
from tuneforge_core.models import ModelKind, ModelPolicy, ModelSource, other_models
from tuneforge_core.nats import connect, ensure_route_consumer, ensure_streams, queued_routes
from tuneforge_core.reasons import Reason
from tuneforge_core.settings import KitSettings
from tuneforge_core.spec import upgrade_resolved
from tuneforge_core.storage import ObjectStore, store_from_settings
from tuneforge_core.tracker_secrets import OneTimeKey

log = logging.getLogger("trainer_worker.agent")

U = events_pb2.WorkerUpdateKind
S = job_pb2.JobState
W = job_pb2.WorkerState
# How often a worker with a GPU of unknown type looks for GPU types with jobs waiting.
ROUTE_REFRESH_S = 10.0
# How often a worker deletes the work folders of attempts no running worker holds (trainer_worker.work_dirs),
# besides when it starts.
WORK_SWEEP_INTERVAL_S = 300.0
TRAIN_LOG_TAIL_BYTES = 4000


class AgentSettings(KitSettings):
    """Worker settings on top of the shared kit's (same TUNEFORGE_ prefix)."""

    # Empty: "<hostname>-<pid>".
    worker_id: str = ""
    # Seconds between PROGRESS updates of a running job (at most).
    worker_progress_interval_s: float = 2.0
    # Seconds a training process gets to stop after SIGTERM before it is killed.
    worker_stop_grace_s: float = 10.0
    # Seconds between reads of the events file while training runs.
    worker_poll_interval_s: float = 0.25
    # NAK delay after an infrastructure failure, so the retry does not spin.
    worker_retry_delay_s: float = 10.0
    # Keep each attempt's work dir (RUN.json, events, train.log, outputs) after it ends, for debugging.
    worker_keep_work_dirs: bool = False
    # The hardware option this worker's GPUs are (as in ListHardwareOptions, e.g. "nvidia-h100"), or "cpu"
    # for a worker without one. Empty: detected (trainer_worker.hardware: NVML's GPU model and memory;
    # "cpu" when no NVIDIA GPU is visible), or a GPU of unknown type where detection cannot tell, which
    # takes a job for any GPU type.
    worker_gpu_type: str = ""
    # GPUs this worker has, as its heartbeats report them and as many as it takes jobs for; 0: count the
    # visible NVIDIA GPUs.
    worker_gpu_count: int = 0
    # The worker pool this worker serves: it takes the jobs that name it (spec.hardware.pool) first, then
    # those that name no pool. 1-40 characters of a-z, 0-9 and single "-" between them.
    worker_pool: str = subjects.DEFAULT_POOL
    # Seconds a running job may go on after the first SIGTERM/SIGINT before it is handed back to the
    # queue. 0: hand it back at once. Kubernetes' terminationGracePeriodSeconds must exceed it (plus
    # TUNEFORGE_WORKER_STOP_GRACE_S), or the pod is killed before the job goes back.
    worker_drain_timeout_s: float = Field(default=0.0, ge=0)
    # The Ray cluster (its GCS address, "host:6379") that jobs with hardware.node_count > 1 run on, through
    # Ray Train (trainer_worker.ray_launch); a Ray node must run on this worker's host. Empty: no Ray.
    # trainer_worker.distributed reads these three from the environment; they are declared here so a bad
    # value stops the worker at start instead of failing a job.
    ray_address: str = ""
    # Restarts of a multi-node run after a lost node or rank, before the attempt fails.
    ray_max_failures: int = Field(default=DEFAULT_RAY_MAX_FAILURES, ge=0)
    # Seconds a multi-node run's ranks may wait to be placed on the cluster (nodes of the job's GPU type,
    # free) before the attempt fails with INSUFFICIENT_HARDWARE; 0: no limit.
    ray_placement_timeout_s: float = Field(default=DEFAULT_RAY_PLACEMENT_TIMEOUT_S, ge=0)
    # Seconds between heartbeats (WorkerHeartbeat). The jobs service calls a worker gone after
    # TUNEFORGE_WORK_ACK_WAIT_S or three of these without one, whichever is longer.
    worker_heartbeat_interval_s: float = 5.0
    # Port of this worker's Prometheus /metrics (trainer_worker.telemetry: step time, tokens/s, GPU), on
    # metrics_host (empty: 127.0.0.1; 0.0.0.0 in a container). 0: none (the default). Give each worker on
    # one host its own port; one that is taken is a warning, not a failure.
    worker_metrics_port: int = Field(default=0, ge=0, le=65535)
    # TUNEFORGE_MLFLOW_TRACKING_URI: the MLflow tracking server of jobs whose mlflow integration names
    # none (any URI MLflow reads: http(s)://, sqlite:///, databricks). Empty: such a job fails
    # DEPENDENCY_ERROR.
    mlflow_tracking_uri: str = ""
    # Seconds the worker keeps asking the jobs service for its job's tracker secrets (the service knows
    # the worker holds the job once it has read the worker's PREPARING) before the attempt is retried.
    worker_secrets_timeout_s: float = Field(default=30.0, gt=0)

    @field_validator("worker_pool")
    @classmethod
    def _pool_name(cls, value: str) -> str:
        pool = value.strip() or subjects.DEFAULT_POOL
        if not subjects.valid_pool(pool):
            raise ValueError(f"TUNEFORGE_WORKER_POOL {value!r} is not a pool name: 1-"
                             f"{subjects.POOL_NAME_MAX} characters of a-z, 0-9 and single '-' between them "
                             "(e.g. 'h100-spot')")
        return pool


@dataclass(frozen=True)
class WorkerHardware:
    """What a worker trains on, and so which jobs it takes.

    A job that names no GPU type, or "cpu", goes to any worker (a GPU does not downgrade a CPU job). A job
    that names a GPU type and count (per node) goes only to a worker with at least that many GPUs of that
    type, or of unknown type; anything else would train it on other or fewer GPUs than it asked for, which
    CreateJob promised not to do. A worker that names a GPU type but counts none takes no GPU job. A job
    that names a pool goes only to that pool's workers.
    """

    gpu_type: str  # "cpu", a hardware option, or "" for a GPU of unknown type
    gpu_count: int = 0
    pool: str = subjects.DEFAULT_POOL
    gpu_memory_bytes: int = 0  # of each GPU, as NVML reports it; 0 when unknown or on a CPU worker
    gpu_name: str = ""  # NVML's model name
    # Whether it runs jobs on several nodes: a Ray cluster to drive (TUNEFORGE_RAY_ADDRESS), or started in a
    # torchrun multi-node group (trainer_worker.distributed).
    multi_node: bool = False

    @classmethod
    def from_settings(cls, settings: AgentSettings, host: hardware.HostGpus | None = None) -> WorkerHardware:
        """The settings' GPU type and count where they name them, else `host` (detected when not given)."""
        host = host or hardware.detect()
        configured = settings.worker_gpu_type.strip().lower()
        if configured and host.gpu_type not in ("", configured):
            log.warning("TUNEFORGE_WORKER_GPU_TYPE is %s but this worker detects %s; the setting wins",
                        configured, host.describe())
        gpu_type = configured or host.gpu_type
        count = settings.worker_gpu_count or (0 if gpu_type == "cpu" else host.gpu_count)
        if gpu_type == "" and count < 1:  # it sees a GPU, so it has one at least
            count = 1
        if gpu_type not in ("", "cpu") and count < 1:
            log.warning("TUNEFORGE_WORKER_GPU_TYPE is %s but no GPU is visible: this worker takes only jobs "
                        "that name no GPU type (set TUNEFORGE_WORKER_GPU_COUNT)", gpu_type)
        multi_node = bool(settings.ray_address.strip()) or any(os.environ.get(v) for v in MULTINODE_ENV)
        return cls(gpu_type, count, settings.worker_pool, host.gpu_memory_bytes, host.gpu_name, multi_node)

    @property
    def takes_every_gpu_type(self) -> bool:
        return self.gpu_type == ""

    def routes(self) -> list[str]:
        """The routes (`subjects.pooled_route`) this worker pulls from, in order: its pool's, then those of
        jobs that name no pool; in each, its GPU type's for as many GPUs as it has down to one (larger jobs
        first: a smaller worker cannot take them), then "any". A GPU of unknown type starts with the two
        "any" routes alone, and adds the routes with jobs waiting that it takes as it finds them
        (`takes_route`)."""
        own = subjects.gpu_route(self.gpu_type)
        counts = [] if own == subjects.ANY_ROUTE else list(range(self.gpu_count, 0, -1))
        return [subjects.pooled_route(pool, gpu_type, n)
                for pool in (self.pool, "")
                for gpu_type, n in [*((own, n) for n in counts), (subjects.ANY_ROUTE, 0)]]

    def route_order(self, route: str) -> tuple[bool, bool, int]:
        """Sort key of the routes this worker pulls, in the order `routes` gives: its pool's first, then
        in each the most GPUs first and "any" last."""
        return (not subjects.route_pool(route), subjects.route_gpu_type(route) == subjects.ANY_ROUTE,
                -subjects.route_gpu_count(route))

    def takes_route(self, route: str) -> bool:
        """Whether the jobs queued on `route` are this worker's to train: no pool or its own, its GPU type
        (any type, for a GPU of unknown type) and no more GPUs than it has; "any" always."""
        if subjects.route_pool(route) not in ("", self.pool):
            return False
        count = subjects.route_gpu_count(route)
        if subjects.route_gpu_type(route) == subjects.ANY_ROUTE and count == 0:
            return True
        if not 1 <= count <= self.gpu_count or self.gpu_type == "cpu":
            return False
        own = subjects.gpu_route(self.gpu_type)
        return self.takes_every_gpu_type or subjects.route_gpu_type(route) == own

    def describe(self) -> str:
        if self.gpu_type == "cpu":
            return "cpu"
        kind = self.gpu_type or "GPUs of unknown type"
        return f"{kind} x{self.gpu_count}" if self.gpu_count else kind

    def refusal(self, wanted: str, wanted_count: int = 1, wanted_pool: str = "",
                wanted_nodes: int = 1) -> str | None:
        """Why this worker must not train a job asking for `wanted_count` GPUs (per node; unset counts as
        one) of type `wanted` in pool `wanted_pool` (empty: any) on `wanted_nodes` nodes, or None when it
        may. A job on one node that names no GPU type (or "cpu") and no other pool it may always."""
        if wanted_pool and wanted_pool != self.pool:
            return f"the job asks for pool {wanted_pool} and this worker serves pool {self.pool}"
        if wanted_nodes > 1 and not self.multi_node:
            return (f"the job asks for {wanted_nodes} nodes and this worker runs no multi-node jobs (it has "
                    "no TUNEFORGE_RAY_ADDRESS)")
        wanted = wanted.strip().lower()
        if wanted in ("", "cpu"):
            return None
        count = max(1, wanted_count)
        other_type = self.gpu_type == "cpu" or (self.gpu_type != "" and wanted != self.gpu_type)
        if not other_type and count <= self.gpu_count:
            return None
        have = "no GPU" if self.gpu_type == "cpu" else self.describe()
        return f"the job asks for {wanted} x{count} and this worker has {have}"


class Verdict(Enum):
    ACK = "ack"
    NAK = "nak"


class Agent:
    """Pulls one assignment at a time and sees it through to a final update."""

    def __init__(self, settings: AgentSettings, js: JetStreamContext, store: ObjectStore,
                 nc: NATS | None = None) -> None:
        self.settings, self.js, self.store, self.nc = settings, js, store, nc
        self.worker_id = settings.worker_id or f"{socket.gethostname()}-{os.getpid()}"
        # Set at the first SIGTERM/SIGINT: pull nothing more (DRAINING), exit once no job is held.
        self.stopping = asyncio.Event()
        # Set when the drain time runs out, or at a second signal: stop the child and NAK its job.
        self.handing_back = asyncio.Event()
        # Set TUNEFORGE_WORKER_STOP_GRACE_S after handing back began: the job's reports stop retrying (an
        # unreachable NATS, e.g. the platform's own nats-server gone with `tuneforge up`, held a stopping
        # worker for minutes, and with it the data dir's lock), so the job goes back and the worker exits.
        self.give_up_reporting = asyncio.Event()
        # Each work consumer's max deliveries (TUNEFORGE_WORK_MAX_DELIVER as the server has it), by name.
        self.max_deliver: dict[str, int] = {}
        self._drain_timer: asyncio.TimerHandle | None = None
        self._drain_heartbeat: asyncio.Task[None] | None = None
        self.work_root = settings.data_dir.resolve() / "worker"
        self.ack_wait_s = settings.work_ack_wait_s
        self.models = ModelPolicy.from_settings(settings, store)
        self.hardware = WorkerHardware.from_settings(settings)
        self.started_at = timestamp()
        # The job and delivery this worker runs now, as its heartbeats say, and its run (told of a drain).
        self.current: tuple[str, int] | None = None
        self.current_run: JobRun | None = None
        self._subs: dict[str, Any] = {}  # route -> pull subscription, in the order they are tried
        self.telemetry = WorkerTelemetry(self.worker_id)

    def request_stop(self) -> None:
        """SIGTERM/SIGINT. The first: drain (pull nothing more, say DRAINING at once, let a running job go
        on for up to TUNEFORGE_WORKER_DRAIN_TIMEOUT_S, then hand it back). A second: hand it back now."""
        if self.stopping.is_set():
            self._hand_back("The worker was asked again to stop while draining")
            return
        self.stopping.set()
        if self.nc is not None:  # the jobs service stops dispatching to it now, not at the next interval
            self._drain_heartbeat = asyncio.ensure_future(self._send_heartbeat())
        drain_s = self.settings.worker_drain_timeout_s
        if self.current_run is None:
            log.info("stop requested while idle: stopping")
        elif drain_s > 0:
            log.info("stop requested: draining, the running job has up to %gs to finish", drain_s)
            self.current_run.reporter.log(
                f"The worker is draining: it takes no new job and lets this one run for up to {drain_s:g}s "
                "more before it goes back to the queue.")
            self._drain_timer = asyncio.get_running_loop().call_later(
                drain_s, self._hand_back, f"The worker drained for {drain_s:g}s and the job had not finished")
        else:
            self._hand_back("The worker shut down")

    def _hand_back(self, why: str) -> None:
        """Stop the running job (if any) and NAK it; `why` opens the line its log gets."""
        if self.handing_back.is_set():
            return
        if self.current_run is not None:
            log.info("handing job %s back to the queue: %s", self.current_run.job_id, why)
            self.current_run.hand_back_reason = why
        self.handing_back.set()
        asyncio.get_running_loop().call_later(self.settings.worker_stop_grace_s, self.give_up_reporting.set)

    async def sweep_work_dirs(self) -> None:
        """Delete the work folders of attempts that no running worker holds: left by workers killed
        outright (kill -9, out of memory), here or by another worker sharing this data dir. Not with
        TUNEFORGE_WORKER_KEEP_WORK_DIRS, which keeps them for debugging."""
        if self.settings.worker_keep_work_dirs:
            return
        try:
            await asyncio.to_thread(sweep, self.work_root)
        except Exception:  # never a reason to stop the worker
            log.warning("could not clean up the work folders of dead attempts", exc_info=True)

    async def run(self) -> None:
        await self.sweep_work_dirs()
        swept = asyncio.get_running_loop().time()
        await ensure_streams(self.js)
        heartbeats = asyncio.create_task(self._heartbeats()) if self.nc is not None else None
        try:
            await self._subscribe(self.hardware.routes())
            log.info("worker %s waiting for jobs (hardware: %s; queues: %s)", self.worker_id,
                     self.hardware.describe(), ", ".join(self._subs))
            refreshed = 0.0
            while not self.stopping.is_set():
                now = asyncio.get_running_loop().time()
                if self.hardware.takes_every_gpu_type and now - refreshed > ROUTE_REFRESH_S:
                    refreshed = now
                    await self._find_routes()
                if now - swept > WORK_SWEEP_INTERVAL_S:
                    swept = now
                    await self.sweep_work_dirs()
                msg = await self._next()
                if msg is not None:
                    await self.handle(msg)
        finally:
            for sub in self._subs.values():
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            if self._drain_timer is not None:
                self._drain_timer.cancel()
            if heartbeats is not None:
                heartbeats.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await heartbeats
                if self._drain_heartbeat is not None:
                    with contextlib.suppress(Exception):
                        await self._drain_heartbeat
                with contextlib.suppress(Exception):  # the jobs service then stops counting on this worker
                    await self._send_heartbeat(stopped=True)

    async def _subscribe(self, routes: list[str]) -> None:
        """Ensure each route's consumer (with this deployment's ack wait and max deliveries) and pull from
        it; the claim is renewed often enough for the shortest ack wait among them. Routes are tried for
        the most GPUs first, "any" last."""
        for route in routes:
            if route in self._subs:
                continue
            if not self.hardware.takes_route(route):  # never pull what this worker must refuse
                log.warning("worker %s does not pull %s: not its hardware", self.worker_id, route)
                continue
            durable = await ensure_route_consumer(self.js, route, self.settings.work_ack_wait_s,
                                                  self.settings.work_max_deliver)
            info = await self.js.consumer_info(subjects.STREAM_WORK, durable)
            self.ack_wait_s = min(self.ack_wait_s, info.config.ack_wait or self.ack_wait_s)
            self.max_deliver[durable] = info.config.max_deliver or 0
            self._subs[route] = await self.js.pull_subscribe(
                subjects.route_subject(route), durable=durable, stream=subjects.STREAM_WORK
            )
        order = sorted(self._subs, key=self.hardware.route_order)
        self._subs = {route: self._subs[route] for route in order}

    async def _find_routes(self) -> None:
        """A GPU of unknown type takes jobs of every GPU type, for as many GPUs as it has: pull from each
        such route with jobs waiting."""
        try:
            waiting = [r for r in await queued_routes(self.js)
                       if r not in self._subs and self.hardware.takes_route(r)]
            if waiting:
                log.info("worker %s also takes jobs for %s", self.worker_id, ", ".join(waiting))
                await self._subscribe(waiting)
        except Exception:
            log.warning("could not look for GPU types with jobs waiting; will retry", exc_info=True)

    async def _next(self) -> Msg | None:
        """The next assignment: from the routes in order (this worker's GPU type, most GPUs first, before
        "any"), waiting about a second in all when none has one."""
        timeout = max(0.2, 1.0 / max(1, len(self._subs)))
        for sub in list(self._subs.values()):
            if self.stopping.is_set():
                return None
            try:
                messages = await sub.fetch(1, timeout=timeout)
            except (TimeoutError, NatsTimeoutError):
                continue
            except Exception:  # e.g. while reconnecting; the client reconnects by itself
                log.warning("fetching work failed; retrying", exc_info=True)
                await asyncio.sleep(1.0)
                return None
            if messages:
                return messages[0]
        return None

    # -- heartbeats -------------------------------------------------------------------------------------

    async def _heartbeats(self) -> None:
        interval = self.settings.worker_heartbeat_interval_s
        while True:
            try:
                await self._send_heartbeat()
            except Exception:  # the client buffers while reconnecting; anything else is worth a line
                log.warning("could not send a heartbeat; will retry", exc_info=True)
            await asyncio.sleep(interval)

    def heartbeat(self, *, stopped: bool = False) -> events_pb2.WorkerHeartbeat:
        """What this worker is doing now, as the jobs service reads it: DRAINING (with the job it still
        runs, if any) from the first stop request until the last heartbeat, STOPPED."""
        state = (
            W.WORKER_STATE_STOPPED if stopped
            else W.WORKER_STATE_DRAINING if self.stopping.is_set()
            else W.WORKER_STATE_BUSY if self.current is not None
            else W.WORKER_STATE_IDLE
        )
        job_id, attempt = self.current if self.current is not None and not stopped else ("", 0)
        hw = self.hardware
        return events_pb2.WorkerHeartbeat(
            worker_id=self.worker_id, hostname=socket.gethostname(), gpu_type=hw.gpu_type,
            gpu_count=hw.gpu_count, state=state, job_id=job_id, attempt=attempt,
            started_at=self.started_at, time=timestamp(),
            interval_seconds=self.settings.worker_heartbeat_interval_s,
            pool=hw.pool, gpu_memory_bytes=hw.gpu_memory_bytes, gpu_name=hw.gpu_name,
            multi_node=hw.multi_node,
        )

    async def _send_heartbeat(self, *, stopped: bool = False) -> None:
        assert self.nc is not None
        await self.nc.publish(subjects.WORKER_HEARTBEATS, self.heartbeat(stopped=stopped).SerializeToString())
        if stopped:
            await self.nc.flush(timeout=2)

    async def handle(self, msg: Msg) -> None:
        """Run one delivery of an assignment, then ack it or hand it back."""
        if self.stopping.is_set():
            await msg.nak()
            return
        try:
            assignment = events_pb2.JobAssignment.FromString(msg.data)
        except Exception:
            log.exception("dropping an undecodable assignment")
            await msg.term()
            return
        upgraded = upgrade_resolved(assignment.spec)
        if upgraded is not assignment.spec:  # queued before this version's spec fields existed
            log.info("job %s was resolved by an earlier version; filling the defaults of newer fields",
                     assignment.job_id)
            assignment.spec.CopyFrom(upgraded)
        wanted = assignment.spec.hardware
        refusal = self.hardware.refusal(wanted.gpu_type, wanted.gpu_count, wanted.pool, wanted.node_count)
        if refusal is not None:  # on the wrong subject: never trained on other or fewer GPUs than it asked
            log.warning("job %s goes back to the queue (delivery %d, subject %s): %s", assignment.job_id,
                        msg.metadata.num_delivered, msg.subject, refusal)
            with contextlib.suppress(Exception):  # the server redelivers after ack_wait anyway
                await msg.nak(delay=self.settings.worker_retry_delay_s)
            return
        logs.set_job(assignment.job_id)  # every log line of this delivery carries job_id
        self.telemetry.job_started()
        claim = asyncio.create_task(self._keep_claim(msg))
        run = JobRun(self, assignment, msg.metadata.num_delivered,
                     self.max_deliver.get(msg.metadata.consumer or "", self.settings.work_max_deliver))
        self.current, self.current_run = (assignment.job_id, run.attempt), run
        # The delivery's span continues the trace of the CreateJob call that queued it (its headers carry
        # the context, tuneforge_core.tracing); the status updates published inside carry this span's.
        delivery = tracing.consumer_span(f"assignment {assignment.job_id}", msg.headers, {
            "messaging.system": "nats", "messaging.destination.name": msg.subject,
            "tuneforge.job_id": assignment.job_id, "tuneforge.attempt": run.attempt,
            "tuneforge.worker_id": self.worker_id})
        try:
            with delivery:
                verdict = await run.execute()
        except Exception as exc:
            if is_retryable(exc):  # infrastructure: another delivery may well succeed
                log.warning("job %s goes back to the queue: %s", assignment.job_id, exc)
                verdict = Verdict.NAK
            else:  # our own bug or the job's input: retrying on another worker would fail the same way
                log.exception("job %s failed inside the worker; no retry", assignment.job_id)
                verdict = await run.fail_internal(exc)
        finally:
            claim.cancel()
        try:
            if verdict is Verdict.ACK:
                await msg.ack_sync()
            else:  # a stopping worker hands back at once, for another worker to take now
                await msg.nak(delay=None if self.stopping.is_set() else self.settings.worker_retry_delay_s)
        except Exception:  # the server redelivers after ack_wait anyway
            log.warning("could not %s job %s", verdict.value, assignment.job_id, exc_info=True)
        finally:
            self.current, self.current_run = None, None
            self.telemetry.job_ended()
            logs.set_job("")

    async def _keep_claim(self, msg: Msg) -> None:
        while True:
            await asyncio.sleep(self.ack_wait_s / 3)
            try:
                await msg.in_progress()
            except Exception:
                log.warning("in-progress ack failed; will retry", exc_info=True)

    def locate(self, uri: str) -> tuple[ObjectStore, str]:
        """The platform's object store and the key of `uri` in it. The worker reads and writes nothing
        else: another bucket or folder would be read with the platform's identity on a caller's behalf."""
        try:
            return self.store, self.store.key_of(uri)
        except InvalidArgument:
            raise TrainingError(
                Reason.TRAINING_FAILED, f"The worker reads only this deployment's object storage; {uri!r} "
                "is not in it."
            ) from None


@dataclass
class Outcome:
    """What the training process said about how it ended."""

    result: ResultEvent | None = None
    error: ErrorEvent | None = None
    # Set when it wrote a line that is not an event: the job fails at once (our bug, not worth a retry).
    malformed: str | None = None


class JobRun:
    """One delivery of one job: prepare, train, report, clean up."""

    def __init__(self, agent: Agent, assignment: events_pb2.JobAssignment, attempt: int,
                 max_deliver: int = 0) -> None:
        self.agent, self.assignment, self.attempt = agent, assignment, attempt
        # The work queue's deliveries of the job (0: no limit): the last one fails instead of retrying.
        self.max_deliver = max_deliver
        self.job_id = assignment.job_id
        self.settings = agent.settings
        self.reporter = JobReporter(agent.js, self.job_id, attempt, agent.worker_id,
                                    give_up=agent.give_up_reporting)
        self.story = AttemptStory(attempt, agent.worker_id)  # phase, timeline, tokens, log lines
        self.reporter.story = self.story
        self._ran = False  # whether the attempt got as far as preparing (then its log is stored)
        self.work_dir = agent.work_root / "jobs" / self.job_id / f"attempt-{attempt}"
        # Held while the attempt runs (from _prepare): no worker's sweep deletes the folder meanwhile.
        self.work_lock: AttemptLock | None = None
        self.cancelled = asyncio.Event()
        self.progress: job_pb2.JobProgress | None = None
        self._progress_sent: job_pb2.JobProgress | None = None
        self._progress_sent_at = 0.0
        self._uploads: asyncio.Task[None] | None = None  # the chain of checkpoint uploads, in step order
        # Why the stopping worker hands this job back, should it (the first words of the job's log line).
        self.hand_back_reason = "The worker shut down"
        # The newest complete checkpoint stored for the job (fetched, or uploaded by this attempt): where a
        # next delivery resumes.
        self.stored_step: int | None = None
        # The training process's tracker variables (JobSpec.integrations), secrets included; set in _prepare.
        self.tracker_env: dict[str, str] = {}

    async def execute(self) -> Verdict:
        watch = await self._watch_cancellation()
        try:
            state = await self._latest_state()
            if state in states.CANCEL_REQUESTED:
                log.info("job %s was cancelled before it started", self.job_id)
                self.reporter.log("The job was cancelled before it started.")
                await self.reporter.status(U.WORKER_UPDATE_KIND_CANCELLED, error=states.cancelled_status())
                return Verdict.ACK
            if state is not None and states.is_final(state):
                log.info("job %s is already %s; dropping the stale delivery", self.job_id, states.name(state))
                return Verdict.ACK
            return await self._run()
        except Exception as exc:
            if not is_retryable(exc):
                raise
            return await self._retry(exc)
        finally:
            with contextlib.suppress(Exception):
                await watch.unsubscribe()
            if self._ran:
                await self._store_tensorboard()
                await self._store_training_log()
            if not self.settings.worker_keep_work_dirs:
                shutil.rmtree(self.work_dir, ignore_errors=True)
            if self.work_lock is not None:
                if self.settings.worker_keep_work_dirs:
                    self.work_lock.keep()  # kept on purpose: no sweep, this worker's or another's
                self.work_lock.release()

    async def _run(self) -> Verdict:
        log.info("job %s attempt %d: preparing", self.job_id, self.attempt)
        self._ran = True
        await self.reporter.status(U.WORKER_UPDATE_KIND_PREPARING)
        self.reporter.log(f"Worker {self.agent.worker_id} claimed the job (attempt {self.attempt}).")
        try:
            with tracing.span("prepare", attributes={"tuneforge.job_id": self.job_id}):
                config = await self._prepare()
            if self.agent.handing_back.is_set():
                return await self._hand_back()
            if self.cancelled.is_set():
                return await self._report_cancelled()
            return await self._train(config)
        except TrainingError as exc:  # the job's fault (bad input), not the worker's: no retry
            return await self._fail(exc.reason, exc.message)

    # -- preparing --------------------------------------------------------------------------------------

    async def _prepare(self) -> RunConfig:
        spec = self.assignment.spec
        data_dir = self.work_dir / "data"
        if self.work_lock is None:  # held once per delivery: a second flock of it here would wait forever
            self.work_lock = await asyncio.to_thread(AttemptLock.acquire, self.work_dir)  # creates the folder
        data_started = time.monotonic()
        train_file = await self._download(self.assignment.train_uri, data_dir / "train.jsonl")
        validation_file = None
        if self.assignment.validation_uri:
            validation_file = await self._download(
                self.assignment.validation_uri, data_dir / "validation.jsonl"
            )
        test_file = None  # read only by the evaluation after training
        if self.assignment.test_uri and spec.evaluation.enabled:
            try:
                test_file = await self._download(self.assignment.test_uri, data_dir / "test.jsonl")
            except TrainingError:  # a missing test split costs the evaluation, never the job
                self.reporter.log(f"The test split {self.assignment.test_uri} does not exist.", "warning")
        splits = [f for f in (train_file, validation_file, test_file) if f is not None]
        images = await asyncio.to_thread(vision.localize_images, splits, self.agent.locate,
                                         data_dir / "images")
        if images:  # an image dataset: its rows now name local files
            self.reporter.log(f"Fetched {images} images of the dataset.")
        self.story.downloaded("DATA_DOWNLOADED", "the data", size_of([data_dir]),
                              time.monotonic() - data_started)
        model_path = await self._base_model_path(spec.base_model)
        warm = await warm_start.fetch(self.assignment.warm_start, self.agent.locate, self.work_dir,
                                      self.reporter.log)  # the weights to start from, now local
        # The teacher, DPO's reference model, GRPO's reward model: under the base model's rule.
        others = {field: await self._model_path(ref, field) for field, ref in other_models(spec)}
        config = RunConfig(
            job_id=self.job_id,
            attempt=self.attempt,
            spec=RunConfig.spec_to_dict(spec),
            model_path=model_path,
            teacher_model_path=others.get("spec.distillation.teacher_model"),
            reference_model_path=others.get("spec.dpo.reference_model"),
            reward_model_path=others.get("spec.grpo.reward_model"),
            train_file=train_file,
            validation_file=validation_file,
            test_file=test_file,
            output_dir=self.work_dir / "out",
            events_file=self.work_dir / "events.jsonl",
            admission_estimate=(
                RunConfig.fit_to_dict(self.assignment.admission_estimate)
                if self.assignment.HasField("admission_estimate")
                else None
            ),
            warm_start=warm,
        )
        await self._fetch_checkpoint(config.output_dir)
        config.dump(self.work_dir / "RUN.json")
        await self._prepare_trackers(config)
        return config

    async def _prepare_trackers(self, config: RunConfig) -> None:
        """The training process's tracker variables (trainer_worker.trackers), with the job's own secrets,
        and a line in the job's log saying which trackers it reports to (never the secrets)."""
        spec = self.assignment.spec
        if not spec.integrations:
            return
        secrets = await self._tracker_secrets() if self.assignment.sealed_tracker_secrets else {}
        tracker_dir = _private_dir(self.work_dir / "trackers")  # W&B's run files, per attempt
        self.tracker_env = trackers.child_env(spec, self.job_id, config.output_dir, tracker_dir, secrets,
                                              self.settings.mlflow_tracking_uri)
        self.reporter.log(trackers.describe(spec, secrets, self.settings.mlflow_tracking_uri))

    async def _tracker_secrets(self) -> dict[str, str]:
        """The job's tracker secrets from the jobs service, which answers only the worker holding the job
        (tuneforge_core.tracker_secrets). Asked again while the service has not yet seen this delivery's
        PREPARING; a refusal that stays past worker_secrets_timeout_s is a transient failure (the next
        delivery asks again), a jobs service that cannot open them fails the job."""
        nc = self.agent.nc
        if nc is None:
            raise Transient("the worker has no NATS connection to ask for the job's tracker secrets")
        key = OneTimeKey()
        request = events_pb2.TrackerSecretsRequest(
            job_id=self.job_id, worker_id=self.agent.worker_id, attempt=self.attempt,
            sealed=self.assignment.sealed_tracker_secrets, public_key=key.public).SerializeToString()
        deadline = time.monotonic() + self.settings.worker_secrets_timeout_s
        why = "no answer"
        while True:
            try:
                msg = await nc.request(subjects.tracker_secrets(self.job_id), request, timeout=5)
                reply = events_pb2.TrackerSecretsReply.FromString(msg.data)
            except Exception as exc:  # no responder yet, a timeout, a reconnect
                why = f"no answer ({type(exc).__name__})"
            else:
                if not reply.HasField("error"):
                    return dict(json.loads(key.unbox(reply.public_key, reply.encrypted)))
                why = reply.error.message
                if "do not open" in why:  # the jobs service lacks the key they were sealed with
                    raise TrainingError(Reason.DEPENDENCY_ERROR,
                                        f"The job's tracker secrets could not be read: {why}.")
            if time.monotonic() >= deadline:
                raise Transient(f"the jobs service did not hand over the job's tracker secrets: {why}")
            await asyncio.sleep(0.5)

    def _checkpoints(self) -> CheckpointStore:
        store, prefix = self.agent.locate(self.assignment.output_prefix)
        return CheckpointStore(store, prefix)

    async def _fetch_checkpoint(self, output_dir: Path) -> None:
        """Put the newest complete checkpoint of an earlier delivery where the recipe resumes from it."""
        try:
            step = await asyncio.to_thread(self._checkpoints().download_latest, output_dir)
        except Exception as exc:
            raise Transient(f"could not fetch the job's checkpoints: {exc}") from exc
        if self.attempt > 1:
            self.story.restarted(step)
        if step is not None:
            self.stored_step = step
            self.reporter.log(f"Resuming from the checkpoint of step {step}.")
            log.info("job %s attempt %d: resuming from step %d", self.job_id, self.attempt, step)

    async def _download(self, uri: str, dest: Path) -> Path:
        self.reporter.log(f"Fetching {uri}.")
        store, key = self.agent.locate(uri)
        try:
            return await asyncio.to_thread(store.get_file, key, dest)
        except FileNotFoundError as exc:
            raise TrainingError(Reason.BAD_TRAINING_DATA, f"The training data {uri} does not exist.") from exc
        except Exception as exc:
            raise Transient(f"could not fetch {uri}: {exc}") from exc

    async def _base_model_path(self, ref: str) -> str:
        """The base model's path (``_model_path``), told as MODEL_DOWNLOADED."""
        started = time.monotonic()
        path = await self._model_path(ref, "spec.base_model")
        self.story.model_ready(ref, path, time.monotonic() - started)
        return path

    async def _store_training_log(self) -> None:
        """The attempt's log lines to ``<output_prefix>/logs/training.log``, after earlier attempts' lines.
        Whatever goes wrong here, the job's outcome stays what it was."""
        try:
            store, prefix = self.agent.locate(self.assignment.output_prefix)
            await self.reporter.flush(force=True)
            await asyncio.to_thread(store_training_log, store, prefix, list(self.story.log_lines))
        except Exception:
            log.warning("job %s attempt %d: the training log was not stored", self.job_id, self.attempt,
                        exc_info=True)

    async def _store_tensorboard(self) -> None:
        """TensorBoard's event files of the attempt to ``<output_prefix>/tensorboard/`` (beside earlier
        attempts' files), whatever the outcome. A failure here changes nothing of the job's outcome."""
        folder = self.work_dir / "out" / trackers.TENSORBOARD_DIR
        if not folder.is_dir():
            return
        try:
            store, prefix = self.agent.locate(self.assignment.output_prefix)
            await asyncio.to_thread(store.put_dir, f"{prefix}/{trackers.TENSORBOARD_DIR}", folder)
        except Exception:
            log.warning("job %s attempt %d: the TensorBoard files were not stored", self.job_id, self.attempt,
                        exc_info=True)

    def _model_source(self, ref: str, field: str) -> ModelSource:
        try:
            source = self.agent.models.source(ref, self.assignment.organization, field)
        except InvalidArgument as exc:
            why = exc.violations[0].description if exc.violations else exc.message
            raise TrainingError(
                Reason.MODEL_NOT_FOUND, f"The worker does not read {field} {ref!r}: {why}."
            ) from None
        if source.kind is ModelKind.HUB and Path(ref).exists():
            # from_pretrained would read that folder of the working directory instead of asking the hub.
            raise TrainingError(
                Reason.MODEL_NOT_FOUND,
                f"{field} {ref!r} names a folder in the worker's working directory, so it cannot be read "
                "as a hub id.",
            )
        return source

    async def _model_path(self, ref: str, field: str) -> str:
        """What the recipe loads for a model reference, under the same rule as CreateJob's, applied again
        before anything is read: a hub id as it is, a folder under a model root in place (resolved), and
        the organization's own stored output copied into the private model cache (cached across jobs)."""
        source = self._model_source(ref, field)
        if source.kind is ModelKind.HUB:
            return ref
        if source.kind is ModelKind.LOCAL:
            assert source.path is not None
            return str(source.path)
        cache = _private_dir(self.agent.work_root / "models")
        cached = cache / hashlib.sha256(ref.encode()).hexdigest()[:24]
        if cached.is_dir():
            return str(cached)
        self.reporter.log(f"Fetching the model {ref}.")
        partial = cache / f".partial-{cached.name}-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        _private_dir(partial)
        try:
            await asyncio.to_thread(self.agent.store.get_dir, source.key, partial)
        except FileNotFoundError as exc:
            shutil.rmtree(partial, ignore_errors=True)
            raise TrainingError(Reason.MODEL_NOT_FOUND, f"No model is stored at {ref}.") from exc
        except Exception as exc:
            shutil.rmtree(partial, ignore_errors=True)
            raise Transient(f"could not fetch {ref}: {exc}") from exc
        _make_private(partial)
        try:
            partial.rename(cached)
        except OSError:  # another agent on this host cached it first
            shutil.rmtree(partial, ignore_errors=True)
        return str(cached)

    # -- training ---------------------------------------------------------------------------------------

    async def _train(self, config: RunConfig) -> Verdict:
        process = await TrainingProcess.start(
            self.work_dir / "RUN.json", self.work_dir / "train.log", self.assignment.spec,
            {**self._child_env(), **self.tracker_env},
            keep_fds=[self.work_lock.fd] if self.work_lock is not None else [],
        )
        self.reporter.log(f"Started the training process (pid {process.pid}).")
        tail = EventTail(config.events_file)
        outcome = Outcome()
        try:
            with tracing.span("train", attributes={"tuneforge.job_id": self.job_id,
                                                   "process.pid": process.pid}):
                await self._supervise(process, tail, outcome)
        finally:
            if process.returncode is None:  # the agent failed: never leave a recipe training unwatched
                await process.stop(self.settings.worker_stop_grace_s)
            if self._uploads is not None:  # what was saved is kept, whatever happens next
                await self._uploads

        if self.cancelled.is_set():
            return await self._report_cancelled()
        if self.agent.handing_back.is_set():
            return await self._hand_back()
        if outcome.malformed is not None:
            return await self._fail(
                Reason.TRAINING_FAILED,
                f"The worker could not read what the training process reported ({outcome.malformed}); "
                "this is a bug in TuneForge, not in the job.",
            )
        if outcome.result is not None and process.returncode == 0:
            return await self._succeed(outcome.result)
        if outcome.error is not None:
            return await self._fail(outcome.error.reason, outcome.error.message)
        return await self._fail(*self._crash_reason(process.returncode))

    def _child_env(self) -> dict[str, str]:
        """DeepSpeed compiles a few ops on first use; keep them across jobs unless the deployment chose."""
        if os.environ.get("TORCH_EXTENSIONS_DIR"):
            return {}
        return {"TORCH_EXTENSIONS_DIR": str(self.agent.work_root / "torch_extensions")}

    async def _supervise(self, process: TrainingProcess, tail: EventTail, outcome: Outcome) -> None:
        """Forward the child's events until it exits; stop it on cancellation, shutdown or a bad event."""
        while not await process.wait_exit(self.settings.worker_poll_interval_s):
            await self._forward(tail, outcome)
            if self.cancelled.is_set() or self.agent.handing_back.is_set() or outcome.malformed is not None:
                why = (
                    "cancellation was requested" if self.cancelled.is_set()
                    else "the worker is stopping" if self.agent.handing_back.is_set()
                    else "it reported something the worker cannot read"
                )
                self.reporter.log(f"Stopping the training process: {why}.")
                await process.stop(self.settings.worker_stop_grace_s)
        await self._forward(tail, outcome)

    async def _forward(self, tail: EventTail, outcome: Outcome) -> None:
        while outcome.malformed is None:
            try:
                events = tail.read()
            except MalformedEvent as exc:
                log.error("job %s: malformed event from the training process: %s", self.job_id, exc)
                outcome.malformed = str(exc)
                break
            if not events:
                break
            for event in events:
                await self._on_event(event, outcome)
        await self._send_progress()
        await self.reporter.flush()

    async def _on_event(self, event: AnyEvent, outcome: Outcome) -> None:
        training = metrics_pb2.LOG_SOURCE_TRAINING
        self.story.observe(event)  # phase, timeline events, tokens, evaluations by step
        match event:
            case MetricEvent():
                point = metric_point(event, self.job_id, self.attempt)
                self.reporter.metric(point)
                self.agent.telemetry.observe(point)
                if point.kind == metrics_pb2.METRIC_KIND_TRAIN:
                    self.progress = progress_of(point)
            case ProgressEvent():  # the step reached between logging steps, and the last one at the end
                self.progress = advance_progress(self.progress, event)
            case LogEvent():
                self.reporter.log(event.message, event.level, training, event.time or None)
            case StateEvent(state="running"):
                await self.reporter.status(U.WORKER_UPDATE_KIND_RUNNING)
            case StateEvent():
                pass  # "cancelled": the exit code and the cancel flag tell the rest
            case RankEvent():
                self.reporter.log(
                    f"Training rank {event.rank} of {event.world_size} started on {event.host} "
                    f"(pid {event.pid}).", "debug", training, event.time or None,
                )
            case CheckpointEvent():
                self._upload_checkpoint(event.step, Path(event.dir), event.best_step)
            case ResultEvent():
                outcome.result = event
            case ErrorEvent():
                if outcome.error is None or event.rank == 0:
                    outcome.error = event  # the main rank's account wins over a peer's "connection lost"

    def _upload_checkpoint(self, step: int, directory: Path, best_step: int = 0) -> None:
        """Queue the upload behind earlier ones; a failed upload costs progress on a retry, not the job."""
        previous = self._uploads
        keep = self.assignment.spec.hyperparameters.save_total_limit

        async def upload() -> None:
            if previous is not None:
                await previous
            try:
                size = await asyncio.to_thread(size_of, [directory])
                uri = await asyncio.to_thread(self._checkpoints().upload, step, directory, keep,
                                              protect=best_step)
            except Exception as exc:
                log.warning("job %s: checkpoint %d was not stored: %s", self.job_id, step, exc)
                self.reporter.log(f"Could not store the checkpoint of step {step}: {exc}", "warning")
                return
            finally:
                shutil.rmtree(directory, ignore_errors=True)
            self.reporter.log(f"Stored the checkpoint of step {step} at {uri}.")
            self.story.checkpoint_saved(step, size, uri)
            self.stored_step = max(step, self.stored_step or 0)

        self._uploads = asyncio.create_task(upload())

    async def _send_progress(self) -> None:
        now = asyncio.get_running_loop().time()
        # Also sent for news without a new step (a phase change: at once; timeline events waiting).
        if self.progress is None or (self.progress == self._progress_sent and not self.story.has_news):
            return
        recent = now - self._progress_sent_at < self.settings.worker_progress_interval_s
        if recent and not self.story.phase_changed:
            return
        self._progress_sent, self._progress_sent_at = self.progress, now
        with tracing.detached():  # every few seconds: kept out of the job's trace (tuneforge_core.tracing)
            await self.reporter.status(U.WORKER_UPDATE_KIND_PROGRESS, progress=self.progress)

    def _crash_reason(self, returncode: int | None) -> tuple[Reason, str]:
        """Why a training process that wrote no error line ended; its output's tail goes to the job log."""
        log_path = self.work_dir / "train.log"
        if log_path.exists():
            with log_path.open("rb") as f:
                f.seek(max(0, log_path.stat().st_size - TRAIN_LOG_TAIL_BYTES))
                tail = f.read().decode(errors="replace")
            self.reporter.log(f"Last output of the training process:\n{tail}", "error")
        if returncode == -signal.SIGKILL:
            return Reason.OUT_OF_MEMORY, (
                "The training process was killed, most likely for running out of memory."
            )
        return Reason.TRAINING_FAILED, f"The training process exited with code {returncode} without a result."

    # -- outcomes ---------------------------------------------------------------------------------------

    async def _succeed(self, result: ResultEvent) -> Verdict:
        store, prefix = self.agent.locate(self.assignment.output_prefix)
        adapter_dir = Path(result.adapter_dir)
        uploads = [(adapter_dir, f"{prefix}/{adapter_dir.name}")]
        if result.merged_dir:
            uploads.append((Path(result.merged_dir), f"{prefix}/merged"))
        self.story.phase = job_pb2.JOB_PHASE_UPLOADING
        await self.reporter.status(U.WORKER_UPDATE_KIND_PROGRESS, progress=self.progress)
        upload_started, upload_size = time.monotonic(), size_of(d for d, _ in uploads)
        uris = []
        with tracing.span("upload outputs", attributes={"tuneforge.job_id": self.job_id,
                                                        "tuneforge.upload_bytes": upload_size}):
            for directory, key in uploads:
                self.reporter.log(f"Uploading {directory.name} to {store.uri(key)}.")
                try:
                    uris.append(await asyncio.to_thread(store.put_dir, key, directory))
                except Exception as exc:
                    raise Transient(f"could not upload {directory.name}: {exc}") from exc
        self.story.uploaded(upload_size, time.monotonic() - upload_started, uris)
        evaluation = evaluation_report.from_result(result.evaluation)
        try:  # stored before SUCCEEDED, so the job's artifacts hold it once the job says so
            key = f"{prefix}/{evaluation_report.OBJECT_NAME}"
            await asyncio.to_thread(store.put_bytes, key, evaluation_report.to_json(evaluation))
        except Exception as exc:
            raise Transient(f"could not upload the evaluation report: {exc}") from exc
        metrics = {k: v for k, v in result.final_metrics.items() if v is not None}
        output = job_pb2.JobOutput(
            adapter_uri=uris[0], merged_model_uri=uris[1] if len(uris) > 1 else "", final_metrics=metrics
        )
        self.story.result(output, result)  # kept step, early stop, tokens trained
        self.reporter.log("Training succeeded.")
        await self.reporter.status(
            U.WORKER_UPDATE_KIND_SUCCEEDED, progress=self.progress, output=output, evaluation=evaluation
        )
        log.info("job %s attempt %d: succeeded", self.job_id, self.attempt)
        return Verdict.ACK

    async def fail_internal(self, exc: BaseException) -> Verdict:
        """Fail the job for a fault of the worker's own that a retry would repeat (our bug, or input that
        slipped past CreateJob's checks); NAK instead if even the failure cannot be reported."""
        try:
            return await self._fail(
                Reason.TRAINING_FAILED,
                f"The worker failed while handling the job ({type(exc).__name__}: {exc}); this is a bug in "
                "TuneForge, not in the job.",
            )
        except Exception:
            log.warning("could not report job %s as failed; it goes back to the queue", self.job_id,
                        exc_info=True)
            return Verdict.NAK

    async def _fail(self, reason: Reason, message: str) -> Verdict:
        self.reporter.log(f"Training failed ({reason}): {message}", "error")
        await self.reporter.status(U.WORKER_UPDATE_KIND_FAILED, error=failure_status(reason, message))
        log.info("job %s attempt %d: failed with %s", self.job_id, self.attempt, reason)
        return Verdict.ACK

    async def _hand_back(self) -> Verdict:
        """The worker stops before the job ended: say so in the job's log and NAK it, for another worker
        to resume from the last stored checkpoint."""
        self.reporter.log(f"{self.hand_back_reason}; the job goes back to the queue and {self._resumes()}.",
                          "warning")
        try:  # best effort: the job goes back whether or not NATS takes these (give_up_reporting)
            if self._ran:  # the jobs service knows of this delivery (PREPARING): tell it the delivery ends
                # The hand-back update (services.jobs.timeline.is_hand_back): a PROGRESS carrying an error,
                # and the timeline so far. The next delivery's RESTARTED then says this worker was drained,
                # not lost.
                error = hand_back_status(self.agent.worker_id, self.hand_back_reason)
                await self.reporter.status(U.WORKER_UPDATE_KIND_PROGRESS, progress=self.progress, error=error)
            await self.reporter.flush(force=True)
        except Exception as exc:
            log.warning("job %s attempt %d: the hand-back was not reported: %s", self.job_id, self.attempt,
                        exc)
        log.info("job %s attempt %d: handed back to the queue", self.job_id, self.attempt)
        return Verdict.NAK

    def _resumes(self) -> str:
        return ("starts again from the beginning (no checkpoint was stored)" if self.stored_step is None
                else f"resumes from the checkpoint of step {self.stored_step}")

    async def _retry(self, exc: Exception) -> Verdict:
        """An infrastructure failure (object storage or NATS unavailable) ended this delivery. Say so in the
        job's log and hand the job back for another delivery; on the work queue's last delivery, fail it
        with DEPENDENCY_UNAVAILABLE naming the cause. (It used to go back silently, and after the last
        delivery the job failed WORKER_LOST, "the workers died or stopped sending heartbeats", with the
        cause only in the worker's own log.) A stopping worker just hands the job back."""
        if self.agent.handing_back.is_set():
            return await self._hand_back()
        log.warning("job %s attempt %d could not go on: %s", self.job_id, self.attempt, exc)
        limit = self.max_deliver
        if 0 < limit <= self.attempt:
            try:
                return await self._fail(
                    Reason.DEPENDENCY_UNAVAILABLE,
                    f"Attempt {self.attempt}, the last of the job's {limit} deliveries, could not go on: "
                    f"{exc}. The worker could not reach the object storage or NATS it needs; it is not "
                    "retried further.")
            except Exception:
                log.warning("could not report job %s as failed; it goes back to the queue", self.job_id,
                            exc_info=True)
                return Verdict.NAK
        of = f" of {limit}" if limit > 0 else ""
        self.reporter.log(f"Attempt {self.attempt} could not go on: {exc}. The job goes back to the queue "
                          f"for attempt {self.attempt + 1}{of}, which {self._resumes()}.", "warning")
        with contextlib.suppress(Exception):
            await self.reporter.flush(force=True)
        return Verdict.NAK

    async def _report_cancelled(self) -> Verdict:
        self.reporter.log("The job was cancelled.")
        await self.reporter.status(U.WORKER_UPDATE_KIND_CANCELLED, error=states.cancelled_status())
        log.info("job %s attempt %d: cancelled", self.job_id, self.attempt)
        return Verdict.ACK

    # -- cancellation -----------------------------------------------------------------------------------

    async def _latest_state(self) -> job_pb2.JobState.ValueType | None:
        try:
            raw = await self.agent.js.get_last_msg(subjects.STREAM_EVENTS, subjects.job_events(self.job_id))
        except NotFoundError:
            return None
        return events_pb2.JobChanged.FromString(raw.data or b"").job.state

    async def _watch_cancellation(self) -> Any:
        """Follow the job's JobChanged events (the latest one first) and flag a cancellation."""

        async def on_change(msg: Msg) -> None:
            with contextlib.suppress(Exception):
                if events_pb2.JobChanged.FromString(msg.data).job.state in states.CANCEL_REQUESTED:
                    self.cancelled.set()

        return await self.agent.js.subscribe(
            subjects.job_events(self.job_id),
            stream=subjects.STREAM_EVENTS,
            cb=on_change,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        )


def _private_dir(path: Path) -> Path:
    """`path` as a folder only this user can enter (0700), created if missing."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def _make_private(root: Path) -> None:
    """Folders 0700 and files 0600 under `root`: a cached model is readable by the worker's user only."""
    for folder, dirs, files in os.walk(root):
        os.chmod(folder, 0o700)
        for name in dirs:
            os.chmod(os.path.join(folder, name), 0o700)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o600)


async def run_agent(settings: AgentSettings) -> None:
    """Connect, serve jobs until SIGTERM/SIGINT, then drain the connection."""
    if not settings.nats_url:
        raise SystemExit("TUNEFORGE_NATS_URL is not set: the worker needs the platform's NATS server.")
    if settings.worker_metrics_port:
        serve_metrics(settings.metrics_host or "127.0.0.1", settings.worker_metrics_port)
    nc = await connect(settings.nats_url, name="trainer-worker")
    agent = Agent(settings, nc.jetstream(), store_from_settings(settings), nc)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, agent.request_stop)
    try:
        await agent.run()
    finally:
        try:
            await nc.drain()
        except Exception as exc:  # NATS gone (e.g. with `tuneforge up`): nothing left to drain
            log.info("worker %s: NATS connection closed without draining (%s)", agent.worker_id,
                     type(exc).__name__)
            with contextlib.suppress(Exception):
                await nc.close()
        log.info("worker %s stopped", agent.worker_id)


def main() -> None:
    settings = AgentSettings()
    logs.configure(settings.log_level, settings.log_format)  # text, or JSON lines with job_id
    tracing.configure(settings.tracing, settings.tracing_file, service_name="tuneforge-worker")
    asyncio.run(run_agent(settings))

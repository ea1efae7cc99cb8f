"""Workers as the jobs service sees them: what their heartbeats say, and the rules that read them.

Every worker sends a WorkerHeartbeat every few seconds (core NATS, `subjects.WORKER_HEARTBEATS`). The jobs
service keeps the latest one per worker (`WorkerRow`, times on its own clock) and reads them three ways:

- Alive: a worker is alive until it says STOPPED, or until it has been quiet for `lost_after` seconds: the
  job claim's length (TUNEFORGE_WORK_ACK_WAIT_S) or three of its own heartbeat intervals, whichever is
  longer. Calling it gone any sooner would only make jobs flap: no other worker can take its job before
  the claim lapses anyway. Quiet time counts only from when this service began listening
  (`listening_since`, reset after a NATS reconnect), so a service that was itself down or cut off does not
  mistake that for every worker dying.
- Lost jobs: a job PREPARING or RUNNING on a worker that is gone (or that came back as a new process, or
  shut down) goes back to QUEUED with a reason and the attempt that comes next, or fails WORKER_LOST when
  that was its last delivery; a CANCELLING one is CANCELLED (nothing runs it any more).
- Waiting jobs: a QUEUED job for which no alive worker would take it (its pool, GPU type and count, or
  any worker for a job that names none) says so in Job.status_message.
- Free workers: an alive worker that is neither DRAINING nor holding a job (`is_free`) can take the next
  one; the fair scheduler (services.jobs.scheduler) dispatches only as many jobs as there are free workers
  to take them.

Jobs match workers as the queue routes them (`subjects.pooled_route`): a job that names a worker pool goes
only to that pool's workers (a heartbeat without a pool is the "default" pool's); a job that names a GPU
type goes only to a worker with at least as many GPUs (`gpu_count`, per node) of that type, or of unknown
type (empty gpu_type: it takes every GPU type, up to the GPUs it counted); a job that names none (or
"cpu") goes to any worker. A worker never trains a job on fewer GPUs than it asked for.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from tuneforge.v1 import job_pb2

from services.jobs.models import WorkerRow
from services.kit.protos import as_utc
from tuneforge_core import subjects

W = job_pb2.WorkerState
# Heartbeats that do not say their interval are taken to come this often.
DEFAULT_HEARTBEAT_INTERVAL_S = 5.0


@dataclass(frozen=True)
class WorkerRules:
    """The deployment's numbers the rules above use."""

    ack_wait_s: float = 60.0
    # Deliveries of a job before it fails WORKER_LOST (TUNEFORGE_WORK_MAX_DELIVER); 0 or less: no limit.
    max_deliver: int = 5
    # "Recently", for a waiting job's reason: "none seen in the last 5 minutes".
    seen_window_s: float = 300.0
    # Workers not heard from for this long leave ListWorkers.
    forget_after_s: float = 24 * 3600.0

    def lost_after(self, interval_s: float) -> float:
        return max(self.ack_wait_s, 3 * (interval_s if interval_s > 0 else DEFAULT_HEARTBEAT_INTERVAL_S))


def quiet_since(row: WorkerRow, listening_since: datetime) -> datetime:
    """From when the worker's silence counts: its last heartbeat, or when this service began listening."""
    return max(as_utc(row.last_heartbeat), listening_since)


def is_alive(row: WorkerRow, now: datetime, listening_since: datetime) -> bool:
    if row.state == W.WORKER_STATE_STOPPED:
        return False
    return now < quiet_since(row, listening_since) + timedelta(seconds=row.lost_after_s)


def has_gpu_type(row: WorkerRow, gpu_type: str) -> bool:
    """Whether the worker's GPUs are of `gpu_type` (or of unknown type, which takes every type); True for
    a job that names no GPU type."""
    route = subjects.gpu_route(gpu_type)
    if route == subjects.ANY_ROUTE:
        return True
    if row.gpu_type == "":
        return True
    return subjects.gpu_route(row.gpu_type) == route


def pool_of(row: WorkerRow) -> str:
    """The pool a worker serves: what its heartbeat said, "default" when it said none."""
    return row.pool or subjects.DEFAULT_POOL


def takes(row: WorkerRow, hardware: job_pb2.HardwareConfig) -> bool:
    """Whether the worker pulls from the queue of jobs asking for `hardware`: its pool, when the job names
    one; its GPU type (`has_gpu_type`) and at least `hardware.gpu_count` GPUs of it (unset counts as one);
    any worker (of the pool) for a job that names no GPU type; for a job on several nodes, only a worker
    that runs multi-node jobs (a Ray cluster to drive)."""
    if hardware.pool and pool_of(row) != hardware.pool:
        return False
    if hardware.node_count > 1 and not row.multi_node:
        return False
    if subjects.gpu_route(hardware.gpu_type) == subjects.ANY_ROUTE:
        return True
    return has_gpu_type(row, hardware.gpu_type) and row.gpu_count >= max(1, hardware.gpu_count)


def is_free(row: WorkerRow, now: datetime, listening_since: datetime, holds_job: bool) -> bool:
    """Whether the worker can take a job now: alive, not DRAINING, and holding none (`holds_job`: a job on
    it by the jobs' own records, or the unfinished one its latest heartbeat names). A BUSY heartbeat
    about a job that has since ended does not keep it busy: its next pull is for a new job."""
    return (is_alive(row, now, listening_since) and row.state in (W.WORKER_STATE_IDLE, W.WORKER_STATE_BUSY)
            and not holds_job)


def wanted(hardware: job_pb2.HardwareConfig) -> str:
    """The worker a job waits for, in words: "a worker", "a worker with nvidia-h100 x2", "a worker in
    pool cpu-b"."""
    where = f" in pool {hardware.pool}" if hardware.pool else ""
    if hardware.node_count > 1:
        where += f" that runs jobs on {hardware.node_count} nodes (TUNEFORGE_RAY_ADDRESS)"
    if subjects.gpu_route(hardware.gpu_type) == subjects.ANY_ROUTE:
        return f"a worker{where}"
    count = f" x{hardware.gpu_count}" if hardware.gpu_count > 1 else ""
    return f"a worker with {hardware.gpu_type.strip().lower()}{count}{where}"


def when(value: datetime) -> str:
    return as_utc(value).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def span(seconds: float) -> str:
    """A duration in words, rounded: "12 seconds", "5 minutes", "3 hours"."""
    if seconds < 90:
        n, unit = max(1, round(seconds)), "second"
    elif seconds < 90 * 60:
        n, unit = round(seconds / 60), "minute"
    else:
        n, unit = round(seconds / 3600), "hour"
    return f"{n} {unit}{'s' if n != 1 else ''}"


def waiting_note(hardware: job_pb2.HardwareConfig, workers: Iterable[WorkerRow], now: datetime,
                 listening_since: datetime, rules: WorkerRules) -> str:
    """Why a queued job cannot be taken now, or "" when an alive worker would take it. When alive workers
    have its GPU type but too few of them, the reason ends with the most any of them has."""
    workers = list(workers)
    matching = [w for w in workers if takes(w, hardware)]
    if any(is_alive(w, now, listening_since) for w in matching):
        return ""
    window = timedelta(seconds=rules.seen_window_s)
    recent = [w for w in matching if now - as_utc(w.last_heartbeat) <= window]
    if recent:
        last = max(recent, key=lambda w: as_utc(w.last_heartbeat))
        how = "shut down" if last.state == W.WORKER_STATE_STOPPED else "stopped responding"
        note = (f"waiting for {wanted(hardware)}; none is alive (the last one, {last.id}, {how} at "
                f"{when(last.last_heartbeat)})")
    else:
        # Said so that it does not change while nothing happens (every change is a JobChanged event for
        # each waiting job): since a fixed time until the window has passed, then the window.
        if (now - listening_since).total_seconds() < rules.seen_window_s:
            note = (f"waiting for {wanted(hardware)}; none seen since {when(listening_since)}, when the jobs "
                    "service began listening")
        else:
            note = f"waiting for {wanted(hardware)}; none seen in the last {span(rules.seen_window_s)}"
    # Only a job that names a GPU type can wait for want of GPUs; these workers have its type, too few.
    too_small = [w.gpu_count for w in workers if has_gpu_type(w, hardware.gpu_type)
                 and (not hardware.pool or pool_of(w) == hardware.pool) and is_alive(w, now, listening_since)]
    if too_small:
        most = max(too_small)
        note += f"; the alive workers of that GPU type have at most {most} GPU{'s' if most != 1 else ''}"
    return note


def lost_note(worker_id: str, how: str, at: datetime, next_attempt: int, rules: WorkerRules) -> str:
    """The reason of a job put back in the queue because its worker was lost."""
    of = f" of {rules.max_deliver}" if rules.max_deliver > 0 else ""
    return (f"worker {worker_id} {how} at {when(at)}; waiting for another delivery "
            f"(attempt {next_attempt}{of})")


def queued_message(requeue_note: str, waiting: str) -> str:
    """Job.status_message of a queued job: why it is back in the queue, if it is, and why no worker takes
    it now, if none would (shortened after a requeue note, which already names the worker it lost)."""
    if requeue_note and waiting:
        return f"{requeue_note}; no worker that would take it is alive"
    return requeue_note or waiting

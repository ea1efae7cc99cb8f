"""The jobs service's fleet as Prometheus sees it (services.kit.telemetry.FleetCollector): jobs by state,
the queue of each pool (work route): what waits in its JetStream consumer plus the jobs the scheduler
holds back for it, and the workers from their heartbeats,
counted at each scrape (services.jobs.workers has the rules for alive and for which pool a worker takes)."""

from __future__ import annotations

from collections import Counter
from datetime import datetime

from nats.js import JetStreamContext
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from tuneforge.v1 import job_pb2

from services.jobs.models import JobRow, WorkerRow
from services.jobs.workers import is_alive, takes
from services.kit.db import Database
from services.kit.outbox import utcnow
from services.kit.protos import as_utc
from services.kit.telemetry import FleetSnapshot
from tuneforge_core import subjects


def state_name(state: int) -> str:
    """"RUNNING" for JOB_STATE_RUNNING."""
    return job_pb2.JobState.Name(job_pb2.JobState.ValueType(state)).removeprefix("JOB_STATE_")


def worker_state_name(state: int) -> str:
    try:
        return job_pb2.WorkerState.Name(job_pb2.WorkerState.ValueType(state)).removeprefix(
            "WORKER_STATE_")
    except ValueError:
        return "UNKNOWN"


def pool_hardware(pool: str) -> job_pb2.HardwareConfig:
    """The hardware the jobs of a work route ask for: "nvidia-h100.x2" -> nvidia-h100, 2 GPUs; "any" ->
    none; "pool-gpu-a.nvidia-h100" -> one nvidia-h100 in worker pool gpu-a."""
    gpu_type = subjects.route_gpu_type(pool)
    return job_pb2.HardwareConfig(gpu_type="" if gpu_type == subjects.ANY_ROUTE else gpu_type,
                                  gpu_count=max(1, subjects.route_gpu_count(pool)),
                                  pool=subjects.route_pool(pool))


def _held_by_route(session: Session) -> Counter[str]:
    """QUEUED jobs the scheduler holds back (not yet in JetStream: no worker is free for them), by the
    route they will be published on."""
    held: Counter[str] = Counter()
    for (spec,) in session.execute(select(JobRow.spec).where(JobRow.state == job_pb2.JOB_STATE_QUEUED,
                                                               JobRow.dispatched.is_(False))):
        hardware = job_pb2.JobSpec.FromString(spec).hardware
        held[subjects.pooled_route(hardware.pool, hardware.gpu_type, hardware.gpu_count)] += 1
    return held


def _database_counts(session: Session, snap: FleetSnapshot, now: datetime,
                     held: Counter[str]) -> list[WorkerRow]:
    for value in job_pb2.JobState.values():
        if value:
            snap.jobs_by_state[state_name(value)] = 0
    rows = session.execute(select(JobRow.state, func.count(), func.min(JobRow.update_time))
                           .group_by(JobRow.state)).all()
    for state, count, oldest in rows:
        name = state_name(state)
        snap.jobs_by_state[name] = int(count)
        if oldest is not None:
            snap.oldest_update_age_s[name] = max(0.0, (now - as_utc(oldest)).total_seconds())
    held.update(_held_by_route(session))
    workers = list(session.scalars(select(WorkerRow)))
    session.expunge_all()
    return workers


async def fleet_snapshot(db: Database, js: JetStreamContext, listening_since: datetime) -> FleetSnapshot:
    """Counts the jobs by state, each pool's queue and workers, and the workers' heartbeats."""
    snap = FleetSnapshot()
    now = utcnow()
    held: Counter[str] = Counter()
    workers = await db.run(lambda session: _database_counts(session, snap, now, held))
    prefix = subjects.WORK_JOBS_PREFIX + "."
    for info in await js.consumers_info(subjects.STREAM_WORK):
        subject = (info.config.filter_subject or "") if info.config else ""
        if not subject.startswith(prefix):
            continue  # the consumer of an older version, which no worker reads
        pool = subject.removeprefix(prefix)
        snap.queue[pool] = (int(info.num_pending or 0), int(info.num_ack_pending or 0))
    # Under the fair scheduler most waiting jobs are held here, not in JetStream: they wait all the same.
    for pool, count in held.items():
        waiting, taken = snap.queue.get(pool, (0, 0))
        snap.queue[pool] = (waiting + count, taken)
    alive = [row for row in workers if is_alive(row, now, listening_since)]
    for pool in snap.queue:
        hardware = pool_hardware(pool)
        snap.pool_workers[pool] = sum(1 for row in alive if takes(row, hardware))
    states: Counter[tuple[str, str, str]] = Counter()
    for row in workers:
        living = row in alive
        states[(row.gpu_type or "", worker_state_name(row.state), "true" if living else "false")] += 1
        snap.heartbeat_age_s[(row.id, row.gpu_type or "")] = max(
            0.0, (now - as_utc(row.last_heartbeat)).total_seconds())
    snap.workers = dict(states)
    return snap

"""The fair scheduler: which waiting jobs the jobs service hands to the work queue now, and in what order.

With TUNEFORGE_SCHEDULER=fair (the default) CreateJob does not publish a job's assignment at once: the job
waits QUEUED, held (`JobRow.dispatched` false, its assignment kept in `JobRow.assignment`), until a worker
that would take it is free. Each pass of the scheduler (`plan`) then decides, from the database's view of
the fleet, which held jobs go:

- Capacity: the free workers (alive, neither DRAINING nor holding a job: `services.jobs.workers.is_free`),
  less those that the jobs already dispatched and not yet taken will occupy (each matched to a free worker
  that takes it, oldest first). A job goes only to the queue of a free worker left over, so the queue never
  holds more than the fleet can start, and what is held can still be reordered.
- Fair share: among the organizations with a job that a free worker would take, the one with the smallest
  (jobs dispatched or running) / weight goes next (TUNEFORGE_ORG_WEIGHTS; an organization not named weighs
  1); on a tie, the one whose last dispatch is longest ago (never first), then the one whose oldest waiting
  job is oldest. Within an organization a higher Job.priority goes first, then the older job. One
  organization's 200 queued jobs thus never keep another's one job waiting for more than the next free
  worker, even where that is the only worker and shares tie at every turn (the tie goes round).
- Matching: each chosen job takes the smallest free worker that takes it (fewest GPUs, then id), so a big
  worker stays free for a job that needs it.
- Limits: an organization at its running limit (TUNEFORGE_MAX_RUNNING_JOBS_PER_ORG) dispatches nothing.

With TUNEFORGE_SCHEDULER=fifo every job is published at CreateJob (within the running limit) and the work
queue hands them out in arrival order: for deployments that scale workers on the queue's depth.

`plan` is pure: the manager (services.jobs.manager) reads its inputs and applies its decision in one
transaction that holds the scheduler's lock, so two replicas never both hand out one free worker.

TUNEFORGE_WORKER_POOLS, when set, declares the deployment's pools ("default:cpu,gpu-a:nvidia-h100x8"), and
CreateJob refuses a job that none of them could ever run (`unservable`).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from tuneforge.v1 import job_pb2

from services.jobs.models import WorkerRow
from services.jobs.workers import takes
from services.kit.validation import NAME_RE
from tuneforge_core import subjects

FAIR = "fair"
FIFO = "fifo"


@dataclass(frozen=True)
class Candidate:
    """A QUEUED job as the scheduler sees it."""

    id: str
    organization: str
    priority: int
    create_time: datetime
    hardware: job_pb2.HardwareConfig


@dataclass(frozen=True)
class Dispatch:
    """A held job to publish now, and the free worker counted as taking it."""

    job: Candidate
    worker_id: str


@dataclass
class Plan:
    """What a pass decided: the jobs to dispatch, in order; the held jobs left, in the order they would
    go as workers free up; and the organizations (with jobs left) at their running limit."""

    dispatch: list[Dispatch] = field(default_factory=list)
    waiting: list[Candidate] = field(default_factory=list)
    at_limit: set[str] = field(default_factory=set)


def _route(job: Candidate) -> str:
    """The job's route: the jobs of one route are taken by the same workers."""
    hw = job.hardware
    return subjects.pooled_route(hw.pool, hw.gpu_type, max(1, hw.gpu_count))


class _Takers:
    """`takes`, remembered per worker and route for one pass (a long queue asks the same question often)."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, str], bool] = {}

    def smallest(self, free: Sequence[WorkerRow], job: Candidate) -> WorkerRow | None:
        """The first of `free` (sorted smallest first) that takes `job`."""
        route = _route(job)
        for worker in free:
            key = (worker.id, route)
            if key not in self._known:
                self._known[key] = takes(worker, job.hardware)
            if self._known[key]:
                return worker
        return None


def _within_org(job: Candidate) -> tuple[int, datetime, str]:
    return -job.priority, job.create_time, job.id


def plan(free: Iterable[WorkerRow], held: Iterable[Candidate], outstanding: Iterable[Candidate],
         active: Mapping[str, int], weights: Mapping[str, float], running_limit: int = 0,
         last_dispatch: Mapping[str, datetime] | None = None) -> Plan:
    """Which `held` jobs to dispatch now (see the module).

    free: the free workers; held: the QUEUED jobs not yet dispatched; outstanding: the QUEUED jobs
    dispatched and not yet taken (they occupy free workers first); active: each organization's jobs
    dispatched or running; weights: the organizations' weights (1 for one not named); running_limit: the
    most jobs an organization may have dispatched or running, 0 for no limit; last_dispatch: when each
    organization last had a job dispatched (none: never).
    """
    takers = _Takers()
    left = sorted(free, key=lambda w: (w.gpu_count, w.id))
    for job in sorted(outstanding, key=lambda j: (j.create_time, j.id)):
        worker = takers.smallest(left, job)
        if worker is not None:
            left.remove(worker)
    counts = Counter(active)
    queues: dict[str, list[Candidate]] = {}
    for job in held:
        queues.setdefault(job.organization, []).append(job)
    for queue in queues.values():
        queue.sort(key=_within_org)

    # Each organization's place in the round of ties: when it last had a job dispatched (seconds; -inf
    # for never), moved to the end as this pass dispatches for it.
    turn = {org: at.timestamp() for org, at in (last_dispatch or {}).items()}
    tick = max(turn.values(), default=0.0)

    def share(org: str) -> tuple[float, float, datetime, str]:
        return (counts[org] / weights.get(org, 1.0), turn.get(org, -math.inf),
                min(j.create_time for j in queues[org]), org)

    def went(org: str) -> None:
        nonlocal tick
        counts[org] += 1
        tick += 1.0
        turn[org] = tick

    out = Plan()
    while left:
        best: tuple[tuple[float, float, datetime, str], Candidate, WorkerRow] | None = None
        for org, queue in queues.items():
            if 0 < running_limit <= counts[org]:
                continue
            for job in queue:  # the organization's first job that a free worker takes
                worker = takers.smallest(left, job)
                if worker is not None:
                    key = share(org)
                    if best is None or key < best[0]:
                        best = (key, job, worker)
                    break
        if best is None:
            break
        _, job, worker = best
        out.dispatch.append(Dispatch(job, worker.id))
        left.remove(worker)
        went(job.organization)
        queues[job.organization].remove(job)
        if not queues[job.organization]:
            del queues[job.organization]
    out.at_limit = {org for org in queues if 0 < running_limit <= counts[org]}
    while queues:  # the order of what is left: the same shares, as if each went in turn
        org = min(queues, key=share)
        out.waiting.append(queues[org].pop(0))
        went(org)
        if not queues[org]:
            del queues[org]
    return out


def jobs_ahead(waiting: Sequence[Candidate], outstanding: Sequence[Candidate],
               workers: Sequence[WorkerRow]) -> dict[str, int]:
    """For each of `waiting` (in the order they go), how many jobs go before it to the same workers: the
    outstanding ones and the waiting ones before it that one of `workers` taking it would also take."""

    takers: dict[str, frozenset[str]] = {}
    for job in [*outstanding, *waiting]:
        key = _route(job)
        if key not in takers:
            takers[key] = frozenset(w.id for w in workers if takes(w, job.hardware))
    before: Counter[str] = Counter(_route(job) for job in outstanding)
    ahead: dict[str, int] = {}
    for job in waiting:
        mine = takers[_route(job)]
        ahead[job.id] = sum(n for key, n in before.items() if takers[key] & mine)
        before[_route(job)] += 1
    return ahead


# -- settings --------------------------------------------------------------------------------------------


def parse_org_weights(text: str) -> dict[str, float]:
    """TUNEFORGE_ORG_WEIGHTS: "org-a=2,org-b=0.5" -> {"org-a": 2.0, "org-b": 0.5}; empty: {}. Raises
    ValueError naming the entry that is not "<organization>=<weight above 0>"."""
    weights: dict[str, float] = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        org, sep, value = (part.strip() for part in entry.partition("="))
        try:
            weight = float(value) if sep else math.nan
        except ValueError:
            weight = math.nan
        if not NAME_RE.match(org) or not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"TUNEFORGE_ORG_WEIGHTS: '{entry}' is not <organization>=<weight>, with a "
                             "weight above 0 (e.g. 'org-a=2,org-b=1')")
        if org in weights:
            raise ValueError(f"TUNEFORGE_ORG_WEIGHTS: organization '{org}' is named twice")
        weights[org] = weight
    return weights


@dataclass(frozen=True)
class DeclaredPool:
    """One entry of TUNEFORGE_WORKER_POOLS: a pool, and the GPU type and count of its largest workers
    ("cpu" and 0 for CPU workers)."""

    name: str
    gpu_type: str
    gpu_count: int

    def describe(self) -> str:
        return f"{self.name} (cpu)" if self.gpu_type == "cpu" else \
            f"{self.name} ({self.gpu_type} x{self.gpu_count})"


_GPUS = re.compile(r"^(?P<type>.+)x(?P<count>[0-9]+)$")


def parse_worker_pools(text: str) -> list[DeclaredPool]:
    """TUNEFORGE_WORKER_POOLS: "default:cpu,gpu-a:nvidia-h100x8" -> the declared pools; empty: none
    (then any job may wait for a worker). A GPU entry ends in x<N>, its workers' GPU count (the last x<N>,
    so "nvidia-rtx4090x1" is one nvidia-rtx4090). Raises ValueError naming the entry that is wrong."""
    pools: list[DeclaredPool] = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        name, _, hardware = (part.strip() for part in entry.partition(":"))
        hardware = hardware.lower()
        if not subjects.valid_pool(name):
            raise ValueError(f"TUNEFORGE_WORKER_POOLS: '{entry}': '{name}' is not a pool name (1-40 "
                             "characters of a-z, 0-9 and single '-' between them)")
        if hardware == "cpu":
            pools.append(DeclaredPool(name, "cpu", 0))
            continue
        match = _GPUS.match(hardware)
        if match is None or not 1 <= int(match["count"]) <= 64:
            raise ValueError(f"TUNEFORGE_WORKER_POOLS: '{entry}' is not <pool>:cpu or <pool>:<gpu type>x<N> "
                             "with N from 1 to 64 (e.g. 'default:cpu,gpu-a:nvidia-h100x8')")
        pools.append(DeclaredPool(name, match["type"], int(match["count"])))
    return pools


def unservable(hardware: job_pb2.HardwareConfig, pools: Sequence[DeclaredPool]) -> tuple[str, str] | None:
    """Why no declared pool could ever run a job asking for `hardware` (resolved: gpu_count set), as
    (field, reason), or None when one could (or none are declared). A job that names no GPU type runs on
    any worker."""
    if not pools:
        return None
    named = [p for p in pools if not hardware.pool or p.name == hardware.pool]
    if not named:
        names = ", ".join(sorted({p.name for p in pools}))
        return ("spec.hardware.pool", f"no worker pool is named '{hardware.pool}'; the pools are {names}, "
                f"the largest {max(pools, key=lambda p: p.gpu_count).describe()}")
    route = subjects.gpu_route(hardware.gpu_type)
    if route == subjects.ANY_ROUTE:
        return None
    where = f" in pool {hardware.pool}" if hardware.pool else ""
    typed = [p for p in named if subjects.gpu_route(p.gpu_type) == route]
    wanted = hardware.gpu_type.strip().lower()
    if not typed:
        return ("spec.hardware.gpu_type", f"no worker{where} has {wanted} GPUs; the largest pool available "
                f"is {max(named, key=lambda p: p.gpu_count).describe()}")
    most = max(typed, key=lambda p: p.gpu_count)
    count = max(1, hardware.gpu_count)
    if most.gpu_count < count:
        return ("spec.hardware.gpu_count", f"asks for {count} {wanted} GPUs, but the workers{where} have at "
                f"most {most.gpu_count}; the largest pool available is {most.describe()}")
    return None


@dataclass(frozen=True)
class SchedulerConfig:
    """The deployment's scheduling settings (TUNEFORGE_SCHEDULER, TUNEFORGE_ORG_WEIGHTS,
    TUNEFORGE_WORKER_POOLS). The component passes them; a JobManager built without one (tests of other
    rules, tools) publishes each job at once, as "fifo" does."""

    mode: str = FIFO
    weights: Mapping[str, float] = field(default_factory=dict)
    pools: tuple[DeclaredPool, ...] = ()

    @classmethod
    def from_settings(cls, scheduler: str, org_weights: str, worker_pools: str) -> SchedulerConfig:
        return cls(mode=scheduler, weights=parse_org_weights(org_weights),
                   pools=tuple(parse_worker_pools(worker_pools)))

    @property
    def fair(self) -> bool:
        return self.mode == FAIR

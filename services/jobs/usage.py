"""Compute, cost and tokens of jobs (Job.usage) and of an organization per period (GetUsage).

Attempts. A job's usage is kept per delivery ("attempt") on its row:

- An attempt starts when a worker takes the job (the first PREPARING or RUNNING of a new delivery, and a
  job a worker thought lost turns out to run still): `usage_running_since` is set, and what the attempt
  runs on is read from the worker's latest heartbeat (`WorkerRow`):
  - a worker with no GPUs (gpu_count 0, or gpu_type "cpu") is "cpu" with 0 GPUs, at the deployment's CPU
    worker price (TUNEFORGE_CPU_HOURLY_USD);
  - a GPU worker is its own gpu_type (the job's when the worker's type is unknown), on
    min(GPUs the job asked for, unset counting as one; GPUs the worker has) GPUs: the worker trains a job
    on the GPUs it asked for, never more, and the queue never gives it a job asking for more than it has.
    The price is the hardware catalog's price of one such GPU (the estimation service's, with the
    deployment's price overrides: `PriceBook`) times that count; 0 for a GPU type the catalog lacks;
  - no heartbeat heard from the worker yet: the job's own hardware when it names a GPU type, else nothing
    ("" and 0) until the worker's next heartbeat fills it in (`fill_hardware`). Prices apply to the whole
    attempt when it ends, so a late fill loses nothing.
- An attempt ends when the job reaches a final state or goes back to QUEUED (its worker was lost): its
  seconds and cost are added to `usage_run_seconds` and `usage_cost_usd`, and `usage_running_since` is
  cleared. A job that was waiting QUEUED between a lost attempt and the next is not charged for the wait.
- Tokens: a worker reports the tokens its attempt trained so far (WorkerJobUpdate.tokens_trained). A
  redelivered attempt resumes from the previous attempt's newest checkpoint, whose trainer state carries
  the tokens seen up to it, so the job keeps the largest count reported (adding attempts would count the
  resumed part twice; an attempt lost before its first checkpoint is not counted).

Job.usage is computed live (`job_usage`): a running attempt counts up to now. GPU-hours are run time times
the latest attempt's GPU count, as the proto defines them.

GetUsage (`usage_report`) buckets the organization's jobs into UTC periods aligned to the unit (day, week
from Monday, calendar month): jobs_created by create_time; a job's compute, cost and tokens, and its final
state in jobs_by_state, count in the period it ended in; a job still holding a worker (or queued) counts
under its current state in the period holding now, with its usage up to now. A deleted job counts as it
did before: DeleteJob keeps its final state, times and usage in its tombstone (JobDeletionRow), since what
it used was used; jobs deleted before tombstones kept these are not counted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

import grpc.aio
from sqlalchemy import or_, select
from sqlalchemy.orm import Session
from tuneforge.v1 import estimation_service_pb2, estimation_service_pb2_grpc, job_pb2, job_service_pb2

from services.jobs.models import JobDeletionRow, JobRow, WorkerRow
from services.kit.db import Database
from services.kit.protos import as_utc, from_timestamp, to_timestamp
from services.kit.validation import check_organization
from tuneforge_core import states
from tuneforge_core.errors import Violations

log = logging.getLogger(__name__)

S = job_pb2.JobState
P = job_service_pb2.UsagePeriodUnit
CPU = "cpu"
# TUNEFORGE_CPU_HOURLY_USD's default: the hardware catalog's nominal price of a CPU worker.
DEFAULT_CPU_HOURLY_USD = 0.10
DEFAULT_RANGE = timedelta(days=30)
MAX_PERIODS = 366


def utcnow() -> datetime:
    """The clock of usage accounting (tests set it)."""
    return datetime.now(UTC)


# -- prices ---------------------------------------------------------------------------------------------


@dataclass
class PriceBook:
    """Hourly prices: one GPU of each catalog type, and a CPU worker.

    GPU prices are the estimation service's hardware catalog (ListHardwareOptions: the catalog with the
    deployment's TUNEFORGE_ESTIMATION_HOURLY_USD overrides), fetched by `refresh`; the jobs service does
    not read the estimation service's files. Until a refresh succeeds, GPU attempts are priced at 0."""

    cpu_hourly_usd: float = DEFAULT_CPU_HOURLY_USD
    gpu_hourly_usd: dict[str, float] = field(default_factory=dict)
    _warned: bool = field(default=False, repr=False)

    def hourly(self, hardware: str, gpu_count: int) -> float:
        if hardware == CPU:
            return self.cpu_hourly_usd
        if not hardware or gpu_count <= 0:
            return 0.0
        return self.gpu_hourly_usd.get(hardware, 0.0) * gpu_count

    def update(self, prices: Mapping[str, float]) -> None:
        self.gpu_hourly_usd = {k.lower(): float(v) for k, v in prices.items() if k.lower() != CPU}

    async def refresh(self, channel: grpc.aio.Channel, timeout_s: float = 10.0) -> bool:
        """Reads the catalog's prices from the estimation service; False (prices kept) when it cannot."""
        stub = estimation_service_pb2_grpc.EstimationServiceStub(channel)
        try:
            response = await stub.ListHardwareOptions(estimation_service_pb2.ListHardwareOptionsRequest(),
                                                      timeout=timeout_s)
        except grpc.aio.AioRpcError as err:
            say = log.debug if self._warned else log.warning
            say("could not read hardware prices from the estimation service: %s %s", err.code().name,
                err.details())
            self._warned = True
            return False
        self._warned = False
        self.update({o.gpu_type: o.hourly_usd for o in response.options})
        return True

    async def keep_fresh(self, channel: grpc.aio.Channel, interval_s: float = 600.0) -> None:
        """Refreshes now, then every `interval_s` (every 10 s until the first success)."""
        loaded = False
        while True:
            loaded = await self.refresh(channel) or loaded
            await asyncio.sleep(interval_s if loaded else 10.0)


# -- attempts -------------------------------------------------------------------------------------------


def _hardware_of(worker: WorkerRow | None, requested: job_pb2.HardwareConfig) -> tuple[str, int]:
    asked_type = requested.gpu_type.strip().lower()
    asked_type = "" if asked_type == CPU else asked_type
    asked = max(1, requested.gpu_count)
    if worker is None:
        return (asked_type, asked) if asked_type else ("", 0)
    if worker.gpu_type == CPU or worker.gpu_count <= 0:
        return CPU, 0
    return worker.gpu_type or asked_type, min(asked, worker.gpu_count)


def _price(row: JobRow, worker: WorkerRow | None, prices: PriceBook) -> None:
    hardware, count = _hardware_of(worker, job_pb2.JobSpec.FromString(row.spec).hardware)
    row.usage_hardware, row.usage_gpu_count = hardware, count
    row.usage_hourly_usd = prices.hourly(hardware, count)


def start_attempt(row: JobRow, worker: WorkerRow | None, prices: PriceBook, now: datetime | None = None
                  ) -> None:
    """A worker took the job (a new attempt): its clock starts, on the worker's hardware."""
    if row.usage_running_since is not None:
        end_attempt(row, now)
    row.usage_running_since = now or utcnow()
    _price(row, worker, prices)


def fill_hardware(row: JobRow, worker: WorkerRow, prices: PriceBook) -> bool:
    """The running attempt's hardware, once its worker's heartbeat says it (when it was not known)."""
    if row.usage_running_since is None or row.usage_hardware or row.worker_id != worker.id:
        return False
    _price(row, worker, prices)
    return True


def end_attempt(row: JobRow, now: datetime | None = None) -> None:
    """The attempt ended (final state, or back to QUEUED): its time and cost join the job's."""
    if row.usage_running_since is None:
        return
    seconds = max(0.0, ((now or utcnow()) - as_utc(row.usage_running_since)).total_seconds())
    row.usage_run_seconds = (row.usage_run_seconds or 0.0) + seconds
    row.usage_cost_usd = (row.usage_cost_usd or 0.0) + seconds * (row.usage_hourly_usd or 0.0) / 3600
    row.usage_running_since = None


def on_move(session: Session, row: JobRow, state: int, prices: PriceBook, now: datetime | None = None
            ) -> None:
    """Keeps the attempt clock in step with a state change (JobManager._move calls it)."""
    if state in states.ON_WORKER:
        if row.usage_running_since is None:
            worker = session.get(WorkerRow, row.worker_id) if row.worker_id else None
            start_attempt(row, worker, prices, now)
    elif row.usage_running_since is not None:
        end_attempt(row, now)


def record_tokens(row: JobRow, tokens: int) -> None:
    if tokens > (row.usage_tokens or 0):
        row.usage_tokens = tokens


def record_estimate(row: JobRow, fit: object | None) -> None:
    """The admission estimate (an estimation HardwareFit, or None when none was made)."""
    if fit is None:
        return
    row.estimated_cost_usd = float(fit.cost.total_usd)  # type: ignore[attr-defined]
    row.estimated_seconds = float(fit.time.total_seconds)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Totals:
    seconds: float
    gpu_hours: float
    cost_usd: float


class UsageRow(Protocol):
    """What GetUsage reads of a job: its row (JobRow), or a deleted one's tombstone (JobDeletionRow)."""

    @property
    def state(self) -> int | None: ...
    @property
    def create_time(self) -> datetime | None: ...
    @property
    def end_time(self) -> datetime | None: ...
    @property
    def usage_gpu_count(self) -> int: ...
    @property
    def usage_run_seconds(self) -> float: ...
    @property
    def usage_cost_usd(self) -> float: ...
    @property
    def usage_tokens(self) -> int: ...
    @property
    def usage_running_since(self) -> datetime | None: ...
    @property
    def usage_hourly_usd(self) -> float: ...


def totals(row: UsageRow, now: datetime | None = None) -> Totals:
    seconds, cost = row.usage_run_seconds or 0.0, row.usage_cost_usd or 0.0
    if row.usage_running_since is not None:
        running = max(0.0, ((now or utcnow()) - as_utc(row.usage_running_since)).total_seconds())
        seconds += running
        cost += running * (row.usage_hourly_usd or 0.0) / 3600
    return Totals(seconds, seconds / 3600 * (row.usage_gpu_count or 0), cost)


def job_usage(row: JobRow, now: datetime | None = None) -> job_pb2.JobUsage:
    t = totals(row, now)
    usage = job_pb2.JobUsage(hardware=row.usage_hardware or "", gpu_count=row.usage_gpu_count or 0,
                             hourly_usd=row.usage_hourly_usd or 0.0, gpu_hours=t.gpu_hours,
                             cost_usd=t.cost_usd, tokens_trained=row.usage_tokens or 0,
                             estimated_cost_usd=row.estimated_cost_usd or 0.0)
    usage.run_time.FromTimedelta(timedelta(seconds=round(t.seconds, 3)))
    if row.estimated_seconds:
        usage.estimated_duration.FromTimedelta(timedelta(seconds=round(row.estimated_seconds, 3)))
    return usage


# -- GetUsage --------------------------------------------------------------------------------------------


def period_start(value: datetime, unit: int) -> datetime:
    """The start of the UTC period holding `value`."""
    value = as_utc(value).astimezone(UTC)
    day = value.replace(hour=0, minute=0, second=0, microsecond=0)
    if unit == P.USAGE_PERIOD_UNIT_WEEK:
        return day - timedelta(days=day.weekday())
    if unit == P.USAGE_PERIOD_UNIT_MONTH:
        return day.replace(day=1)
    return day


def next_period(start: datetime, unit: int) -> datetime:
    if unit == P.USAGE_PERIOD_UNIT_WEEK:
        return start + timedelta(days=7)
    if unit == P.USAGE_PERIOD_UNIT_MONTH:
        return start.replace(year=start.year + 1, month=1) if start.month == 12 \
            else start.replace(month=start.month + 1)
    return start + timedelta(days=1)


@dataclass(frozen=True)
class UsageQuery:
    organization: str
    start: datetime
    end: datetime
    unit: int
    periods: list[tuple[datetime, datetime]]


# The latest time a usage range may name (9000-01-01), far from datetime's end so period arithmetic is safe.
LATEST_TIMESTAMP_S = 221_845_392_000


def check_request(request: job_service_pb2.GetUsageRequest, now: datetime | None = None) -> UsageQuery:
    """The request's range and periods; INVALID_ARGUMENT naming the field when they make no sense."""
    v = Violations()
    check_organization(v, request.organization)
    unit = request.period or P.USAGE_PERIOD_UNIT_DAY
    v.check(unit in P.values(), "period", "is not a usage period unit")
    for name in ("start_time", "end_time"):
        ts = getattr(request, name)
        if request.HasField(name) and not (0 <= ts.nanos < 1_000_000_000
                                           and 0 <= ts.seconds < LATEST_TIMESTAMP_S):
            v.add(name, "is not a time between 1970-01-01 and 9000-01-01 (seconds since the epoch, "
                         "nanos 0-999999999)")
    v.raise_if_any("request is invalid")
    end = from_timestamp(request.end_time) if request.HasField("end_time") else (now or utcnow())
    start = from_timestamp(request.start_time) if request.HasField("start_time") else end - DEFAULT_RANGE
    v.check(end > start, "end_time", f"must be after start_time ({start.isoformat()})")
    v.raise_if_any("request is invalid")
    periods: list[tuple[datetime, datetime]] = []
    cursor = period_start(start, unit)
    while cursor < end:
        if len(periods) == MAX_PERIODS:
            v.add("start_time", f"the range holds more than {MAX_PERIODS} periods of "
                                f"{P.Name(unit).removeprefix('USAGE_PERIOD_UNIT_').lower()}; "
                                "narrow it or use a longer period")
            v.raise_if_any("request is invalid")
        following = next_period(cursor, unit)
        periods.append((cursor, following))
        cursor = following
    return UsageQuery(request.organization, start, end, unit, periods)


@dataclass
class _Bucket:
    created: int = 0
    by_state: dict[int, int] = field(default_factory=dict)
    gpu_hours: float = 0.0
    compute_hours: float = 0.0
    cost_usd: float = 0.0
    tokens: int = 0

    def add(self, row: UsageRow, now: datetime) -> None:
        t = totals(row, now)
        state = row.state or S.JOB_STATE_UNSPECIFIED  # a tombstone without one is never read
        self.by_state[state] = self.by_state.get(state, 0) + 1
        self.gpu_hours += t.gpu_hours
        self.compute_hours += t.seconds / 3600
        self.cost_usd += t.cost_usd
        self.tokens += row.usage_tokens or 0

    def merge(self, other: _Bucket) -> None:
        self.created += other.created
        for state, count in other.by_state.items():
            self.by_state[state] = self.by_state.get(state, 0) + count
        self.gpu_hours += other.gpu_hours
        self.compute_hours += other.compute_hours
        self.cost_usd += other.cost_usd
        self.tokens += other.tokens

    def to_proto(self, start: datetime, end: datetime) -> job_service_pb2.UsagePeriod:
        period = job_service_pb2.UsagePeriod(
            jobs_created=self.created, gpu_hours=self.gpu_hours, compute_hours=self.compute_hours,
            cost_usd=self.cost_usd, tokens_trained=self.tokens,
            jobs_by_state=[job_service_pb2.JobStateCount(state=job_pb2.JobState.ValueType(s), count=c)
                           for s, c in sorted(self.by_state.items())])
        period.start_time.CopyFrom(to_timestamp(start))
        period.end_time.CopyFrom(to_timestamp(end))
        return period


def usage_report(query: UsageQuery, rows: Iterable[UsageRow], now: datetime | None = None
                 ) -> job_service_pb2.GetUsageResponse:
    """Buckets the organization's jobs (those created before the range's end) into the query's periods."""
    at = now or utcnow()
    buckets = [_Bucket() for _ in query.periods]
    starts = [start for start, _ in query.periods]
    first, last = query.periods[0][0], query.periods[-1][1]

    def index(value: datetime) -> int | None:
        value = as_utc(value)
        if not first <= value < last:
            return None
        low, high = 0, len(starts) - 1
        while low < high:  # the last period starting at or before value
            mid = (low + high + 1) // 2
            if starts[mid] <= value:
                low = mid
            else:
                high = mid - 1
        return low

    for row in rows:
        created = index(row.create_time) if row.create_time is not None else None
        if created is not None:
            buckets[created].created += 1
        ended = row.state in states.FINAL
        when = row.end_time if ended and row.end_time is not None else at
        i = index(when)
        if i is not None:
            buckets[i].add(row, at)
    response = job_service_pb2.GetUsageResponse(
        periods=[b.to_proto(s, e) for b, (s, e) in zip(buckets, query.periods, strict=True)])
    total = _Bucket()
    for bucket in buckets:
        total.merge(bucket)
    response.total.CopyFrom(total.to_proto(first, last))
    return response


async def get_usage(db: Database, request: job_service_pb2.GetUsageRequest, now: datetime | None = None
                    ) -> job_service_pb2.GetUsageResponse:
    """GetUsage: the organization's usage per period (its own jobs only)."""
    at = now or utcnow()
    query = check_request(request, at)
    first, last = query.periods[0][0], query.periods[-1][1]

    def load(session: Session) -> job_service_pb2.GetUsageResponse:
        rows: list[UsageRow] = list(session.scalars(select(JobRow).where(
            JobRow.organization == query.organization, JobRow.create_time < last,
            or_(JobRow.end_time.is_(None), JobRow.end_time >= first))).all())
        # Deleted jobs count too: what they used was used (their tombstones keep it).
        rows += session.scalars(select(JobDeletionRow).where(
            JobDeletionRow.organization == query.organization, JobDeletionRow.state.is_not(None),
            JobDeletionRow.create_time < last, JobDeletionRow.end_time >= first)).all()
        return usage_report(query, rows, at)

    return await db.run(load)

"""Job lifecycle rules: creation, cancellation, and the state machine workers drive.

Every change of a job happens in one transaction with the JobChanged event that announces it (the outbox);
the relay then publishes it. Worker updates are applied at most once (the inbox) and only when the state
machine allows them, so redelivered, late or stale updates change nothing.

Worker updates are fenced: the job's row records the delivery that holds it (worker_id and attempt, the
work queue's delivery count), and an update is accepted only from that holder, or as the first update
(PREPARING or RUNNING) of a newer delivery, which then becomes the holder; nothing is accepted for a job
that has ended, and a SUCCEEDED update's artifacts must lie under the job's own output prefix
(jobs/<organization>/<job id>/ in the object store). Anything else is refused: logged at WARNING and passed
to `JobManager.on_rejected_update` (`_fence` has the exact rules).

A job never strands silently: the workers' heartbeats (`services.jobs.workers` has the rules) put a job
whose worker was lost back to QUEUED, or fail it WORKER_LOST after its last delivery, and a queued job that
no alive worker would take says why in Job.status_message (set at CreateJob, kept current by
`check_workers`, cleared when a worker takes it).

CreateJob refuses what could never be honoured, rather than letting a worker quietly do something else:
a model the organization may not use, or that is not there (`tuneforge_core.models`); half precision on a
spec that may land on a CPU worker (`resolve_spec`); early stopping without validation data, which only
this service can tell, since it reads the dataset's splits here. It also keeps the organization's quotas
(`services.jobs.quotas`): too many QUEUED jobs is refused, and a job beyond the running limit waits QUEUED
with its assignment held back until one of the organization's jobs ends. With declared worker pools
(TUNEFORGE_WORKER_POOLS) it refuses a job that no pool could ever run, naming the field.

Dispatch (services.jobs.scheduler): under the fair scheduler a new job is held until a worker that would
take it is free, and a scheduler pass (`dispatch`, `_schedule`) publishes held jobs by the organizations'
weighted shares, then priority, then age. A pass runs when a job is created (in CreateJob's transaction),
and after the transactions that may free a worker or a slot: a heartbeat of a worker newly IDLE, a worker
update that starts or ends a job, a cancellation, a job failed for want of deliveries, and the periodic
workers check (which also brings each held job's reason up to date). Under "fifo" every job within the
running limit is published at CreateJob, as before.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import grpc
from google.rpc import status_pb2
from nats.aio.client import Client as NATS
from sqlalchemy import event as sa_event
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import dataset_pb2, job_pb2, job_service_pb2

from services.jobs import model_types, timeline, usage, warm_start
from services.jobs.converters import job_to_proto, worker_to_proto
from services.jobs.datasets_client import DatasetLookup
from services.jobs.estimation_client import HardwareCheck
from services.jobs.models import JobDeletionRow, JobInbox, JobOutbox, JobRow, WorkerRow
from services.jobs.quotas import SLOT_STATES, JobQuotas, held_note
from services.jobs.read_cache import JobReadCache
from services.jobs.repository import JobLookups, JobReader, JobRepository, WorkerRepository
from services.jobs.scheduler import Candidate, SchedulerConfig, jobs_ahead, plan, unservable
from services.jobs.tracker_secrets import TrackerSecretKeeper
from services.jobs.usage import PriceBook
from services.jobs.workers import (
    WorkerRules,
    is_alive,
    is_free,
    lost_note,
    pool_of,
    queued_message,
    takes,
    waiting_note,
    when,
)
from services.kit.db import Database
from services.kit.outbox import OutboxRelay, add_event, first_time, seen_before, utcnow
from services.kit.paging import decode_token, encode_token, page_size
from services.kit.protos import as_utc, from_timestamp, replace_nul, to_timestamp
from services.kit.validation import check_name, check_organization, check_request_id, check_text
from tuneforge_core import states, subjects, tracing
from tuneforge_core.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    ResourceExhausted,
    Violations,
    error_status,
    not_found,
)
from tuneforge_core.ids import new_id
from tuneforge_core.models import ModelPolicy
from tuneforge_core.reasons import Reason
from tuneforge_core.spec import check_dataset_fit, check_dataset_options, resolve_spec
from tuneforge_core.states import FINAL, cancelled_status
from tuneforge_core.storage import ObjectStore
from tuneforge_core.tracker_secrets import take_secrets

log = logging.getLogger(__name__)

S = job_pb2.JobState
U = events_pb2.WorkerUpdateKind
W = job_pb2.WorkerState
# CreateJobRequest.description: free text, at most this many characters.
MAX_DESCRIPTION = 1024
# The first updates of a delivery: only these may establish a newer delivery as the job's holder.
DELIVERY_STARTS = frozenset({U.WORKER_UPDATE_KIND_PREPARING, U.WORKER_UPDATE_KIND_RUNNING})
# Updates after which a scheduler pass may dispatch more: the worker took a job (maybe one counted for
# another worker, which is free then) or ended one (it is free now, before its next heartbeat says so).
FREES_OR_TAKES_WORKER = frozenset({U.WORKER_UPDATE_KIND_PREPARING, U.WORKER_UPDATE_KIND_SUCCEEDED,
                                   U.WORKER_UPDATE_KIND_FAILED, U.WORKER_UPDATE_KIND_CANCELLED})
# Where rejected worker updates go besides the log: (job_id, organization, worker_id, reason).
RejectionHook = Callable[[str, str, str, str], None]


def _no_audit(job_id: str, organization: str, worker_id: str, reason: str) -> None:
    pass


def _split_uri(dataset: dataset_pb2.Dataset, kind: int) -> str:
    return next((s.uri for s in dataset.splits if s.kind == kind and s.example_count > 0), "")


def _candidate(row: JobRow) -> Candidate:
    """A queued job as the scheduler sees it."""
    return Candidate(row.id, row.organization, row.priority or job_pb2.JOB_PRIORITY_NORMAL,
                     as_utc(row.create_time), job_pb2.JobSpec.FromString(row.spec).hardware)


def _job_holders(on_worker: Sequence[JobRow], queued: Sequence[JobRow]) -> Callable[[WorkerRow], bool]:
    """Whether a worker holds a job: one on it by the jobs' records, or the unfinished one its latest
    heartbeat says it is BUSY with (a job that has ended since does not count: the worker is free)."""
    holding = {job.worker_id for job in on_worker}
    unfinished = {job.id for job in on_worker} | {job.id for job in queued}
    return lambda w: w.id in holding or (w.state == W.WORKER_STATE_BUSY and w.job_id in unfinished)


def _request_id_reused(request_id: str) -> AlreadyExists:
    return AlreadyExists("request_id was already used for a different request",
                         reason=Reason.REQUEST_ID_REUSED, metadata={"request_id": request_id},
                         violations=[FieldViolation("request_id", "was already used for a different request: "
                                                                  "send a new one for a new job")])


def _request_hash(request: job_service_pb2.CreateJobRequest) -> str:
    clean = job_service_pb2.CreateJobRequest()
    clean.CopyFrom(request)
    clean.request_id = ""
    clean.validate_only = False
    return hashlib.sha256(clean.SerializeToString(deterministic=True)).hexdigest()


@dataclass(frozen=True)
class _Refusal:
    """A worker update the fence refused, and why."""

    organization: str
    reason: str


class JobManager:
    def __init__(self, db: Database, relay: OutboxRelay, datasets: DatasetLookup, store: ObjectStore,
                 nc: NATS, *, hardware: HardwareCheck | None = None,
                 allow_user_reward_code: bool = False, models: ModelPolicy | None = None,
                 workers: WorkerRules | None = None, quotas: JobQuotas | None = None,
                 scheduler: SchedulerConfig | None = None) -> None:
        self.db = db
        self.worker_rules = workers or WorkerRules()
        self.quotas = quotas or JobQuotas()
        self.scheduler = scheduler or SchedulerConfig()
        # Called (after the transaction) for every worker update refused by the fence; a no-op until an
        # audit log is wired in. Its failures are logged, never raised into the update consumer.
        self.on_rejected_update: RejectionHook = _no_audit
        # Called (from a database thread) after each commit that ended a job: checkpoint retention
        # (services.jobs.checkpoints) wakes on it. A no-op until one is wired in.
        self.on_job_ended: Callable[[], None] = lambda: None
        # Seals the tracker secrets of new jobs (services.jobs.tracker_secrets); set by the component.
        self.tracker_secrets: TrackerSecretKeeper | None = None
        # Since when this process hears heartbeats (the component resets it after a NATS reconnect): a
        # worker's silence only counts from here.
        self.listening_since = utcnow()
        # Hourly prices of the hardware jobs run on (Job.usage; services.jobs.usage); the component keeps
        # them current from the estimation service's catalog.
        self.prices = PriceBook()
        self.hardware = hardware
        # Without a policy: hub ids and the organization's own outputs only, no local paths.
        self.models = models or ModelPolicy(store=store)
        self.allow_user_reward_code = allow_user_reward_code
        self.relay = relay
        self.datasets = datasets
        self.store = store
        self.nc = nc
        # GetJob's answers between changes (services.jobs.read_cache); this process' own changes reach it
        # as they are flushed, other replicas' through `read_cache.observe` (the component feeds it).
        self.read_cache = JobReadCache()
        self.read_cache.watch(db)

    # -- changes ---------------------------------------------------------------------------------

    def _record_change(self, session: Session, row: JobRow, previous_state: int) -> None:
        row.revision += 1
        row.update_time = utcnow()
        session.flush()
        event = events_pb2.JobChanged(event_id=new_id("evt"),
                                      previous_state=job_pb2.JobState.ValueType(previous_state),
                                      job=job_to_proto(row))
        event.time.CopyFrom(to_timestamp(row.update_time))
        add_event(session, JobOutbox, subjects.job_events(row.id), event, event.event_id)

    def _move(self, session: Session, row: JobRow, state: int, *,
              error: status_pb2.Status | None = None, requeue_note: str = "",
              status_message: str = "") -> None:
        previous = row.state
        row.state = state
        # Only a queued job waits for something; a move clears what it waited for unless it says anew.
        row.requeue_note, row.status_message = requeue_note, status_message
        if error is not None:
            row.error = error.SerializeToString()
        if state in FINAL:
            row.end_time = utcnow()
        usage.on_move(session, row, state, self.prices)  # an attempt's clock starts or stops
        timeline.on_move(session, row, previous, state)  # phase, and CANCEL_REQUESTED or how it ended
        self._record_change(session, row, previous)
        if state in FINAL and previous not in FINAL and row.dispatched and not self.scheduler.fair:
            self._dispatch_held(session, row.organization)  # it held a running slot: the next may start
        # (Under the fair scheduler the caller runs a pass once this transaction committed: `dispatch`.)
        if state in FINAL and previous not in FINAL:
            hook = self.on_job_ended
            sa_event.listen(session, "after_commit", lambda _session: hook(), once=True)

    # -- quotas (services.jobs.quotas) -----------------------------------------------------------

    def _check_queued_quota(self, repo: JobRepository, org: str) -> None:
        limit = self.quotas.max_queued_jobs_per_org
        if limit <= 0:
            return
        queued = repo.count(org, [S.JOB_STATE_QUEUED])
        if queued >= limit:
            raise ResourceExhausted(
                f"organization {org} has {queued} queued jobs, its limit (max_queued_jobs_per_org = "
                f"{limit}); wait for some to start or cancel some",
                reason=Reason.QUOTA_EXCEEDED,
                metadata={"limit": "max_queued_jobs_per_org", "value": str(limit), "queued": str(queued)})

    def _running(self, repo: JobRepository, org: str) -> int:
        """The organization's jobs that hold a running slot: dispatched and not ended."""
        return repo.count(org, SLOT_STATES, dispatched=True)

    def _dispatch_held(self, session: Session, org: str) -> int:
        """Publishes the organization's oldest held jobs into the running slots free now; returns how many.
        Locks the organization first (callers hold no lock on a held job)."""
        repo = JobRepository(session)
        repo.lock_organization(org)
        limit = self.quotas.max_running_jobs_per_org
        free = None if limit <= 0 else limit - self._running(repo, org)
        if free is not None and free <= 0:
            return 0
        held = repo.held(org, limit=free, for_update=True)
        if not held:
            return 0
        workers = WorkerRepository(session).all()
        for row in held:
            self._publish(session, row, workers)
            self._record_change(session, row, row.state)
            log.info("job %s of organization %s dispatched: a running slot freed", row.id, org)
        return len(held)

    def _publish(self, session: Session, row: JobRow, workers: Sequence[WorkerRow]) -> None:
        """Hands a held job's assignment to the work queue, on its pool's, GPU type's and count's route
        (only the workers that would take it pull it); the caller records the change."""
        assert row.assignment is not None, f"held job {row.id} has no assignment"
        assignment = events_pb2.JobAssignment.FromString(row.assignment)
        hardware = assignment.spec.hardware
        row.dispatched, row.assignment, row.dispatch_time = True, None, utcnow()
        row.status_message = queued_message(row.requeue_note, waiting_note(
            hardware, workers, utcnow(), self.listening_since, self.worker_rules))
        subject = subjects.work_jobs(hardware.gpu_type, hardware.gpu_count, hardware.pool)
        add_event(session, JobOutbox, subject, assignment, assignment.event_id, row.assignment_traceparent)
        row.assignment_traceparent = None

    # -- the fair scheduler (services.jobs.scheduler) --------------------------------------------

    async def dispatch(self) -> int:
        """A scheduler pass in its own transaction (fair scheduler only); returns how many jobs it
        changed. Failures are logged, not raised: the periodic workers check runs the next pass."""
        if not self.scheduler.fair:
            return 0
        try:
            changed = await self.db.run(lambda s: self._schedule(s))
        except Exception:
            log.exception("the scheduler pass failed; the workers check will run the next")
            return 0
        if changed:
            self.relay.notify()
        return changed

    def _schedule(self, session: Session, *, notes: bool = False, new: JobRow | None = None) -> int:
        """Publishes the held jobs that free workers will take, chosen by `scheduler.plan`; returns how
        many jobs changed (dispatched, or their reason rewritten). Takes the scheduler's lock first (after
        the organization's, in CreateJob), so passes take turns. `notes`: also bring every held job's
        reason up to date (the periodic check); `new`: the job CreateJob is adding, whose reason is always
        written and whose change CreateJob records itself."""
        repo = JobRepository(session)
        repo.lock_scheduler()
        at = utcnow()
        workers = WorkerRepository(session).all()
        queued = repo.in_states([S.JOB_STATE_QUEUED])
        held = [_candidate(job) for job in queued if not job.dispatched]
        if not held:
            return 0
        outstanding = [_candidate(job) for job in queued if job.dispatched]
        on_worker = repo.in_states(states.ON_WORKER)
        holds = _job_holders(on_worker, queued)
        free = [w for w in workers if is_free(w, at, self.listening_since, holds(w))]
        active = repo.active_by_organization()
        last = repo.last_dispatch_by_organization({job.organization for job in held})
        decided = plan(free, held, outstanding, active, self.scheduler.weights,
                       self.quotas.max_running_jobs_per_org, last)
        changed = 0
        for choice in decided.dispatch:
            row = repo.get(choice.job.id, for_update=True)
            if row is None or row.state != S.JOB_STATE_QUEUED or row.dispatched:
                continue  # cancelled meanwhile
            self._publish(session, row, workers)
            if row is not new:
                self._record_change(session, row, row.state)
            changed += 1
            log.info("job %s of organization %s dispatched for worker %s", row.id, row.organization,
                     choice.worker_id)
        waiting = [job for job in decided.waiting if notes or (new is not None and job.id == new.id)]
        if waiting:
            ahead = jobs_ahead(decided.waiting, outstanding, [w for w in workers if is_alive(
                w, at, self.listening_since) and w.state != W.WORKER_STATE_DRAINING])
            for job in waiting:
                row = new if new is not None and job.id == new.id else repo.get(job.id, for_update=True)
                if row is None or row.state != S.JOB_STATE_QUEUED or row.dispatched:
                    continue
                note = queued_message(row.requeue_note, self._held_reason(
                    job, workers, at, ahead[job.id], active.get(job.organization, 0),
                    job.organization in decided.at_limit))
                if note != row.status_message:
                    row.status_message = note
                    if row is not new:
                        self._record_change(session, row, row.state)
                        changed += 1
        return changed

    def _held_reason(self, job: Candidate, workers: Sequence[WorkerRow], at: datetime, ahead: int,
                     running: int, at_limit: bool) -> str:
        """Why a held job waits: no alive worker would take it; its organization's running limit; or
        every worker that would take it is busy (or draining), with `ahead` jobs before it."""
        note = waiting_note(job.hardware, workers, at, self.listening_since, self.worker_rules)
        if note:
            return note
        if at_limit:
            return held_note(job.organization, running, self.quotas.max_running_jobs_per_org)
        working = [w for w in workers if takes(w, job.hardware) and is_alive(w, at, self.listening_since)
                   and w.state != W.WORKER_STATE_DRAINING]
        if not working:
            return ("waiting for a free worker: the alive workers that would take it are all draining "
                    "(finishing their jobs before they stop)")
        them = "the worker that would take it is" if len(working) == 1 else \
            f"all {len(working)} workers that would take it are"
        jobs = "job" if ahead == 1 else "jobs"
        return f"waiting for a free worker: {them} busy; {ahead} {jobs} ahead of it"

    def _held_message(self, repo: JobRepository, org: str) -> str:
        return held_note(org, self._running(repo, org), self.quotas.max_running_jobs_per_org)

    # -- API -------------------------------------------------------------------------------------

    async def create(self, request: job_service_pb2.CreateJobRequest) -> job_pb2.Job:
        v = Violations()
        check_organization(v, request.organization)
        check_name(v, request.name, required=False)
        check_request_id(v, request.request_id)
        # Shown as it is by `tuneforge jobs get` and the console: no terminal escapes (tab, line breaks kept).
        check_text(v, request.description, "description", max_chars=MAX_DESCRIPTION)
        v.check(len(request.labels) <= 64, "labels", "at most 64 labels")
        for key, value in request.labels.items():
            v.check(0 < len(key) <= 63 and len(value) <= 63, f"labels[{key}]",
                    "keys must be 1-63 characters and values at most 63")
        v.check(request.priority in job_pb2.JobPriority.values(), "priority",
                f"{request.priority} is not a JobPriority (LOW, NORMAL or HIGH)")
        v.raise_if_any("request is invalid")
        spec = resolve_spec(request.spec, allow_user_reward_code=self.allow_user_reward_code)
        # Tracker secrets leave the spec before anything else sees it (tuneforge_core.tracker_secrets).
        secrets = take_secrets(spec)
        if secrets and self.tracker_secrets is None:
            raise FailedPrecondition("spec.integrations: this jobs service cannot keep tracker secrets (no "
                                     "credentials key); leave api_key and token empty")
        org = request.organization
        refusal = unservable(spec.hardware, self.scheduler.pools)
        if refusal is not None:  # TUNEFORGE_WORKER_POOLS: no declared pool could ever run it
            v.add(*refusal)
            v.raise_if_any("no worker pool of this deployment can run the job")

        if request.request_id and not request.validate_only:
            existing = await self.db.run(lambda s: self._replay(s, org, request))
            if existing is not None:
                return existing

        # Before anything else is read: the models' rule, then that a local or stored model is there.
        await asyncio.to_thread(self.models.check_spec, spec, org)
        dataset = await self.datasets.get(org, spec.dataset, "spec.dataset")
        self._check_ready(dataset, "spec.dataset")
        # spec.model_type from the base model; an image dataset needs a VLM (services.jobs.model_types)
        await model_types.resolve(spec, dataset, _split_uri(dataset, dataset_pb2.DATASET_SPLIT_KIND_TRAIN),
                                  org, self.models, self.store)
        check_dataset_fit(spec, dataset.format)
        check_dataset_options(dataset.options)
        admitted = None
        if self.hardware is not None:  # the fit on the GPU the job asked for, by its own estimate
            admitted = await self.hardware.check(org, spec, dataset)
        train_uri = _split_uri(dataset, dataset_pb2.DATASET_SPLIT_KIND_TRAIN)
        validation_uri = _split_uri(dataset, dataset_pb2.DATASET_SPLIT_KIND_VALIDATION)
        if spec.validation_dataset:
            extra = await self.datasets.get(org, spec.validation_dataset, "spec.validation_dataset")
            self._check_ready(extra, "spec.validation_dataset")
            check_dataset_options(extra.options, "spec.validation_dataset")
            validation_uri = _split_uri(extra, dataset_pb2.DATASET_SPLIT_KIND_TRAIN)
            spec.validation_dataset = extra.id
        spec.dataset = dataset.id
        if not train_uri:
            raise FailedPrecondition(f"dataset '{dataset.name}' has no training examples",
                                     reason=Reason.DATASET_NOT_READY)
        self._check_early_stopping(spec, dataset, validation_uri)
        warm = await warm_start.resolve(self.db, self.store, org, spec)  # spec.warm_start's source weights

        job_id = new_id("job")
        now = utcnow()
        row = JobRow(
            id=job_id, organization=org, name=request.name or job_id, description=request.description,
            spec=spec.SerializeToString(), state=S.JOB_STATE_QUEUED, attempt=0, worker_id="", revision=0,
            labels=dict(request.labels), request_id=request.request_id or None,
            request_hash=_request_hash(request), create_time=now, update_time=now,
            priority=request.priority or job_pb2.JOB_PRIORITY_NORMAL,
        )
        usage.record_estimate(row, admitted)
        if request.validate_only:
            await self.db.run(lambda s: self._check_queued_quota(JobRepository(s), org))
            row.revision = 1
            return job_to_proto(row)

        assignment = events_pb2.JobAssignment(
            event_id=f"{job_id}.assignment", job_id=job_id, organization=org, spec=spec,
            train_uri=train_uri, validation_uri=validation_uri, dataset_format=dataset.format,
            test_uri=_split_uri(dataset, dataset_pb2.DATASET_SPLIT_KIND_TEST),
            output_prefix=self.store.uri(f"jobs/{org}/{job_id}"),
            admission_estimate=admitted, warm_start=warm,
            sealed_tracker_secrets=(self.tracker_secrets.seal(job_id, secrets)
                                    if self.tracker_secrets is not None else b""),
        )
        assignment.create_time.CopyFrom(to_timestamp(now))

        def insert(session: Session) -> job_pb2.Job:
            repo = JobRepository(session)
            repo.lock_organization(org)  # first: the quota decisions of one organization take turns
            if repo.name_taken(org, row.name):
                raise AlreadyExists(f"a job named '{row.name}' already exists in organization '{org}'",
                                    metadata={"resource_type": "job", "resource": row.name})
            self._check_queued_quota(repo, org)
            # Held until published: by the scheduler pass below (fair), or at once within the running
            # limit (fifo), else when one of the organization's jobs ends.
            row.dispatched, row.assignment = False, assignment.SerializeToString()
            row.assignment_traceparent = tracing.current_traceparent()
            limit = self.quotas.max_running_jobs_per_org
            within_limit = limit <= 0 or self._running(repo, org) < limit
            if not self.scheduler.fair and not within_limit:
                row.status_message = self._held_message(repo, org)
            repo.add(row)
            if self.scheduler.fair:
                self._schedule(session, new=row)
            elif within_limit:
                # Queued by pool, GPU type and count: only the workers that would take it pull it.
                self._publish(session, row, WorkerRepository(session).all())
            timeline.on_created(session, row)
            self._record_change(session, row, S.JOB_STATE_UNSPECIFIED)
            return job_to_proto(row)

        try:
            # The outbox rows keep this span's context: the assignment and JobChanged continue its trace.
            with tracing.span("store job and events", attributes={"tuneforge.job_id": job_id,
                                                                  "tuneforge.organization": org}):
                job = await self.db.run(insert)
        except IntegrityError:
            # A concurrent create with the same name or request_id won the race.
            replay = await self.db.run(lambda s: self._replay(s, org, request)) if request.request_id \
                else None
            if replay is not None:
                return replay
            raise AlreadyExists(f"a job named '{row.name}' already exists in organization '{org}'",
                                metadata={"resource_type": "job", "resource": row.name}) from None
        self.relay.notify()
        return job

    def _replay(self, session: Session, org: str,
                request: job_service_pb2.CreateJobRequest) -> job_pb2.Job | None:
        row = JobRepository(session).by_request_id(org, request.request_id)
        if row is None:
            # The job it made may have been deleted since: a retried create does not make it again.
            gone = session.scalars(select(JobDeletionRow).where(
                JobDeletionRow.organization == org, JobDeletionRow.request_id == request.request_id)
                .order_by(JobDeletionRow.deleted_at.desc()).limit(1)).first()
            if gone is None:
                return None
            if gone.request_hash != _request_hash(request):
                raise _request_id_reused(request.request_id)
            raise AlreadyExists(
                f"request_id '{request.request_id}' already created job {gone.job_id}, which was deleted at "
                f"{as_utc(gone.deleted_at):%Y-%m-%d %H:%M:%S} UTC; send a new request_id to create another "
                "job",
                reason=Reason.REQUEST_ID_REUSED,
                metadata={"request_id": request.request_id, "job": gone.job_id, "deleted": "true"},
                violations=[FieldViolation("request_id",
                                           f"already created job {gone.job_id}, since deleted")])
        if row.request_hash != _request_hash(request):
            raise _request_id_reused(request.request_id)
        return job_to_proto(row)

    @staticmethod
    def _check_early_stopping(spec: job_pb2.JobSpec, dataset: dataset_pb2.Dataset,
                              validation_uri: str) -> None:
        """Early stopping watches the validation loss: without validation data it could never stop early.

        Workers used to switch it off and train to the end with a warning; the job now says what it
        needs, and a job that cannot have it is refused here, where the dataset's splits are known."""
        hp = spec.hyperparameters
        if not (hp.early_stopping.enabled or hp.keep_best_model) or validation_uri:
            return
        field, what = ("early_stopping.enabled", "early stopping") if hp.early_stopping.enabled else (
            "keep_best_model", "keeping the best model")
        lacking = (
            f"spec.validation_dataset '{spec.validation_dataset}' has no examples" if spec.validation_dataset
            else f"dataset '{dataset.name or dataset.id}' has no validation split"
        )
        v = Violations()
        v.add(f"spec.hyperparameters.{field}",
              f"{what} needs validation data, and {lacking}; set spec.validation_dataset, give the "
              f"dataset a validation split, or turn {what} off")
        v.raise_if_any("the job cannot be honoured")

    @staticmethod
    def _check_ready(dataset: dataset_pb2.Dataset, field: str) -> None:
        if dataset.state != dataset_pb2.DATASET_STATE_READY:
            state = dataset_pb2.DatasetState.Name(dataset.state)
            raise FailedPrecondition(f"{field}: dataset '{dataset.name}' is {state}, not READY",
                                     reason=Reason.DATASET_NOT_READY, metadata={"dataset": dataset.id})

    async def get(self, organization: str, ref: str) -> job_pb2.Job:
        self._check_ref(organization, ref)
        cached = self.read_cache.get(organization, ref)
        if cached is not None:
            return cached
        generation = self.read_cache.generation(ref)  # before the read: a change meanwhile keeps it out
        # A light read (services.jobs.repository.JobLookups): no session, grouped with concurrent ones.
        row = await JobLookups.of(self.db).find(organization, ref)
        if row is None:
            raise not_found("job", ref, organization)
        job = job_to_proto(row)
        if job.id == ref:  # kept by id only: a name may pass to another job once this one is deleted
            self.read_cache.keep(job, generation)
        return job

    async def list(self, organization: str, states: Sequence[int], size: int,
                   token: str) -> tuple[list[job_pb2.Job], str]:
        v = Violations()
        check_organization(v, organization)
        for i, state in enumerate(states):
            v.check(state in S.values() and state != S.JOB_STATE_UNSPECIFIED, f"states[{i}]",
                    "is not a job state")
        v.raise_if_any("request is invalid")
        limit = page_size(size)
        query = {"org": organization, "states": sorted(states)}
        cursor = decode_token(token, query, cursor_type=str)  # id of the last job returned

        def load() -> tuple[list[job_pb2.Job], str]:
            with self.db.engine.connect() as connection:  # a light read: JobReader, no session
                rows = JobReader(connection).list(organization, states, cursor, limit + 1)
            more = len(rows) > limit
            rows = rows[:limit]
            return [job_to_proto(r) for r in rows], encode_token(rows[-1].id, query) if more else ""

        return await self.db.pool.run(load)

    async def cancel(self, organization: str, ref: str) -> job_pb2.Job:
        self._check_ref(organization, ref)

        def apply(session: Session) -> job_pb2.Job:
            row = JobRepository(session).find(organization, ref, for_update=True)
            if row is None:
                raise not_found("job", ref, organization)
            if row.state in (S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED):
                raise FailedPrecondition(
                    f"job '{row.name}' already ended {states.name(row.state)} and cannot be cancelled",
                    metadata={"job": row.id, "state": states.name(row.state)})
            if row.state == S.JOB_STATE_QUEUED:
                # No worker holds it: it is final at once; a worker that pulls it later sees the state.
                self._move(session, row, S.JOB_STATE_CANCELLED, error=cancelled_status())
            elif row.state in (S.JOB_STATE_PREPARING, S.JOB_STATE_RUNNING):
                self._move(session, row, S.JOB_STATE_CANCELLING)
            return job_to_proto(row)

        job = await self.db.run(apply)
        self.relay.notify()
        await self.dispatch()  # a cancelled job frees its slot, and a worker that was to take it
        return job

    @staticmethod
    def _check_ref(organization: str, ref: str) -> None:
        v = Violations()
        check_organization(v, organization)
        v.check(bool(ref), "job", "is required: a job id or name")
        v.raise_if_any("request is invalid")

    # -- worker updates --------------------------------------------------------------------------

    async def apply_worker_update(self, update: events_pb2.WorkerJobUpdate, subject: str | None = None
                                  ) -> bool:
        """Applies one update from a worker; returns whether it changed the job.

        An update the fence refuses (`_fence`; also one that came on another job's `subject`, when given)
        changes nothing, is not recorded as applied (a forged copy cannot use up a genuine update's event
        id), and is logged at WARNING and passed to `on_rejected_update`. A NUL in any of its strings (an
        exception's text, say) is stored as U+FFFD: PostgreSQL's text cannot hold one, and such an update
        failed on every redelivery."""
        replace_nul(update)
        result = await self.db.run(lambda s: self._apply_with_timeline(s, update, subject))
        if isinstance(result, _Refusal):
            self._refused(update, result.organization, result.reason)
            return False
        if result:
            self.relay.notify()
            if update.kind in FREES_OR_TAKES_WORKER:
                await self.dispatch()  # its worker is free now (or took a job counted for another)
        return result

    def _refused(self, update: events_pb2.WorkerJobUpdate, organization: str, reason: str) -> None:
        log.warning("worker update refused: job %s (organization %s), worker %r, attempt %d, %s: %s",
                    update.job_id, organization or "?", update.worker_id, update.attempt,
                    U.Name(update.kind) if update.kind in U.values() else update.kind, reason)
        try:
            self.on_rejected_update(update.job_id, organization, update.worker_id, reason)
        except Exception:
            log.exception("could not record the refused update %s of job %s", update.event_id, update.job_id)

    def _apply(self, session: Session, update: events_pb2.WorkerJobUpdate,
               subject: str | None = None) -> bool | _Refusal:
        if seen_before(session, JobInbox, update.event_id):
            return False  # applied before: a redelivery
        row = JobRepository(session).get(update.job_id, for_update=True)
        if row is None:
            return _Refusal("", "the job does not exist")
        if subject is not None and subject != subjects.worker_status(row.id):
            return _Refusal(row.organization, f"it came on subject {subject}, not the job's own")
        refusal = self._fence(row, update)
        if refusal is not None:
            return _Refusal(row.organization, refusal)
        first_time(session, JobInbox, update.event_id)
        kind = update.kind
        hand_back = timeline.is_hand_back(update)
        if (row.state == S.JOB_STATE_QUEUED and row.requeue_note and update.attempt == row.attempt
                and update.worker_id == row.worker_id and kind != U.WORKER_UPDATE_KIND_PREPARING
                and not hand_back and not self._handed_back(row)):
            self._revive(session, row)  # the worker thought lost still runs this delivery
        timeline.on_worker_update(session, row, update)  # events, phase, evaluation (services.jobs.timeline)
        if kind in (U.WORKER_UPDATE_KIND_PREPARING, U.WORKER_UPDATE_KIND_RUNNING):
            if row.state == S.JOB_STATE_CANCELLING:
                return False
            new_attempt = update.attempt > row.attempt
            row.attempt = update.attempt
            row.worker_id = update.worker_id
            row.start_time = row.start_time or utcnow()
            if new_attempt:
                row.progress = None
                usage.end_attempt(row)  # an earlier delivery whose claim lapsed
            target = S.JOB_STATE_PREPARING if kind == U.WORKER_UPDATE_KIND_PREPARING else S.JOB_STATE_RUNNING
            if target == row.state and not new_attempt:
                return False
            self._move(session, row, target)
            return True
        if update.attempt != row.attempt:
            return False
        usage.record_tokens(row, update.tokens_trained)
        if kind == U.WORKER_UPDATE_KIND_PROGRESS:
            if hand_back:  # the delivery ends here; the next one's RESTARTED says it was drained
                row.handed_back_attempt, row.handed_back_by = update.attempt, update.worker_id
                log.info("job %s: worker %s was drained and handed attempt %d back to the queue (%s)", row.id,
                         update.worker_id, update.attempt, update.error.message)
            if not hand_back or update.HasField("progress"):
                row.progress = update.progress.SerializeToString()
            self._record_change(session, row, row.state)
            return True
        if kind == U.WORKER_UPDATE_KIND_SUCCEEDED:
            row.output = update.output.SerializeToString()
            if update.HasField("progress"):
                row.progress = update.progress.SerializeToString()
            self._move(session, row, S.JOB_STATE_SUCCEEDED)
            return True
        if kind == U.WORKER_UPDATE_KIND_FAILED:
            error = update.error if update.HasField("error") else error_status(
                grpc.StatusCode.INTERNAL, "The training process failed.", Reason.TRAINING_FAILED)
            self._move(session, row, S.JOB_STATE_FAILED, error=error)
            return True
        if kind == U.WORKER_UPDATE_KIND_CANCELLED:
            self._move(session, row, S.JOB_STATE_CANCELLED, error=cancelled_status())
            return True
        log.warning("update %s has unknown kind %s", update.event_id, kind)
        return False

    def _apply_with_timeline(self, session: Session, update: events_pb2.WorkerJobUpdate,
                             subject: str | None = None) -> bool | _Refusal:
        """`_apply`, and a recorded change when only the update's timeline events or phase changed the job."""
        result = self._apply(session, update, subject)
        row = timeline.unannounced(session)
        if row is not None:
            self._record_change(session, row, row.state)
            return True
        return result

    def _fence(self, row: JobRow, update: events_pb2.WorkerJobUpdate) -> str | None:
        """Why the update must not touch the job, or None when it comes from the delivery holding it.

        The job's row is the record: `(worker_id, attempt)` of the delivery that holds it (attempt 0 and
        no worker before the first). An update is accepted when
        - the job has not ended (a final state never changes, whoever asks), and its assignment was
          published (a job held back by its organization's running limit has no delivery at all);
        - it claims the holder's attempt from the holder's worker id, or it claims a newer attempt (a
          delivery count the work queue has gone on to: the old delivery's claim lapsed) with the first
          update of a delivery, PREPARING or RUNNING, which makes it the holder; an older attempt, another
          worker's id on the holder's attempt, or any other kind on a newer attempt is refused. A worker
          thought lost that still runs the job keeps it only while no newer delivery took it;
        - a newer attempt stays within the work queue's deliveries (TUNEFORGE_WORK_MAX_DELIVER), so a
          made-up attempt cannot fence out every genuine delivery to come;
        - a SUCCEEDED's artifact URIs (adapter, merged model) are in this deployment's object store under
          the job's own output prefix, jobs/<organization>/<job id>/, where the worker puts them.
        """
        if row.state in FINAL:
            return f"the job already ended {states.name(row.state)}"
        if not row.dispatched:
            holder = ("the scheduler holds it until a worker that would take it is free"
                      if self.scheduler.fair else "its organization's running limit holds it")
            return f"the job was never handed to the work queue ({holder})"
        worker, attempt = update.worker_id, update.attempt
        if not 0 < len(worker) <= 255:
            return "the update names no usable worker id"
        if attempt < row.attempt:
            return (f"attempt {attempt} is stale: the job's current delivery is attempt {row.attempt}, "
                    f"on worker {row.worker_id}")
        if attempt == row.attempt:
            if attempt <= 0:
                return f"attempt {attempt} is no delivery of the job"
            if worker != row.worker_id:
                return (f"worker {worker} does not hold the job: attempt {attempt} is on worker "
                        f"{row.worker_id}")
        else:
            if update.kind not in DELIVERY_STARTS:
                return (f"attempt {attempt} is a delivery the job has no record of (its current one is "
                        f"attempt {row.attempt}), and a delivery starts with PREPARING or RUNNING")
            limit = self.worker_rules.max_deliver
            if 0 < limit < attempt:
                return f"attempt {attempt} is beyond the work queue's {limit} deliveries"
        if update.kind == U.WORKER_UPDATE_KIND_SUCCEEDED:
            return self._check_artifacts(row, update.output)
        return None

    def _check_artifacts(self, row: JobRow, output: job_pb2.JobOutput) -> str | None:
        """Why a SUCCEEDED's output must not be recorded, or None when every artifact URI it names is the
        canonical URI of an object-store key under jobs/<organization>/<job id>/."""
        prefix = f"jobs/{row.organization}/{row.id}/"
        for field in ("adapter_uri", "merged_model_uri"):
            uri = getattr(output, field)
            if not uri:
                continue
            try:
                key = self.store.key_of(uri)
                canonical = self.store.uri(key) == uri  # no "..", no query, no second spelling
            except InvalidArgument:
                return f"output.{field} {uri!r} is not in this deployment's object store"
            if not canonical or not key.startswith(prefix) or len(key) == len(prefix):
                return f"output.{field} {uri!r} is not under the job's output prefix {self.store.uri(prefix)}"
        return None

    async def fail_lost(self, job_id: str, deliveries: int) -> bool:
        """Fails a job whose assignment ran out of deliveries (every worker died or timed out)."""

        def apply(session: Session) -> bool:
            row = JobRepository(session).get(job_id, for_update=True)
            if row is None or row.state in FINAL:
                return False
            if row.state == S.JOB_STATE_CANCELLING:
                self._move(session, row, S.JOB_STATE_CANCELLED, error=cancelled_status())
                return True
            self._move(session, row, S.JOB_STATE_FAILED, error=error_status(
                grpc.StatusCode.UNAVAILABLE,
                f"The job was delivered {deliveries} times and no worker finished it; the workers died or "
                "stopped sending heartbeats.", Reason.WORKER_LOST, {"deliveries": str(deliveries)}))
            return True

        changed = await self.db.run(apply)
        if changed:
            self.relay.notify()
            await self.dispatch()  # it held a slot
        return changed

    # -- workers ---------------------------------------------------------------------------------

    async def record_heartbeat(self, heartbeat: events_pb2.WorkerHeartbeat,
                               now: datetime | None = None) -> bool:
        """Keeps a worker's latest heartbeat; returns whether a job changed because of it.

        A worker that came back as a new process (another started_at under the same id), or that says it
        shut down, holds none of the jobs the old one did: they go back to the queue at once. A worker
        that still runs the delivery of a job that was put back in the queue for it takes it back. A NUL
        in its strings is stored as U+FFFD (see `apply_worker_update`).
        """
        replace_nul(heartbeat)
        at = now or utcnow()
        newly_idle = False

        def apply(session: Session) -> bool:
            nonlocal newly_idle
            workers = WorkerRepository(session)
            row = workers.get(heartbeat.worker_id, for_update=True)
            started = from_timestamp(heartbeat.started_at) if heartbeat.HasField("started_at") else None
            restarted = (row is not None and started is not None and row.started_at is not None
                         and as_utc(row.started_at) != started)
            previous_heartbeat = as_utc(row.last_heartbeat) if row is not None else at
            pool = heartbeat.pool.strip().lower()[:40] or subjects.DEFAULT_POOL
            # A worker the scheduler may count as free from now on: new, back, or newly idle or moved.
            newly_idle = heartbeat.state == W.WORKER_STATE_IDLE and (
                row is None or restarted or row.state != W.WORKER_STATE_IDLE or pool_of(row) != pool
                or not is_alive(row, at, self.listening_since))
            if row is None:
                row = WorkerRow(id=heartbeat.worker_id)
                workers.add(row)
            # Cut to the columns' sizes: a heartbeat is a worker's word, not validated input.
            row.hostname, row.gpu_type = heartbeat.hostname[:255], heartbeat.gpu_type.strip().lower()[:63]
            row.gpu_count, row.state = heartbeat.gpu_count, heartbeat.state
            row.pool, row.gpu_name = pool, heartbeat.gpu_name[:255]
            row.gpu_memory_bytes = max(0, heartbeat.gpu_memory_bytes)
            row.multi_node = heartbeat.multi_node
            row.job_id, row.attempt, row.job_organization = heartbeat.job_id[:40], heartbeat.attempt, ""
            row.started_at, row.last_heartbeat = started, at
            row.lost_after_s = self.worker_rules.lost_after(heartbeat.interval_seconds)
            changed = False
            jobs = JobRepository(session)
            if heartbeat.job_id:
                job = jobs.get(heartbeat.job_id, for_update=True)
                if job is not None:
                    row.job_organization = job.organization
                    usage.fill_hardware(job, row, self.prices)
                    if (job.state == S.JOB_STATE_QUEUED and job.requeue_note and job.worker_id == row.id
                            and job.attempt == heartbeat.attempt and not self._handed_back(job)):
                        self._revive(session, job)
                        changed = True
            stopped = heartbeat.state == W.WORKER_STATE_STOPPED
            if restarted or stopped:
                how, since = ("shut down", at) if stopped else ("stopped responding", previous_heartbeat)
                known = workers.all()
                for job in jobs.in_states(states.ON_WORKER, worker_id=row.id, for_update=True):
                    if job.id != heartbeat.job_id:  # the new process may already run its next delivery
                        changed |= self._lose(session, job, row.id, how, since, known, at)
            return changed

        changed = await self.db.run(apply)
        if changed:
            self.relay.notify()
        if newly_idle:
            await self.dispatch()  # its first heartbeat starts the job waiting for it at once
        return changed

    async def check_workers(self, now: datetime | None = None) -> int:
        """The periodic pass: jobs whose worker is gone go back to the queue (or end), held jobs whose
        organization has a running slot free are dispatched, each queued job's reason is brought up to
        date, and long-gone workers are forgotten. Returns how many jobs changed."""
        at = now or utcnow()
        rules = self.worker_rules

        def apply(session: Session) -> int:
            workers = WorkerRepository(session)
            workers.forget_before(at - timedelta(seconds=rules.forget_after_s))
            all_workers = workers.all()
            known = {w.id: w for w in all_workers}
            jobs = JobRepository(session)
            changed = 0
            lost: set[str] = set()
            # Read without locks; a job is locked (and read again) only when it is about to change.
            for job in jobs.in_states(states.ON_WORKER):
                worker = known.get(job.worker_id)
                if worker is None:  # never heard from (a worker from before heartbeats, or long gone)
                    silent_since = max(as_utc(job.update_time), self.listening_since)
                    if at - silent_since <= timedelta(seconds=rules.lost_after(0)):
                        continue
                    how, since = "stopped responding", as_utc(job.update_time)
                elif is_alive(worker, at, self.listening_since):
                    continue
                else:
                    how = "shut down" if worker.state == W.WORKER_STATE_STOPPED else "stopped responding"
                    since = as_utc(worker.last_heartbeat)
                held = (job.worker_id, job.attempt)
                fresh = jobs.get(job.id, for_update=True)
                if (fresh is None or fresh.state not in states.ON_WORKER
                        or (fresh.worker_id, fresh.attempt) != held):
                    continue  # a worker took it meanwhile
                changed += self._lose(session, fresh, held[0], how, since, all_workers, at)
                lost.add(job.id)
            if self.scheduler.fair:  # the scheduler pass, held jobs' reasons included
                changed += self._schedule(session, notes=True)
            else:  # a slot freed without a turn taken (a limit raised, a transaction that lost its turn)
                for org in sorted({job.organization for job in jobs.held()}):
                    changed += self._dispatch_held(session, org)
            held_notes: dict[str, str] = {}
            for job in jobs.in_states([S.JOB_STATE_QUEUED]):
                if job.id in lost:
                    continue  # its message was written with the move
                if not job.dispatched and self.scheduler.fair:
                    continue  # the pass wrote it
                if job.dispatched:
                    hardware = job_pb2.JobSpec.FromString(job.spec).hardware
                    note = waiting_note(hardware, all_workers, at, self.listening_since, rules)
                else:
                    if job.organization not in held_notes:
                        held_notes[job.organization] = self._held_message(jobs, job.organization)
                    note = held_notes[job.organization]
                if queued_message(job.requeue_note, note) == job.status_message:
                    continue
                fresh = jobs.get(job.id, for_update=True)
                if fresh is None or fresh.state != S.JOB_STATE_QUEUED or fresh.dispatched != job.dispatched:
                    continue
                fresh.status_message = queued_message(fresh.requeue_note, note)
                self._record_change(session, fresh, fresh.state)
                changed += 1
            return changed

        changed = await self.db.run(apply)
        if changed:
            self.relay.notify()
        return changed

    def _lose(self, session: Session, row: JobRow, worker_id: str, how: str, at: datetime,
              workers: Sequence[WorkerRow], now: datetime) -> bool:
        """The worker holding `row` is gone: back to QUEUED for the next delivery, FAILED WORKER_LOST after
        the last one, CANCELLED if it was being cancelled."""
        if row.state == S.JOB_STATE_CANCELLING:
            self._move(session, row, S.JOB_STATE_CANCELLED, error=cancelled_status())
            return True
        if self._handed_back(row):  # gone, but the job's state and checkpoint were left in order
            how = "was drained and handed the job back"
        rules = self.worker_rules
        if 0 < rules.max_deliver <= row.attempt:
            self._move(session, row, S.JOB_STATE_FAILED, error=error_status(
                grpc.StatusCode.UNAVAILABLE,
                f"The job was delivered {row.attempt} times and no worker finished it; the last, worker "
                f"{worker_id}, {how} at {when(at)}.", Reason.WORKER_LOST,
                {"deliveries": str(row.attempt), "worker": worker_id}))
            log.warning("job %s failed: worker %s %s on its last delivery", row.id, worker_id, how)
            return True
        note = lost_note(worker_id, how, at, row.attempt + 1, rules)
        hardware = job_pb2.JobSpec.FromString(row.spec).hardware
        self._move(session, row, S.JOB_STATE_QUEUED, requeue_note=note, status_message=queued_message(
            note, waiting_note(hardware, workers, now, self.listening_since, rules)))
        log.warning("job %s back in the queue: %s", row.id, note)
        return True

    @staticmethod
    def _handed_back(row: JobRow) -> bool:
        """Whether the delivery holding `row` handed it back (its worker was drained): it runs no more."""
        return bool(row.handed_back_attempt) and (row.handed_back_attempt, row.handed_back_by) == (
            row.attempt, row.worker_id)

    def _revive(self, session: Session, row: JobRow) -> None:
        """A job put back in the queue whose worker turns out to run it still: back where it was."""
        target = S.JOB_STATE_RUNNING if row.progress else S.JOB_STATE_PREPARING
        log.info("job %s: worker %s still runs attempt %d", row.id, row.worker_id, row.attempt)
        self._move(session, row, target)

    async def list_workers(self, organization: str, size: int, token: str,
                           now: datetime | None = None) -> tuple[builtins.list[job_pb2.Worker], str]:
        v = Violations()
        check_organization(v, organization)
        v.raise_if_any("request is invalid")
        limit = page_size(size)
        query = {"org": organization, "list": "workers"}
        cursor = decode_token(token, query, cursor_type=str)  # id of the last worker returned
        at = now or utcnow()

        def load(session: Session) -> tuple[builtins.list[job_pb2.Worker], str]:
            rows = WorkerRepository(session).list(cursor, limit + 1)
            more = len(rows) > limit
            rows = rows[:limit]
            out = [worker_to_proto(r, organization, is_alive(r, at, self.listening_since)) for r in rows]
            return out, encode_token(rows[-1].id, query) if more else ""

        return await self.db.run(load)

    async def list_pools(self, organization: str,
                         now: datetime | None = None) -> builtins.list[job_pb2.WorkerPool]:
        """The worker pools (see job.proto's WorkerPool): one per pool name and GPU type among the workers
        heard from within the seen window, with their queue depth, and one per pool name that queued jobs
        name but no such worker announces. Another organization's jobs count only as numbers."""
        v = Violations()
        check_organization(v, organization)
        v.raise_if_any("request is invalid")
        at = now or utcnow()
        window = timedelta(seconds=self.worker_rules.seen_window_s)

        def load(session: Session) -> builtins.list[job_pb2.WorkerPool]:
            jobs = JobRepository(session)
            recent = [w for w in WorkerRepository(session).all() if at - as_utc(w.last_heartbeat) <= window]
            queued_rows = jobs.in_states([S.JOB_STATE_QUEUED])
            queued = [(job.organization, job_pb2.JobSpec.FromString(job.spec).hardware)
                      for job in queued_rows]
            on_worker = jobs.in_states(states.ON_WORKER)
            holds = _job_holders(on_worker, queued_rows)
            groups: dict[tuple[str, str], builtins.list[WorkerRow]] = {}
            for worker in recent:
                groups.setdefault((pool_of(worker), worker.gpu_type), []).append(worker)
            pools: builtins.list[job_pb2.WorkerPool] = []
            for (name, gpu_type), members in groups.items():
                alive = [w for w in members if is_alive(w, at, self.listening_since)]
                free = [w for w in alive if is_free(w, at, self.listening_since, holds(w))]
                draining = [w for w in alive if w.state == W.WORKER_STATE_DRAINING]
                theirs = [org for org, hardware in queued if any(takes(w, hardware) for w in members)]
                ids = {w.id for w in members}
                pools.append(job_pb2.WorkerPool(
                    name=name, gpu_type=gpu_type, max_gpu_count=max((w.gpu_count for w in alive), default=0),
                    workers_alive=len(alive), workers_idle=len(free), workers_draining=len(draining),
                    workers_busy=len(alive) - len(free) - len(draining), queued_jobs=len(theirs),
                    queued_jobs_own=theirs.count(organization),
                    running_jobs=sum(1 for job in on_worker if job.worker_id in ids)))
            # Pools that only jobs name so far: counted under the name, by the GPU type they ask for.
            announced = {name for name, _ in groups}
            unserved: dict[tuple[str, str], builtins.list[str]] = {}
            for org, hardware in queued:
                if hardware.pool and hardware.pool not in announced:
                    route = subjects.gpu_route(hardware.gpu_type)
                    kind = "cpu" if route == subjects.ANY_ROUTE else hardware.gpu_type.strip().lower()
                    unserved.setdefault((hardware.pool, kind), []).append(org)
            for (name, gpu_type), orgs in unserved.items():
                pools.append(job_pb2.WorkerPool(name=name, gpu_type=gpu_type, queued_jobs=len(orgs),
                                                queued_jobs_own=orgs.count(organization)))
            return sorted(pools, key=lambda p: (p.name, p.gpu_type))

        return await self.db.run(load)

    # -- watching --------------------------------------------------------------------------------

    async def watch(self, organization: str, ref: str, poll_interval_s: float = 5.0
                    ) -> AsyncIterator[job_pb2.Job]:
        """The job now, then each newer revision, until a final state.

        Subscribes before reading so no change between the read and the subscription is missed; polls the
        database as a backstop in case a live message is dropped.
        """
        job = await self.get(organization, ref)
        queue: asyncio.Queue[job_pb2.Job] = asyncio.Queue()

        async def on_msg(msg: object) -> None:
            try:
                event = events_pb2.JobChanged.FromString(msg.data)  # type: ignore[attr-defined]
            except Exception:
                return
            queue.put_nowait(event.job)

        sub = await self.nc.subscribe(subjects.job_events(job.id), cb=on_msg)
        try:
            job = await self.get(organization, job.id)
            yield job
            last = job.revision
            while job.state not in FINAL:
                try:
                    candidate = await asyncio.wait_for(queue.get(), poll_interval_s)
                except TimeoutError:
                    candidate = await self.get(organization, job.id)
                if candidate.revision > last:
                    job, last = candidate, candidate.revision
                    yield job
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

"""Job lifecycle rules: creation, cancellation, and the state machine workers drive.

Every change of a job happens in one transaction with the JobChanged event that announces it (the outbox);
the relay then publishes it. Worker updates are applied at most once (the inbox) and only when the state
machine allows them, so redelivered, late or stale updates change nothing.

CreateJob refuses what could never be honoured, rather than letting a worker quietly do something else:
a model the organization may not use, or that is not there (`tuneforge_core.models`); half precision on a
spec that may land on a CPU worker (`resolve_spec`); early stopping without validation data, which only
this service can tell, since it reads the dataset's splits here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Sequence

import grpc
from google.rpc import status_pb2
from nats.aio.client import Client as NATS
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import dataset_pb2, job_pb2, job_service_pb2

from services.jobs.converters import job_to_proto
from services.jobs.datasets_client import DatasetLookup
from services.jobs.estimation_client import HardwareCheck
from services.jobs.models import JobInbox, JobOutbox, JobRow
from services.jobs.repository import JobRepository
from services.kit.db import Database
from services.kit.outbox import OutboxRelay, add_event, first_time, utcnow
from services.kit.paging import decode_token, encode_token, page_size
from services.kit.protos import to_timestamp
from services.kit.validation import check_name, check_organization, check_request_id
from tuneforge_core import states, subjects
from tuneforge_core.errors import (
    AlreadyExists,
    FailedPrecondition,
    Violations,
    error_status,
    not_found,
)
from tuneforge_core.ids import new_id
from tuneforge_core.models import ModelPolicy
from tuneforge_core.reasons import Reason
from tuneforge_core.spec import check_dataset_fit, resolve_spec
from tuneforge_core.states import FINAL, cancelled_status
from tuneforge_core.storage import ObjectStore

log = logging.getLogger(__name__)

S = job_pb2.JobState
U = events_pb2.WorkerUpdateKind


def _split_uri(dataset: dataset_pb2.Dataset, kind: int) -> str:
    return next((s.uri for s in dataset.splits if s.kind == kind and s.example_count > 0), "")


def _request_hash(request: job_service_pb2.CreateJobRequest) -> str:
    clean = job_service_pb2.CreateJobRequest()
    clean.CopyFrom(request)
    clean.request_id = ""
    clean.validate_only = False
    return hashlib.sha256(clean.SerializeToString(deterministic=True)).hexdigest()


class JobManager:
    def __init__(self, db: Database, relay: OutboxRelay, datasets: DatasetLookup, store: ObjectStore,
                 nc: NATS, *, hardware: HardwareCheck | None = None,
                 allow_user_reward_code: bool = False, models: ModelPolicy | None = None) -> None:
        self.db = db
        self.hardware = hardware
        # Without a policy: hub ids and the organization's own outputs only, no local paths.
        self.models = models or ModelPolicy(store=store)
        self.allow_user_reward_code = allow_user_reward_code
        self.relay = relay
        self.datasets = datasets
        self.store = store
        self.nc = nc

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
              error: status_pb2.Status | None = None) -> None:
        previous = row.state
        row.state = state
        if error is not None:
            row.error = error.SerializeToString()
        if state in FINAL:
            row.end_time = utcnow()
        self._record_change(session, row, previous)

    # -- API -------------------------------------------------------------------------------------

    async def create(self, request: job_service_pb2.CreateJobRequest) -> job_pb2.Job:
        v = Violations()
        check_organization(v, request.organization)
        check_name(v, request.name, required=False)
        check_request_id(v, request.request_id)
        v.check(len(request.description) <= 1024, "description", "must be at most 1024 characters")
        v.check(len(request.labels) <= 64, "labels", "at most 64 labels")
        for key, value in request.labels.items():
            v.check(0 < len(key) <= 63 and len(value) <= 63, f"labels[{key}]",
                    "keys must be 1-63 characters and values at most 63")
        v.raise_if_any("request is invalid")
        spec = resolve_spec(request.spec, allow_user_reward_code=self.allow_user_reward_code)
        org = request.organization

        if request.request_id and not request.validate_only:
            existing = await self.db.run(lambda s: self._replay(s, org, request))
            if existing is not None:
                return existing

        # Before anything else is read: the models' rule, then that a local or stored model is there.
        await asyncio.to_thread(self.models.check_spec, spec, org)
        dataset = await self.datasets.get(org, spec.dataset, "spec.dataset")
        self._check_ready(dataset, "spec.dataset")
        check_dataset_fit(spec, dataset.format)
        admitted = None
        if self.hardware is not None:  # the fit on the GPU the job asked for, by its own estimate
            admitted = await self.hardware.check(org, spec, dataset)
        train_uri = _split_uri(dataset, dataset_pb2.DATASET_SPLIT_KIND_TRAIN)
        validation_uri = _split_uri(dataset, dataset_pb2.DATASET_SPLIT_KIND_VALIDATION)
        if spec.validation_dataset:
            extra = await self.datasets.get(org, spec.validation_dataset, "spec.validation_dataset")
            self._check_ready(extra, "spec.validation_dataset")
            validation_uri = _split_uri(extra, dataset_pb2.DATASET_SPLIT_KIND_TRAIN)
            spec.validation_dataset = extra.id
        spec.dataset = dataset.id
        if not train_uri:
            raise FailedPrecondition(f"dataset '{dataset.name}' has no training examples",
                                     reason=Reason.DATASET_NOT_READY)
        self._check_early_stopping(spec, dataset, validation_uri)

        job_id = new_id("job")
        now = utcnow()
        row = JobRow(
            id=job_id, organization=org, name=request.name or job_id, description=request.description,
            spec=spec.SerializeToString(), state=S.JOB_STATE_QUEUED, attempt=0, worker_id="", revision=0,
            labels=dict(request.labels), request_id=request.request_id or None,
            request_hash=_request_hash(request), create_time=now, update_time=now,
        )
        if request.validate_only:
            row.revision = 1
            return job_to_proto(row)

        assignment = events_pb2.JobAssignment(
            event_id=f"{job_id}.assignment", job_id=job_id, organization=org, spec=spec,
            train_uri=train_uri, validation_uri=validation_uri, dataset_format=dataset.format,
            output_prefix=self.store.uri(f"jobs/{org}/{job_id}"),
            admission_estimate=admitted,
        )
        assignment.create_time.CopyFrom(to_timestamp(now))

        def insert(session: Session) -> job_pb2.Job:
            repo = JobRepository(session)
            if repo.name_taken(org, row.name):
                raise AlreadyExists(f"a job named '{row.name}' already exists in organization '{org}'",
                                    metadata={"resource_type": "job", "resource": row.name})
            repo.add(row)
            self._record_change(session, row, S.JOB_STATE_UNSPECIFIED)
            add_event(session, JobOutbox, subjects.WORK_JOBS, assignment, assignment.event_id)
            return job_to_proto(row)

        try:
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
            return None
        if row.request_hash != _request_hash(request):
            raise AlreadyExists("request_id was already used for a different request",
                                reason=Reason.REQUEST_ID_REUSED, metadata={"request_id": request.request_id})
        return job_to_proto(row)

    @staticmethod
    def _check_early_stopping(spec: job_pb2.JobSpec, dataset: dataset_pb2.Dataset,
                              validation_uri: str) -> None:
        """Early stopping watches the validation loss: without validation data it could never stop early.

        Workers used to switch it off and train to the end with a warning; the job now says what it
        needs, and a job that cannot have it is refused here, where the dataset's splits are known."""
        if not spec.hyperparameters.early_stopping.enabled or validation_uri:
            return
        lacking = (
            f"spec.validation_dataset '{spec.validation_dataset}' has no examples" if spec.validation_dataset
            else f"dataset '{dataset.name or dataset.id}' has no validation split"
        )
        v = Violations()
        v.add("spec.hyperparameters.early_stopping.enabled",
              f"early stopping needs validation data, and {lacking}; set spec.validation_dataset, give the "
              "dataset a validation split, or turn early stopping off")
        v.raise_if_any("the job cannot be honoured")

    @staticmethod
    def _check_ready(dataset: dataset_pb2.Dataset, field: str) -> None:
        if dataset.state != dataset_pb2.DATASET_STATE_READY:
            state = dataset_pb2.DatasetState.Name(dataset.state)
            raise FailedPrecondition(f"{field}: dataset '{dataset.name}' is {state}, not READY",
                                     reason=Reason.DATASET_NOT_READY, metadata={"dataset": dataset.id})

    async def get(self, organization: str, ref: str) -> job_pb2.Job:
        self._check_ref(organization, ref)

        def load(session: Session) -> job_pb2.Job:
            row = JobRepository(session).find(organization, ref)
            if row is None:
                raise not_found("job", ref, organization)
            return job_to_proto(row)

        return await self.db.run(load)

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

        def load(session: Session) -> tuple[list[job_pb2.Job], str]:
            rows = JobRepository(session).list(organization, states, cursor, limit + 1)
            more = len(rows) > limit
            rows = rows[:limit]
            return [job_to_proto(r) for r in rows], encode_token(rows[-1].id, query) if more else ""

        return await self.db.run(load)

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
        return job

    @staticmethod
    def _check_ref(organization: str, ref: str) -> None:
        v = Violations()
        check_organization(v, organization)
        v.check(bool(ref), "job", "is required: a job id or name")
        v.raise_if_any("request is invalid")

    # -- worker updates --------------------------------------------------------------------------

    async def apply_worker_update(self, update: events_pb2.WorkerJobUpdate) -> bool:
        """Applies one update from a worker; returns whether it changed the job."""
        changed = await self.db.run(lambda s: self._apply(s, update))
        if changed:
            self.relay.notify()
        return changed

    def _apply(self, session: Session, update: events_pb2.WorkerJobUpdate) -> bool:
        if not first_time(session, JobInbox, update.event_id):
            return False
        row = JobRepository(session).get(update.job_id, for_update=True)
        if row is None:
            log.warning("update %s for unknown job %s ignored", update.event_id, update.job_id)
            return False
        if row.state in FINAL or update.attempt < row.attempt:
            return False  # final states never change; a superseded delivery has no say
        kind = update.kind
        if kind in (U.WORKER_UPDATE_KIND_PREPARING, U.WORKER_UPDATE_KIND_RUNNING):
            if row.state == S.JOB_STATE_CANCELLING:
                return False
            new_attempt = update.attempt > row.attempt
            row.attempt = update.attempt
            row.worker_id = update.worker_id
            row.start_time = row.start_time or utcnow()
            if new_attempt:
                row.progress = None
            target = S.JOB_STATE_PREPARING if kind == U.WORKER_UPDATE_KIND_PREPARING else S.JOB_STATE_RUNNING
            if target == row.state and not new_attempt:
                return False
            self._move(session, row, target)
            return True
        if update.attempt != row.attempt:
            return False
        if kind == U.WORKER_UPDATE_KIND_PROGRESS:
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
        return changed

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

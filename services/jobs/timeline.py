"""The job's timeline (ListJobEvents, WatchJob's events), its phase, and its evaluation report.

A timeline event is recorded in the transaction of the change that causes it, numbered from the job's row
(`JobRow.event_sequence`, under the row's lock), so the events of a job are 1, 2, 3... with no gaps, in the
order of the changes, and a change and its events commit together or not at all.

- The service's own events come from `JobManager`'s changes: QUEUED at CreateJob (`on_created`),
  WORKER_ASSIGNED when a new delivery takes the job (`on_worker_update`), and CANCEL_REQUESTED, CANCELLED,
  FAILED and SUCCEEDED when the job moves there (`on_move`, whoever moved it: a user, the worker, or the
  worker check that gave up on a lost job). A job put back in the queue records nothing: the next delivery
  says RESTARTED itself.
- A worker's events (WorkerJobUpdate.events) are stored only when the update passes the fence, after the
  service's event of that update's delivery and before the final state the update brings. Each is recorded
  once however often the update is delivered: its `source` is "<update event id>/<index>", unique per job.
  Types the service records itself are not taken from a worker.
- A RESTARTED event a worker sends without a reason gets WORKER_LOST (its worker died or went quiet),
  unless the previous delivery's worker was drained and handed the job back (its hand-back update,
  `is_hand_back`): then the reason stays empty and the message names that worker and says it was drained.
- Phase: what the worker says (WorkerJobUpdate.phase), else DOWNLOADING while PREPARING and TRAINING while
  RUNNING; UNSPECIFIED while QUEUED and once final.
- Evaluation: the EvaluationReport a SUCCEEDED update carries, kept as its bytes (`JobRow.evaluation`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from google.rpc import error_details_pb2, status_pb2
from sqlalchemy import select
from sqlalchemy.orm import Session
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import evaluation_pb2, job_pb2, job_service_pb2

from services.jobs.converters import job_to_proto
from services.jobs.models import JobEventRow, JobRow
from services.jobs.repository import JobRepository
from services.kit.db import Database
from services.kit.outbox import column_key, utcnow
from services.kit.paging import decode_token, encode_token, page_size
from services.kit.protos import from_timestamp, to_timestamp
from services.kit.validation import check_organization
from tuneforge_core import states
from tuneforge_core.errors import Violations, not_found
from tuneforge_core.states import FINAL

log = logging.getLogger(__name__)

S = job_pb2.JobState
E = job_pb2.JobEventType
P = job_pb2.JobPhase
U = events_pb2.WorkerUpdateKind
ES = evaluation_pb2.EvaluationStatus

DEFAULT_PAGE_SIZE = 100
# A worker's word is not validated input: at most this many events per update, messages cut to this.
MAX_EVENTS_PER_UPDATE = 1000
MAX_MESSAGE_CHARS = 4000
MAX_SOURCE_CHARS = 128  # JobEventRow.source
# The types only the jobs service records; a worker's event of one of these is dropped.
SERVICE_TYPES = frozenset({E.JOB_EVENT_TYPE_QUEUED, E.JOB_EVENT_TYPE_WORKER_ASSIGNED,
                           E.JOB_EVENT_TYPE_CANCEL_REQUESTED, E.JOB_EVENT_TYPE_CANCELLED,
                           E.JOB_EVENT_TYPE_FAILED, E.JOB_EVENT_TYPE_SUCCEEDED})
DELIVERY_STARTS = frozenset({U.WORKER_UPDATE_KIND_PREPARING, U.WORKER_UPDATE_KIND_RUNNING})
# The phase a worker's update implies when it names none.
DEFAULT_PHASES: dict[int, int] = {S.JOB_STATE_PREPARING: P.JOB_PHASE_DOWNLOADING,
                                  S.JOB_STATE_RUNNING: P.JOB_PHASE_TRAINING}
KIND_STATES: dict[int, int] = {U.WORKER_UPDATE_KIND_PREPARING: S.JOB_STATE_PREPARING,
                               U.WORKER_UPDATE_KIND_RUNNING: S.JOB_STATE_RUNNING}
# WorkerJobUpdate kinds that say what the job is doing now (and so may carry a phase).
PHASED_KINDS = frozenset({*DELIVERY_STARTS, U.WORKER_UPDATE_KIND_PROGRESS})
# Session.info key: the row whose timeline or phase changed in an update, and its revision then.
_UNANNOUNCED = "tuneforge.jobs.timeline.unannounced"


def is_hand_back(update: events_pb2.WorkerJobUpdate) -> bool:
    """Whether `update` is a worker's hand-back: the last update of a delivery whose worker was drained
    (SIGTERM/SIGINT) and handed the job back to the queue, for another delivery to resume from its last
    checkpoint. The worker (trainer_worker.agent, JobRun._hand_back) says so with a PROGRESS that carries
    an `error` (google.rpc.Status, UNAVAILABLE, its message the hand-back's cause); no other PROGRESS
    carries one, and a jobs service from before this ignores it."""
    return update.kind == U.WORKER_UPDATE_KIND_PROGRESS and update.HasField("error")


def handed_back(row: JobRow, attempt: int) -> bool:
    """Whether the delivery before `attempt` ended by its worker handing the job back (`row` records the
    hand-back of the latest delivery that held the job, until one that did not hand it back takes it)."""
    return 0 < (row.handed_back_attempt or 0) < attempt and bool(row.handed_back_by)


def drained_note(row: JobRow) -> str:
    """Why the handed-back delivery ended, for the next one's RESTARTED."""
    return f"attempt {row.handed_back_attempt} ended because worker {row.handed_back_by} was drained and " \
        "handed the job back"


# -- recording (inside the change's transaction) --------------------------------------------------

def _append(session: Session, row: JobRow, event: job_pb2.JobEvent, source: str | None = None) -> None:
    """Numbers `event` as the job's next one and adds its row. The caller holds the job's row lock."""
    row.event_sequence = (row.event_sequence or 0) + 1
    event.sequence = row.event_sequence
    if not event.HasField("time"):
        event.time.CopyFrom(to_timestamp(utcnow()))
    session.add(JobEventRow(job_id=row.id, sequence=event.sequence, organization=row.organization,
                            time=from_timestamp(event.time), type=event.type, source=source,
                            payload=event.SerializeToString(deterministic=True)))


def _service_event(session: Session, row: JobRow, type_: int, message: str, **fields: Any) -> None:
    fields.setdefault("attempt", row.attempt or 0)
    event = job_pb2.JobEvent(type=job_pb2.JobEventType.ValueType(type_), message=message, **fields)
    _append(session, row, event)


def error_reason(status: status_pb2.Status) -> str:
    """The reason of the status's ErrorInfo (a tuneforge.v1.ErrorReason name), or ""."""
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR) and detail.Unpack(info):
            return info.reason
    return ""


def on_created(session: Session, row: JobRow) -> None:
    """CreateJob accepted the job: QUEUED (held back, with its reason, when its assignment was not
    published at once: by the fair scheduler or the organization's running limit)."""
    held = "" if row.dispatched else f"; it is held back ({row.status_message})"
    _service_event(session, row, E.JOB_EVENT_TYPE_QUEUED, f"The job was accepted and queued{held}.")


def on_move(session: Session, row: JobRow, previous: int, state: int) -> None:
    """The job moved from `previous` to `state` (JobManager._move, before the change is recorded): its
    phase follows, and CANCEL_REQUESTED or how it ended goes on its timeline."""
    if state in FINAL or state == S.JOB_STATE_QUEUED:
        row.phase = P.JOB_PHASE_UNSPECIFIED
    elif state in DEFAULT_PHASES and not row.phase:
        row.phase = DEFAULT_PHASES[state]
    if state == previous or previous in FINAL:
        return
    error = status_pb2.Status.FromString(row.error) if row.error else status_pb2.Status()
    if state == S.JOB_STATE_CANCELLING:
        _service_event(session, row, E.JOB_EVENT_TYPE_CANCEL_REQUESTED,
                       f"A user asked to cancel the job; worker {row.worker_id} is stopping it.",
                       worker_id=row.worker_id)
    elif state == S.JOB_STATE_CANCELLED:
        before = " before a worker took it" if previous == S.JOB_STATE_QUEUED else ""
        _service_event(session, row, E.JOB_EVENT_TYPE_CANCELLED,
                       f"The job was cancelled{before}." if before else
                       (error.message or "The job was cancelled."))
    elif state == S.JOB_STATE_FAILED:
        _service_event(session, row, E.JOB_EVENT_TYPE_FAILED, error.message or "The job failed.",
                       reason=error_reason(error), worker_id=row.worker_id)
    elif state == S.JOB_STATE_SUCCEEDED:
        output = job_pb2.JobOutput.FromString(row.output) if row.output else job_pb2.JobOutput()
        kept = f" (the weights of step {output.kept_step})" if output.kept_step else ""
        _service_event(session, row, E.JOB_EVENT_TYPE_SUCCEEDED,
                       f"The job succeeded; its outputs are stored{kept}.", step=output.kept_step)


def on_worker_update(session: Session, row: JobRow, update: events_pb2.WorkerJobUpdate) -> bool:
    """An update that passed the fence (JobManager._apply, before it moves the job): WORKER_ASSIGNED for a
    new delivery, the worker's events, the phase, and a SUCCEEDED's evaluation. Returns whether any of
    that changed the job (`unannounced` then tells the manager whether it still has to record a change)."""
    kind = update.kind
    starts = kind in DELIVERY_STARTS and update.attempt > (row.attempt or 0)
    if starts and row.state == S.JOB_STATE_CANCELLING:
        return False  # the manager does not hand a job being cancelled to a new delivery
    changed = False
    if starts:
        if row.handed_back_attempt and row.handed_back_attempt != row.attempt:
            # The delivery that held the job last (row.attempt, still the previous one here) did not hand
            # it back: that one was lost, and the restart is told as such.
            row.handed_back_attempt, row.handed_back_by = 0, ""
        _service_event(session, row, E.JOB_EVENT_TYPE_WORKER_ASSIGNED,
                       f"Worker {update.worker_id} took the job (attempt {update.attempt}).",
                       worker_id=update.worker_id, attempt=update.attempt)
        changed = True
    changed |= _store_worker_events(session, row, update)
    if kind in PHASED_KINDS and not is_hand_back(update):  # a hand-back leaves the job, it does no phase
        phase: int = update.phase if update.phase in P.values() else P.JOB_PHASE_UNSPECIFIED
        phase = phase or DEFAULT_PHASES.get(KIND_STATES.get(kind, S.JOB_STATE_UNSPECIFIED), 0)
        if phase and phase != row.phase:
            row.phase, changed = phase, True
    if kind == U.WORKER_UPDATE_KIND_SUCCEEDED and update.HasField("evaluation"):
        row.evaluation = update.evaluation.SerializeToString(deterministic=True)
        changed = True
    if changed:
        session.info[_UNANNOUNCED] = (row, row.revision)
    return changed


def unannounced(session: Session) -> JobRow | None:
    """The row `on_worker_update` changed in this transaction when no change of it was recorded since (the
    update moved nothing else, e.g. a repeated RUNNING with new events): the manager records one, so that
    watchers see the events and the phase."""
    noted = session.info.pop(_UNANNOUNCED, None)
    if noted is None:
        return None
    row, revision = noted
    return row if row.revision == revision else None


def _source(update: events_pb2.WorkerJobUpdate, index: int) -> str:
    return column_key(f"{update.event_id}/{index}", MAX_SOURCE_CHARS)


def _store_worker_events(session: Session, row: JobRow, update: events_pb2.WorkerJobUpdate) -> bool:
    if not update.events:
        return False
    if len(update.events) > MAX_EVENTS_PER_UPDATE:
        log.warning("update %s of job %s carries %d events; the first %d are kept", update.event_id, row.id,
                    len(update.events), MAX_EVENTS_PER_UPDATE)
    wanted = {_source(update, i): sent for i, sent in enumerate(update.events[:MAX_EVENTS_PER_UPDATE])}
    seen = set(session.scalars(select(JobEventRow.source).where(JobEventRow.job_id == row.id,
                                                                JobEventRow.source.in_(list(wanted)))))
    stored = False
    for source, sent in wanted.items():
        if source in seen:
            continue
        if sent.type == E.JOB_EVENT_TYPE_UNSPECIFIED or sent.type in SERVICE_TYPES:
            log.warning("job %s: worker %s sent a %s event, which only the jobs service records; dropped",
                        row.id, update.worker_id, E.Name(sent.type) if sent.type in E.values() else sent.type)
            continue
        event = job_pb2.JobEvent()
        event.CopyFrom(sent)
        event.message = event.message[:MAX_MESSAGE_CHARS]
        if not event.attempt:
            event.attempt = update.attempt
        if not event.HasField("time") and update.HasField("time"):
            event.time.CopyFrom(update.time)
        if event.type == E.JOB_EVENT_TYPE_RESTARTED:
            event.worker_id = event.worker_id or update.worker_id
            if event.reason:
                pass  # the worker's own word
            elif handed_back(row, event.attempt):  # drained, not lost: no reason
                note = drained_note(row)
                event.message = (f"{event.message} {note[0].upper()}{note[1:]}." if event.message
                                 else f"Attempt {event.attempt} began: {note}.")
            else:
                event.reason = "WORKER_LOST"
            if not event.message:
                why = row.requeue_note or "the previous delivery ended without an outcome"
                event.message = f"Attempt {event.attempt} began: {why}."
        _append(session, row, event, source=source)
        stored = True
    return stored


# -- reading --------------------------------------------------------------------------------------

def _check_ref(organization: str, ref: str) -> None:
    v = Violations()
    check_organization(v, organization)
    v.check(bool(ref), "job", "is required: a job id or name")
    v.raise_if_any("request is invalid")


def _find(session: Session, organization: str, ref: str) -> JobRow:
    row = JobRepository(session).find(organization, ref)
    if row is None:
        raise not_found("job", ref, organization)
    return row


def _events(session: Session, job_id: str, after: int, upto: int | None = None,
            limit: int | None = None) -> list[job_pb2.JobEvent]:
    query = select(JobEventRow.payload).where(JobEventRow.job_id == job_id, JobEventRow.sequence > after)
    if upto is not None:
        query = query.where(JobEventRow.sequence <= upto)
    query = query.order_by(JobEventRow.sequence)
    if limit is not None:
        query = query.limit(limit)
    return [job_pb2.JobEvent.FromString(payload) for payload in session.scalars(query)]


def evaluation_of(row: JobRow) -> evaluation_pb2.EvaluationReport:
    """The job's evaluation report as GetJobEvaluation answers it."""
    if row.state not in FINAL:
        under_way = row.phase == P.JOB_PHASE_EVALUATING
        return evaluation_pb2.EvaluationReport(
            status=ES.EVALUATION_STATUS_PENDING,
            message="The evaluation is under way." if under_way else
            f"The job is {states.name(row.state)}; the evaluation runs after training.")
    if row.state != S.JOB_STATE_SUCCEEDED:
        return evaluation_pb2.EvaluationReport(
            status=ES.EVALUATION_STATUS_SKIPPED,
            message=f"The job ended {states.name(row.state)} before training finished, so nothing was "
                    "evaluated.")
    if row.evaluation:
        return evaluation_pb2.EvaluationReport.FromString(row.evaluation)
    spec = job_pb2.JobSpec.FromString(row.spec)
    off = spec.evaluation.HasField("enabled") and not spec.evaluation.enabled
    return evaluation_pb2.EvaluationReport(
        status=ES.EVALUATION_STATUS_SKIPPED,
        message="Evaluation was turned off (spec.evaluation.enabled is false)." if off else
        "The job succeeded without an evaluation report: its worker sent none.")


class JobTimeline:
    """The read side: ListJobEvents, GetJobEvaluation, and the events WatchJob sends with each change."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def list_events(self, organization: str, ref: str, size: int, token: str,
                          after_sequence: int = 0) -> tuple[list[job_pb2.JobEvent], str]:
        _check_ref(organization, ref)
        v = Violations()
        v.check(after_sequence >= 0, "after_sequence", "must not be negative")
        v.raise_if_any("request is invalid")
        limit = page_size(size, default=DEFAULT_PAGE_SIZE)

        def load(session: Session) -> tuple[list[job_pb2.JobEvent], str]:
            row = _find(session, organization, ref)
            query = {"org": organization, "job": row.id, "list": "events", "after": after_sequence}
            cursor = decode_token(token, query, cursor_type=int)  # the last sequence returned
            events = _events(session, row.id, max(after_sequence, cursor or 0), limit=limit + 1)
            more = len(events) > limit
            events = events[:limit]
            return events, encode_token(events[-1].sequence, query) if more else ""

        return await self.db.run(load)

    async def evaluation(self, organization: str, ref: str) -> tuple[str, evaluation_pb2.EvaluationReport]:
        """(the job's id, its report)."""
        _check_ref(organization, ref)

        def load(session: Session) -> tuple[str, evaluation_pb2.EvaluationReport]:
            row = _find(session, organization, ref)
            return row.id, evaluation_of(row)

        return await self.db.run(load)

    async def watch(self, organization: str, jobs: AsyncIterator[job_pb2.Job]
                    ) -> AsyncIterator[job_service_pb2.WatchJobResponse]:
        """WatchJob's responses from `jobs` (JobManager.watch): each job as it is now with the events
        recorded since the previous response. The job and its events are read together, events up to the
        row's own last sequence, so no event is sent ahead of the change that recorded it; a revision the
        read already passed is not sent again."""
        last_revision, last_sequence = 0, 0

        def load(session: Session, job_id: str, after: int
                 ) -> tuple[job_pb2.Job, list[job_pb2.JobEvent]] | None:
            row = JobRepository(session).find(organization, job_id)
            if row is None:
                return None
            job = job_to_proto(row)  # read first: the events below are those it had committed
            return job, _events(session, row.id, after, upto=row.event_sequence or 0)

        async with contextlib.aclosing(jobs):  # type: ignore[type-var]
            async for job in jobs:
                if job.revision <= last_revision:
                    continue
                job_id, after = job.id, last_sequence
                read = await self.db.run(lambda s, j=job_id, a=after: load(s, j, a))  # type: ignore[misc]
                current, events = read if read is not None and read[0].revision >= job.revision else (job, [])
                if events:
                    last_sequence = events[-1].sequence
                last_revision = current.revision
                yield job_service_pb2.WatchJobResponse(job=current, events=events)
                if current.state in FINAL:
                    return

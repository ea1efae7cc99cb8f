"""Per-organization limits on jobs, and how the jobs service keeps them.

- Queued: an organization may have at most `max_queued_jobs_per_org` QUEUED jobs (held ones, those waiting
  for a worker, and those back in the queue after a lost worker). CreateJob beyond it answers
  RESOURCE_EXHAUSTED with reason QUOTA_EXCEEDED, naming the limit and its value.
- Running: at most `max_running_jobs_per_org` of an organization's jobs are *dispatched* (their
  JobAssignment published to the work queue) and not yet ended: PREPARING, RUNNING, CANCELLING, or QUEUED
  for a worker to take it. A slot is taken when the assignment is published, not when a worker starts,
  since from then on any worker may start it. CreateJob beyond the limit still creates the job, QUEUED,
  but keeps its assignment (`JobRow.assignment`, `dispatched` false) and says why in Job.status_message;
  the transaction that ends one of the organization's dispatched jobs publishes the oldest held one, and
  the periodic workers check does the same for any slot freed otherwise (a limit raised, a missed turn).

Under the fair scheduler (services.jobs.scheduler, the default) every new job is held until a worker that
would take it is free, and the running limit caps what a scheduler pass dispatches for an organization;
those passes take the scheduler's lock (`JobRepository.lock_scheduler`) instead of the organization's.

Workers never see a held job, so nothing has to refuse one. Every decision that counts an organization's
jobs first locks that organization's row (`JobRepository.lock_organization`), so two concurrent ones
never both take its last slot. 0 means no limit, for either.
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneforge.v1 import job_pb2

from tuneforge_core import states

S = job_pb2.JobState
# The states of a job that holds one of its organization's running slots, once dispatched.
SLOT_STATES = frozenset({S.JOB_STATE_QUEUED, *states.ON_WORKER})


@dataclass(frozen=True)
class JobQuotas:
    """The deployment's limits (TUNEFORGE_MAX_QUEUED_JOBS_PER_ORG, TUNEFORGE_MAX_RUNNING_JOBS_PER_ORG)."""

    max_queued_jobs_per_org: int = 20
    max_running_jobs_per_org: int = 4


def held_note(organization: str, running: int, limit: int) -> str:
    """Job.status_message of a job held back by its organization's running limit."""
    jobs = "job" if running == 1 else "jobs"
    return (f"waiting: organization {organization} runs {running} {jobs}, its limit "
            f"(max_running_jobs_per_org = {limit}); this job starts when one of them ends")
